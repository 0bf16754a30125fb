"""``python -m rsa_mlx.train``: two-stage RSA training from the command line.

With no ``--model`` (and no config that sets one) it runs the bundled demo:
base model -> helpfulness stage -> safety stage for RSA and the baselines,
evaluated side by side (see :mod:`rsa_mlx.demo`).

Examples::

    python -m rsa_mlx.train                               # the bundled demo
    python -m rsa_mlx.train --quick                       # the demo, in ~1 minute
    python -m rsa_mlx.train --model Qwen/Qwen2.5-0.5B-Instruct \\
        --data PKU-Alignment/PKU-SafeRLHF-30K --risk cvar --mu 0.95 --iters 200
    python -m rsa_mlx.train -c config.yaml --learning-rate 2e-5
    python -m rsa_mlx.train --adapter-path runs/my-run --resume

The options are generated from :class:`rsa_mlx.tuner.config.TrainConfig`, where
every default and help text is written once.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import click

from rsa_mlx.cli.common import debug, fail, field_option
from rsa_mlx.tuner.config import LoRAConfig, TrainConfig, field_type, load_yaml, resolve
from rsa_mlx.util.blas import blas_note
from rsa_mlx.util.errors import ConfigError, RsaMlxError, Stopped, quote

_LORA_FLAGS = ("rank", "scale", "dropout", "keys")  # --lora-<name>


def _options() -> list:
    options = [
        click.option(
            "-c",
            "--config",
            "config_file",
            type=click.Path(dir_okay=False),
            help="YAML config; command-line flags override it.",
        )
    ]
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.metadata.get("cli", True):
            options.append(
                field_option(f.name, f, field_type(f.name), getattr(defaults, f.name))
            )
        if f.name == "num_layers":  # the LoRA flags next to --num-layers
            lora = {g.name: g for g in dataclasses.fields(LoRAConfig)}
            for key in _LORA_FLAGS:
                g = lora[key]
                options.append(
                    field_option(
                        f"lora_{key}", g, field_type(key, LoRAConfig), g.default
                    )
                )
    return options


DEMO_OPTIONS = [
    click.option(
        "--quick", is_flag=True, help="Demo only: a small budget (about a minute)."
    ),
    click.option("--methods", help="Demo only: comma-separated methods to compare."),
    click.option(
        "--study",
        is_flag=True,
        help="Demo only: a seeded sweep of the stepwise methods (about 70 min; "
        "with --quick about 3) with intervals, fronts and verdicts.",
    ),
    click.option(
        "--world",
        type=click.Choice(["reward", "rare"]),
        help="Demo study only: helpfulness raters by true reward (default), or "
        "'rare': the catastrophic answer gets no helpfulness credit, so it "
        "stays rare after stage 1.",
    ),
]


def train_options(fn):
    for option in reversed(_options() + DEMO_OPTIONS):
        fn = option(fn)
    return fn


def cli_settings(options: dict) -> dict:
    """Command-line values as config keys (``None`` = not given)."""
    settings = dict(options)
    lora = {k: settings.pop(f"lora_{k}", None) for k in _LORA_FLAGS}
    if lora["keys"] is not None:
        lora["keys"] = [k.strip() for k in lora["keys"].split(",") if k.strip()]
    settings["lora_parameters"] = {
        k: v for k, v in lora.items() if v is not None
    } or None
    return settings


def resume_config(settings: dict, config_file: str | None) -> TrainConfig:
    """The settings of the run to resume, with the command line on top.

    Refused, before anything is written, when there is nothing to resume or
    when a setting that changes the result differs from the saved one.
    """
    if not settings.get("adapter_path"):
        raise ConfigError("--resume needs --adapter-path, the run folder to continue")
    run_dir = Path(settings["adapter_path"])
    saved_file = run_dir / "config.yaml"
    if not (run_dir / "run.json").exists() or not saved_file.exists():
        raise ConfigError(
            f"nothing to resume in {quote(run_dir)}: no run.json and config.yaml "
            "(is --adapter-path the run folder?)"
        )
    # the saved settings are the base; trainer.train refuses changed results
    return resolve(settings, config_file, base=load_yaml(saved_file))


def run(options: dict) -> None:
    """Resolve the settings and train, or run the demo when no model is set."""
    # the heavy layers, here so that `rsa-mlx --help` starts fast
    from rsa_mlx.demo.run import run_demo
    from rsa_mlx.demo.study import run_study
    from rsa_mlx.tuner.distributed import rank_zero_only
    from rsa_mlx.tuner.trainer import train

    options = dict(options)
    config_file = options.pop("config_file", None)
    quick, methods = options.pop("quick", False), options.pop("methods", None)
    study, world = options.pop("study", False), options.pop("world", None)
    settings = cli_settings(options)
    if settings.get("resume"):
        cfg = resume_config(settings, config_file)
    else:
        cfg = resolve(settings, config_file)
    if cfg.model is None:
        if rank_zero_only("the demo"):
            return
        if study:
            run_study(cfg, settings, quick, methods, world or "reward")
        elif world:
            raise ConfigError("--world is for the demo study (--study)")
        else:
            run_demo(cfg, settings, quick=quick, methods=methods)
        return
    if quick or methods or study or world:
        raise ConfigError(
            "--quick, --methods and --study are for the demo (no --model); "
            "for your own model use rsa-mlx sweep"
        )
    train(cfg)


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
      python -m rsa_mlx.train --quick               # the demo in about a minute
      python -m rsa_mlx.train --model M --data D --risk cvar --iters 200
      python -m rsa_mlx.train --adapter-path runs/x --resume
    """
    from rsa_mlx.tuner import distributed as dist  # heavy: not at --help
    from rsa_mlx.util import progress

    main_rank = dist.is_main()
    progress.SILENT = not main_rank  # under mlx.launch rank 0 speaks for all
    if main_rank and (note := blas_note()):
        click.echo(note, err=True)
    try:
        run(options)
    except Stopped as e:
        click.echo(str(e), err=True)
        sys.exit(128 + e.signum)
    except (RsaMlxError, OSError) as e:
        if debug():
            raise
        if main_rank:
            fail(str(e))
        if isinstance(e, ConfigError):
            # Settings are the same on every rank, so rank 0 fails too and
            # says why (the launcher then stops this rank); only if it does
            # not (this machine's files differ) does this rank say it.
            time.sleep(3)
        fail(f"rank {dist.rank()}: {e}")
