"""The ``rsa-mlx`` command line."""

from __future__ import annotations

import os
import platform
import sys

import click

import rsa_mlx
from rsa_mlx import _blas


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(rsa_mlx.__version__, prog_name="rsa-mlx")
def main():
    """Risk-aware Stepwise Alignment (RSA) for MLX.

    Align a language model for helpfulness and then for safety, with a
    token-level risk-aware regulariser (CVaR or entropic risk), on a laptop.
    """


@main.command()
@click.option("--no-bench", is_flag=True, help="Skip the matmul measurement.")
def info(no_bench: bool):
    """Show versions, the MLX device and which BLAS MLX uses.

    \b
    Example:
      rsa-mlx info
    """
    import mlx.core as mx

    try:
        from importlib.metadata import version

        mlx_lm_version = version("mlx-lm")
    except Exception:  # pragma: no cover - metadata missing in odd installs
        mlx_lm_version = "unknown"
    click.echo(f"rsa-mlx     {rsa_mlx.__version__}")
    click.echo(f"python      {platform.python_version()} ({sys.platform})")
    click.echo(f"mlx         {mx.__version__}")
    click.echo(f"mlx-lm      {mlx_lm_version}")
    click.echo(f"device      {mx.default_device()}")
    details = mx.device_info()  # keys differ between Metal and CPU
    for key in ("device_name", "architecture", "memory_size"):
        if key in details:
            click.echo(f"  {key:12s}{details[key]}")
    status = _blas.STATUS
    click.echo(f"openblas    {'loaded' if status.loaded else 'not loaded'}")
    click.echo(f"  reason    {status.reason}")
    if status.path:
        click.echo(f"  path      {status.path}")
    for key in sorted(k for k in os.environ if k.startswith("OPENBLAS_")):
        click.echo(f"  env       {key}={os.environ[key]}")
    for lib in _blas.loaded_blas_libraries():
        click.echo(f"  mapped    {lib}")
    if not no_bench:
        gflops = _blas.measure_gflops()
        click.echo(f"matmul      {gflops:.0f} GFLOP/s (float32 1024x1024, CPU)")


def _register():
    from rsa_mlx.train import main as align

    main.add_command(align, "align")


_register()

if __name__ == "__main__":  # pragma: no cover
    main()
