"""The ``rsa-mlx`` command line: the group and one module per command group
(:mod:`~rsa_mlx.cli.align`, :mod:`~rsa_mlx.cli.sweep`,
:mod:`~rsa_mlx.cli.evaluate`, :mod:`~rsa_mlx.cli.models`). Commands import
the heavy layers inside their bodies, so ``rsa-mlx --help`` starts fast."""

from __future__ import annotations

import click

import rsa_mlx
from rsa_mlx.cli import align, evaluate, models, recipe, sweep


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(rsa_mlx.__version__, prog_name="rsa-mlx")
def main():
    """Risk-aware Stepwise Alignment (RSA) for MLX.

    Align a language model for helpfulness and then for safety, with a
    token-level risk-aware regulariser (CVaR or entropic risk), on a laptop.
    """


@main.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell):
    """Print the shell completion script for rsa-mlx.

    \b
    Examples:
      eval "$(rsa-mlx completion bash)"        # in ~/.bashrc
      eval "$(rsa-mlx completion zsh)"         # in ~/.zshrc
      rsa-mlx completion fish > ~/.config/fish/completions/rsa-mlx.fish
    """
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    click.echo(cls(main, {}, "rsa-mlx", "_RSA_MLX_COMPLETE").source())


for _command in (
    models.info,
    align.main,
    sweep.sweep,
    evaluate.evaluate,
    evaluate.generate,
    evaluate.compare,
    models.convert,
    models.export,
    recipe.main,
):
    main.add_command(_command)

if __name__ == "__main__":  # pragma: no cover
    main()
