"""The ``rsa-mlx`` command line."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

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


@main.command()
@click.option("--model", help="Base model folder or HF id (default: the run's).")
@click.option(
    "--adapter-path", help="Run folder, stage folder or mlx-lm adapter folder."
)
@click.option("--merge", type=float, help="Merge ratio q of the last stage.")
@click.option(
    "--prompts",
    required=True,
    type=click.Path(dir_okay=False),
    help="JSONL with a 'prompt' per row (plus what the scorer needs).",
)
@click.option(
    "--scorer",
    default="demo",
    show_default=True,
    help="demo, judge:<model>, or package.module:function.",
)
@click.option(
    "-k",
    "--samples",
    "k",
    default=8,
    show_default=True,
    help="Sampled responses per prompt.",
)
@click.option("--max-tokens", default=64, show_default=True)
@click.option("--temperature", default=1.0, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--output",
    type=click.Path(dir_okay=False),
    help="Write the results (summary and every sample) as JSON here.",
)
def evaluate(
    model,
    adapter_path,
    merge,
    prompts,
    scorer,
    k,
    max_tokens,
    temperature,
    seed,
    output,
):
    """Sample K responses per prompt, score them, report helpfulness and tail risk.

    \b
    Examples:
      rsa-mlx evaluate --adapter-path runs/x --prompts test.jsonl --scorer demo
      rsa-mlx evaluate --model M --prompts p.jsonl --scorer judge:meta-llama/Llama-Guard-3-1B
      rsa-mlx evaluate --model M --prompts p.jsonl --scorer mypkg.scores:harm
    """
    from rsa_mlx import evaluate as ev
    from rsa_mlx.model import load

    def run():
        records = ev.read_prompts(prompts)
        judge = ev.load_scorer(scorer)
        net, tokenizer = load(model, adapter_path=adapter_path, merge=merge)
        result = ev.evaluate_model(
            net, tokenizer, records, judge, k, max_tokens, temperature, seed
        )
        result["model"] = {
            "model": model,
            "adapter_path": adapter_path,
            "merge": merge,
            "scorer": scorer,
        }
        if output:
            from rsa_mlx.adapters import save_json

            save_json(Path(output), result)
        click.echo(
            ev.markdown_table(
                {adapter_path or model: result["summary"]},
                [*ev.COLUMNS, ("cvar_0.9", "CVaR0.9 cost"), ("worst", "worst")],
            )
        )

    _guard(run)


@main.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option(
    "--output", type=click.Path(dir_okay=False), help="Write the table (Markdown)."
)
@click.option(
    "--plot", type=click.Path(dir_okay=False), help="Write helpfulness vs harm (SVG)."
)
def compare(results, output, plot):
    """One table (and plot) for several `rsa-mlx evaluate --output` files.

    \b
    Example:
      rsa-mlx compare base.json dpo.json rsa.json --output table.md --plot plot.svg
    """
    from rsa_mlx import evaluate as ev

    def run():
        summaries = {}
        for path in results:
            try:
                data = json.loads(Path(path).read_text())
                summaries[Path(path).stem] = data["summary"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(
                    f"{path}: not an `rsa-mlx evaluate` result ({e})"
                ) from None
        table = ev.markdown_table(
            summaries, [*ev.COLUMNS, ("cvar_0.9", "CVaR0.9 cost")]
        )
        click.echo(table)
        if output:
            Path(output).write_text(table + "\n")
        if plot:
            from rsa_mlx.plot import Chart, Series, write_figure

            names = list(summaries)
            chart = Chart(
                "Helpfulness vs harm",
                "helpfulness",
                "mean cost",
                [
                    Series(
                        "runs",
                        [summaries[n]["helpfulness"] for n in names],
                        [summaries[n]["mean_cost"] for n in names],
                        labels=names,
                    )
                ],
            )
            write_figure(plot, [chart], columns=1)

    _guard(run)


def _guard(fn):
    """Run a command body: bad input gives one line on stderr and exit 2."""
    from rsa_mlx.data import DataError

    try:
        fn()
    except (DataError, ValueError, FileNotFoundError, OSError) as e:
        if os.environ.get("RSA_MLX_DEBUG"):
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


def _register():
    from rsa_mlx.train import main as align

    main.add_command(align, "align")


_register()

if __name__ == "__main__":  # pragma: no cover
    main()
