"""``python -m rsa_mlx.train``: two-stage RSA training from the command line.

With no ``--model`` (and no config that sets one) it runs the bundled demo:
base model -> helpfulness stage -> safety stage for RSA and the baselines,
evaluated side by side (see :mod:`rsa_mlx.demo`).

Examples::

    python -m rsa_mlx.train                               # the bundled demo
    python -m rsa_mlx.train --quick                       # the demo, in ~2 minutes
    python -m rsa_mlx.train --model Qwen/Qwen2.5-0.5B-Instruct \\
        --data PKU-Alignment/PKU-SafeRLHF-30K --risk cvar --mu 0.95 --iters 200
    python -m rsa_mlx.train -c config.yaml --learning-rate 2e-5
    python -m rsa_mlx.train --adapter-path runs/my-run --resume
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from rsa_mlx.adapters import LoRAConfig
from rsa_mlx.config import ORDER_CHOICES, STAGE_CHOICES, ConfigError, resolve
from rsa_mlx.losses import LOSSES
from rsa_mlx.risk import MEASURES

_LORA_DEFAULTS = LoRAConfig()

TRAIN_OPTIONS = [
    click.option(
        "-c",
        "--config",
        "config_file",
        type=click.Path(dir_okay=False),
        help="YAML config; command-line flags override it.",
    ),
    click.option("--model", help="Base model: local mlx-lm folder or Hugging Face id."),
    click.option(
        "--data",
        help="Data for both stages (PKU-SafeRLHF rows, or a folder "
        "with reward/ and safety/): file, folder or HF dataset id.",
    ),
    click.option("--reward-data", help="Helpfulness pairs for the reward stage."),
    click.option("--safety-data", help="Safety pairs for the safety stage."),
    click.option(
        "--stages",
        type=click.Choice(STAGE_CHOICES),
        help="Stages to train [default: both].",
    ),
    click.option(
        "--order",
        type=click.Choice(ORDER_CHOICES),
        help="Stage order when training both [default: reward-first].",
    ),
    click.option(
        "--loss",
        type=click.Choice(LOSSES),
        help="dpo, variant1 (TDPO1/Ra-DPO1) or variant2 [default: variant2].",
    ),
    click.option(
        "--risk",
        type=click.Choice(MEASURES),
        help="Token-level risk measure [default: cvar].",
    ),
    click.option(
        "--mu", type=float, help="Risk level [default: 0.95 for cvar, 5 for erm]."
    ),
    click.option("--alpha", type=float, help="variant2's alpha [default: 0.5]."),
    click.option("--beta", type=float, help="Reward-stage temperature [default: 0.1]."),
    click.option(
        "--lam",
        type=float,
        help="Safety-stage temperature is beta/lam (SACPO) [default: 4].",
    ),
    click.option(
        "--safety-beta", type=float, help="Safety-stage temperature, directly."
    ),
    click.option(
        "--merge",
        type=float,
        help="Merge ratio q of the final model, W1 + q dW2 [default: 1].",
    ),
    click.option(
        "--length-normalize/--no-length-normalize",
        default=None,
        help="Divide sequence sums by response length [default: off].",
    ),
    click.option(
        "--num-layers",
        type=int,
        help=f"Blocks to adapt, -1 for all [default: {_LORA_DEFAULTS.num_layers}].",
    ),
    click.option("--lora-rank", type=int, help=f"[default: {_LORA_DEFAULTS.rank}]"),
    click.option(
        "--lora-scale", type=float, help=f"[default: {_LORA_DEFAULTS.scale:g}]"
    ),
    click.option("--lora-dropout", type=float, help="[default: 0]"),
    click.option(
        "--lora-keys",
        help="Comma-separated module paths in a block, "
        "e.g. self_attn.q_proj,self_attn.v_proj [default: all linear].",
    ),
    click.option("--iters", type=int, help="Batches per stage [default: one epoch]."),
    click.option("--epochs", type=float, help="Epochs per stage."),
    click.option(
        "--batch-size", type=int, help="Preference pairs per batch [default: 4]."
    ),
    click.option("--grad-accumulation-steps", type=int, help="[default: 1]"),
    click.option("--learning-rate", type=float, help="[default: 1e-5]"),
    click.option(
        "--warmup",
        type=float,
        help="Warmup: fraction of updates if < 1, else updates [default: 0.1].",
    ),
    click.option("--weight-decay", type=float, help="AdamW weight decay [default: 0]."),
    click.option("--max-grad-norm", type=float, help="Gradient clipping [default: 1]."),
    click.option("--max-seq-length", type=int, help="[default: 1024]"),
    click.option(
        "--grad-checkpoint/--no-grad-checkpoint",
        default=None,
        help="Recompute activations in the backward to save memory.",
    ),
    click.option(
        "--compile/--no-compile",
        default=None,
        help="mx.compile the training step [default: on].",
    ),
    click.option("--adapter-path", help="Run folder [default: runs/<time>-<method>]."),
    click.option("--steps-per-report", type=int, help="[default: 10]"),
    click.option("--steps-per-eval", type=int, help="[default: 100; 0: at the end]"),
    click.option("--val-batches", type=int, help="[default: -1, all]"),
    click.option(
        "--save-every", type=int, help="Checkpoint every N iterations [default: 100]."
    ),
    click.option("--keep-checkpoints", type=int, help="[default: 2]"),
    click.option("--report-to", help="wandb and/or swanlab (comma-separated)."),
    click.option("--project-name", help="Project name for --report-to."),
    click.option(
        "--resume/--no-resume",
        default=None,
        help="Continue the run in --adapter-path from its last checkpoint.",
    ),
    click.option("--seed", type=int, help="[default: 0]"),
]

DEMO_OPTIONS = [
    click.option(
        "--quick", is_flag=True, help="Demo only: a small budget (~2 minutes)."
    ),
    click.option("--methods", help="Demo only: comma-separated methods to compare."),
]


def train_options(fn):
    for option in reversed(TRAIN_OPTIONS + DEMO_OPTIONS):
        fn = option(fn)
    return fn


def cli_settings(options: dict) -> dict:
    """Command-line values as config keys (``None`` = not given)."""
    settings = dict(options)
    lora = {
        "rank": settings.pop("lora_rank", None),
        "scale": settings.pop("lora_scale", None),
        "dropout": settings.pop("lora_dropout", None),
        "keys": settings.pop("lora_keys", None),
    }
    if lora["keys"] is not None:
        lora["keys"] = [k.strip() for k in lora["keys"].split(",") if k.strip()]
    settings["lora_parameters"] = {
        k: v for k, v in lora.items() if v is not None
    } or None
    return settings


def run(options: dict) -> None:
    """Resolve the settings and train, or run the demo when no model is set."""
    options = dict(options)
    config_file = options.pop("config_file", None)
    quick, methods = options.pop("quick", False), options.pop("methods", None)
    settings = cli_settings(options)
    if settings.get("resume") and settings.get("adapter_path") and config_file is None:
        saved = Path(settings["adapter_path"]) / "config.yaml"
        config_file = saved if saved.exists() else None
    cfg = resolve(settings, config_file)
    if cfg.model is None:
        from rsa_mlx import demo

        demo.run(cfg, settings, quick=quick, methods=methods)
        return
    if quick or methods:
        raise ConfigError("--quick and --methods are for the demo (no --model)")
    from rsa_mlx.trainer import train

    train(cfg)


def fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


@click.command(
    "align",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="Precedence: command line > YAML (-c) > defaults. "
    "Without --model: the bundled demo.",
)
@train_options
def main(**options):
    """Align a model for helpfulness, then for safety, with risk-aware losses.

    \b
    Examples:
      python -m rsa_mlx.train                       # bundled demo, offline
      python -m rsa_mlx.train --quick               # the demo in about 2 minutes
      python -m rsa_mlx.train --model M --data D --risk cvar --iters 200
      python -m rsa_mlx.train --adapter-path runs/x --resume
    """
    from rsa_mlx.errors import RsaMlxError

    try:
        run(options)
    except (RsaMlxError, OSError) as e:
        if os.environ.get("RSA_MLX_DEBUG"):
            raise
        fail(str(e))


if __name__ == "__main__":
    main()
