"""``rsa-mlx sweep``: a seeded grid of training settings on your model.

    rsa-mlx sweep -c sweep.yaml
    rsa-mlx sweep --model M --data D --prompts held_out.jsonl --scorer refusal \\
        --methods sacpo,rsa-cvar --grid safety_beta=0.1,0.05,0.025,0.01 \\
        --seeds 0,1,2 --set iters=200 --set learning_rate=3e-5

The YAML file holds the same: training settings at the top level (the base
of every cell, as in ``rsa-mlx align -c``), a ``grid:`` mapping of setting
-> list of values (``method`` and ``seed`` included), an ``evaluate:``
mapping (``prompts``, ``scorer``, ``k``, ``max_tokens``, ``temperature``,
``seed``, ``unsafe_threshold``; or ``evaluator: recipe`` with the
real-model recipe's ``sets``, ``samples``, ``max_tokens``, ``temperature``,
``seed``: see :mod:`rsa_mlx.study.evaluators`) and optionally ``sweep_path``
and ``harms``. Flags override the file. See :mod:`rsa_mlx.study.sweep` and
:mod:`rsa_mlx.study.analysis`.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from rsa_mlx.cli.common import guard
from rsa_mlx.study.grid import expand, parse_grid
from rsa_mlx.study.methods import parse_methods
from rsa_mlx.util.errors import ConfigError
from rsa_mlx.util.yaml_config import read_yaml

DEFAULT_HARMS = ("unsafe_rate", "cvar_0.99", "mean_cost")


def _spec(config_file: str | None) -> dict:
    if config_file is None:
        return {}
    data = read_yaml(config_file, "sweep file")
    for key in ("grid", "evaluate"):
        if not isinstance(data.get(key, {}), dict):
            raise ConfigError(f"{config_file}: {key!r} must be a mapping")
    return data


def plan(config_file, model, data, methods, grid_items, seeds, set_items, evaluation,
         report_only=False):  # fmt: skip
    """``(base, grid, evaluate settings, path, harms)`` from the file and flags
    (with ``report_only``, the model and prompts are the folder's own)."""
    spec = _spec(config_file)
    grid = {
        k: v if isinstance(v, list) else [v] for k, v in spec.pop("grid", {}).items()
    }
    ev = dict(spec.pop("evaluate", {}))
    path = spec.pop("sweep_path", None)
    harms = spec.pop("harms", None)
    base = spec
    base.update({k: v for k, v in (("model", model), ("data", data)) if v is not None})
    base.update({k: v[0] for k, v in parse_grid(set_items, "--set").items()})
    if methods:
        grid["method"] = parse_methods(methods)
    if seeds:
        grid["seed"] = parse_grid([f"seed={seeds}"], "--seeds")["seed"]
    grid.update(parse_grid(grid_items))
    ev.update({k: v for k, v in evaluation.items() if v is not None})
    if report_only:
        return base, grid, ev, path, harms
    if not base.get("model"):
        raise ConfigError("give the base model: --model or model: in the sweep file")
    if ev.get("evaluator", "prompts") == "prompts" and not ev.get("prompts"):
        raise ConfigError("give held-out prompts: --prompts or evaluate: prompts:")
    return base, grid, ev, path, harms


def check_metrics(evaluator, harms: list[str]) -> None:
    """The harm metrics, and helpfulness, against what the evaluator will
    return, before anything trains (an evaluator without ``metric_names``
    is checked by the report)."""
    from rsa_mlx.study.evaluators import metric_names
    from rsa_mlx.study.settings import HELPFUL, check_harms

    names = metric_names(evaluator)
    if names is None:
        return
    kind = evaluator.description().get("evaluator", type(evaluator).__name__)
    check_harms(harms, names, f"the {kind} evaluator")
    if HELPFUL not in names:
        click.echo(
            f"note: the {kind} evaluator measures no helpfulness on these prompts "
            "(the refusal and demo scorers measure it on benign rows, a judge only "
            "with a helpfulness question); the report will list the harm metrics "
            "without Pareto fronts or verdicts, which need helpfulness against harm",
            err=True,
        )


@click.command(
    epilog="Exit status 2 on bad input (a second sweep on the folder, changed "
    "inputs too); started again, a sweep continues."
)
@click.option("-c", "--config", "config_file", type=click.Path(dir_okay=False),
              help="A sweep YAML file (settings, grid:, evaluate:).")  # fmt: skip
@click.option("--model", help="Base model: local folder or Hugging Face id.")
@click.option("--data", help="Preference data (as for rsa-mlx align).")
@click.option(
    "--methods", help="Methods to compare: sacpo, tdpo, rsa-cvar, rsa-erm, dpo."
)
@click.option("--grid", "grid_items", multiple=True, metavar="KEY=V1,V2",
              help="A setting and its values (repeat): safety_beta, learning_rate, "
              "mu, alpha, merge, lora_rank, ...")  # fmt: skip
@click.option("--seeds", help="Training seeds, e.g. 0,1,2 (intervals need 2 or more).")
@click.option("--set", "set_items", multiple=True, metavar="KEY=VALUE",
              help="A training setting shared by every cell (repeat).")  # fmt: skip
@click.option(
    "--prompts", type=click.Path(dir_okay=False), help="Held-out prompts (JSONL)."
)
@click.option(
    "--scorer", help="demo, refusal, judge:<model> or package.module:function."
)
@click.option("-k", "--samples", "k", type=int, help="Sampled answers per prompt [4].")
@click.option("--max-tokens", type=int, help="Longest sampled answer [64].")
@click.option("--temperature", type=float, help="Sampling temperature [1.0].")
@click.option(
    "--eval-seed", type=int, help="Sampling seed, the same for every cell [0]."
)
@click.option(
    "--unsafe-threshold", type=float, help="judge: unsafe at P >= this [0.5]."
)
@click.option("--sweep-path", help="The sweep folder [sweeps/<time>].")
@click.option("--harm", "harms", multiple=True,
              help="Harm metric(s) for fronts and verdicts, checked before training "
              "[those of unsafe_rate, cvar_0.99, mean_cost the evaluator has].")  # fmt: skip
@click.option(
    "--report-only", is_flag=True, help="Only rewrite the report from results."
)
def sweep(config_file, model, data, methods, grid_items, seeds, set_items, prompts,
          scorer, k, max_tokens, temperature, eval_seed, unsafe_threshold, sweep_path,
          harms, report_only):  # fmt: skip
    """Train and evaluate a grid of settings x seeds; report fronts and verdicts.

    Stage 1 is trained once per distinct stage-1 setting and reused by every
    stage-2 cell on it; merge ratios reuse trained runs. Results go to
    results.jsonl / results.csv; report.md, plot.svg/.png and summary.json
    give 95% intervals over seeds, each method's Pareto front of helpfulness
    against harm, and dominance verdicts with collapsed models set aside.

    \b
    Examples:
      rsa-mlx sweep -c sweep.yaml
      rsa-mlx sweep --model M --data D --prompts p.jsonl --scorer refusal \\
          --methods sacpo,rsa-cvar --grid safety_beta=0.1,0.025 --seeds 0,1,2
    """
    # the heavy layers, here so that `rsa-mlx --help` starts fast
    import rsa_mlx.demo.scorer
    import rsa_mlx.recipe.evaluate  # noqa: F401  (registers the recipe's evaluator)
    from rsa_mlx.study.analysis import report
    from rsa_mlx.study.evaluators import make_evaluator
    from rsa_mlx.study.sweep import Sweep, run_sweep

    def run():
        evaluation = {
            "prompts": prompts, "scorer": scorer, "k": k, "max_tokens": max_tokens,
            "temperature": temperature, "seed": eval_seed,
            "unsafe_threshold": unsafe_threshold,
        }  # fmt: skip
        base, grid, ev, path, harm_list = plan(
            config_file, model, data, methods, grid_items, seeds, set_items,
            evaluation, report_only,
        )  # fmt: skip
        if report_only and not (sweep_path or path):
            raise ConfigError("--report-only needs --sweep-path, the sweep folder")
        path = Path(
            sweep_path or path or Path("sweeps") / time.strftime("%Y%m%d-%H%M%S")
        )
        chosen = list(harms or harm_list or [])  # checked; the defaults if had
        if not report_only:
            expand(base, grid)  # the grid's settings, before the prompts
            # its settings, inputs and metrics, checked before any training
            evaluator = make_evaluator(ev, reference=base["model"])
            check_metrics(evaluator, chosen)
            run_sweep(base, grid, evaluator, path, evaluator.description())
        rows = Sweep(path).rows()
        if not rows:
            raise ConfigError(f"{str(path)!r}: no results yet")
        names = {k for r in rows for k in r.get("metrics", {})}
        chosen = chosen or [h for h in DEFAULT_HARMS if h in names]
        result = report(rows, path, chosen, title=f"Sweep {path.name}")
        click.echo("\n" + result["table"])
        click.echo("\n" + "\n".join(f"- {line}" for line in result["verdict"]))
        click.echo(f"\nReport: {path / 'report.md'}, plot: {path / 'plot.png'}")

    guard(run)
