"""What the commands share: one ``error:`` line and exit status 2 for bad
input, the exit status of a stopped run, and the model options."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable

import click

from rsa_mlx.util.errors import RsaMlxError, Stopped


def debug() -> bool:
    """``RSA_MLX_DEBUG=1``: keep tracebacks for bad input too."""
    return bool(os.environ.get("RSA_MLX_DEBUG"))


def fail(message: str, code: int = 2) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def guard(fn: Callable[[], object]) -> None:
    """Run a command body: bad input gives one line on stderr and exit 2; a
    run stopped by a signal says how to continue and exits 128 + signal."""
    try:
        fn()
    except Stopped as e:  # a checkpoint was saved: not a bad input
        click.echo(str(e), err=True)
        sys.exit(128 + e.signum)
    except (RsaMlxError, OSError) as e:
        if debug():
            raise
        fail(str(e))


def _default_text(f: dataclasses.Field, default) -> str:
    if "default_text" in f.metadata:
        return f.metadata["default_text"]
    if isinstance(default, bool):
        return "on" if default else "off"
    return f"{default:g}" if isinstance(default, float) else str(default)


def field_option(name: str, f: dataclasses.Field, kind: type, default):
    """A click option for a dataclass config field of type ``kind``, named
    ``--<name>``, with the field's help text and default; its value is
    ``None`` when not given (so a YAML config or a preset fills it)."""
    flag = "--" + name.replace("_", "-")
    help_ = f.metadata["help"]
    if default is not None or "default_text" in f.metadata:
        help_ += f" [default: {_default_text(f, default)}]"
    if kind is bool:
        return click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_)
    if "choices" in f.metadata:
        kind = click.Choice(f.metadata["choices"])
    elif kind not in (int, float):
        kind = str
    return click.option(flag, name, type=kind, default=None, help=help_)


def model_options(fn):
    """--model, --adapter-path and --merge: what `rsa_mlx.load` takes."""
    fn = click.option(
        "--merge", type=float, help="Merge ratio q of the last stage, in [0, 1]."
    )(fn)
    fn = click.option(
        "--adapter-path", help="Run folder, stage folder or mlx-lm adapter folder."
    )(fn)
    return click.option(
        "--model", help="Base model folder or HF id (default: the run's)."
    )(fn)


def stdin_is_terminal() -> bool:
    return bool(getattr(sys.stdin, "isatty", lambda: False)())
