"""The demo end to end: data, every method trained at the same budget (and
the second seeds), every model evaluated, and the report."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

from rsa_mlx.demo.evaluation import evaluate_all
from rsa_mlx.demo.report import write_report
from rsa_mlx.demo.settings import (
    BASE_MODEL,
    QUICK,
    Budget,
    evaluation_count,
    method_config,
    reseeded,
)
from rsa_mlx.demo.world import write_dataset
from rsa_mlx.study.methods import METHODS
from rsa_mlx.tuner.config import TrainConfig
from rsa_mlx.tuner.trainer import train
from rsa_mlx.util import progress
from rsa_mlx.util.atomic import save_json
from rsa_mlx.util.errors import ConfigError


def run_demo(
    cfg: TrainConfig, settings: dict, quick: bool = False, methods: str | None = None
):
    """Run the demo end to end and write the report; return the results."""
    chosen = _methods(methods)
    budget = QUICK if quick else Budget()
    out = _output_folder(settings)
    echo = progress.echo
    tic = time.perf_counter()
    echo(f"rsa_mlx demo{' (quick)' if quick else ''}: output in {out}")
    echo(f"methods: {', '.join(chosen)}; base model: {BASE_MODEL}")

    data = out / "data"
    seed = settings.get("seed") or 0
    counts = write_dataset(data, seed=seed, pairs_per_request=budget.pairs_per_request)
    echo(
        f"data: {counts['train']} train / {counts['valid']} valid preference rows "
        f"(PKU-SafeRLHF layout), {counts['test']} held-out prompts, in {data}"
    )
    # Helpfulness-only DPO is exactly SACPO's first stage (same data, seed
    # and settings): with both chosen, train it once and evaluate that stage.
    shared = {"dpo"} if {"dpo", "sacpo"} <= set(chosen) else set()
    trainings = len(chosen) - len(shared) + len(reseeded(chosen))
    total = trainings + evaluation_count(chosen, budget)
    with progress.task("demo: train and evaluate", total, "models") as overall:
        configure = partial(method_config, cfg, budget, data=data, out=out)
        runs = _train_methods(chosen, shared, configure, settings, overall)
        runs.update(_train_second_seeds(chosen, seed, configure, settings, overall))
        runs, results = _evaluate(out, runs, shared, budget, seed, overall)
    report = write_report(
        out, results, runs, budget, time.perf_counter() - tic, quick, seed
    )
    echo("\n" + report["table"])
    echo(f"\n{report['verdict']}")
    echo(
        f"\nwall time {time.perf_counter() - tic:.0f}s. Report: {out / 'report.md'}, "
        f"plot: {out / 'plot.svg'} and {out / 'plot.png'}"
    )
    save_json(out / "results.json", results)
    return results


def _methods(methods: str | None) -> list[str]:
    """The chosen methods, every one known: ``None`` means all of them."""
    chosen = (
        list(METHODS) if methods is None else [m.strip() for m in methods.split(",")]
    )
    unknown = [m for m in chosen if m not in METHODS]
    if unknown:
        raise ConfigError(
            f"unknown demo method {unknown[0]!r}; choose from {', '.join(METHODS)}"
        )
    return chosen


def _output_folder(settings: dict) -> Path:
    """--adapter-path, or a new folder under runs/; never a finished demo's."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(settings.get("adapter_path") or Path("runs") / f"demo-{stamp}")
    if (out / "results.json").exists():
        raise ConfigError(
            f"{out}: a demo run already exists here; choose another --adapter-path"
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


def _train_methods(chosen, shared, configure, settings, task) -> dict:
    runs = {}
    for i, name in enumerate(chosen, 1):
        if name in shared:
            continue
        method_cfg = configure(name, settings=settings)
        progress.echo(
            f"\n== [{i}/{len(chosen)}] training {name}: "
            f"{' -> '.join(method_cfg.stage_names)} ({method_cfg.method_name()})"
        )
        runs[name] = train(method_cfg)
        task.advance()
    return runs


def _train_second_seeds(chosen, seed, configure, settings, task) -> dict:
    """The methods trained again with the next seed: how much a number moves
    between two seeds."""
    runs = {}
    for name in reseeded(chosen):
        again = {**settings, "seed": seed + 1}
        method_cfg = configure(name, settings=again, folder=f"{name}-seed{seed + 1}")
        progress.echo(
            f"\n== training {name} again with seed {seed + 1} (seed-to-seed change)"
        )
        runs[f"{name} seed={seed + 1}"] = train(method_cfg)
        task.advance()
    return runs


def _evaluate(out: Path, runs: dict, shared: set, budget: Budget, seed: int, task):
    if shared:
        sacpo = runs["sacpo"]
        runs = {
            "dpo": {
                **sacpo,
                "stages": sacpo["stages"][:1],
                "adapter": str(Path(sacpo["run_dir"]) / "reward"),
                "shared_with": "sacpo",
            },
            **runs,
        }
        progress.echo("\n(dpo = the reward stage of sacpo: the same training)")
    progress.echo("\n== evaluating")
    return runs, evaluate_all(out, runs, budget, seed, on_model=task.advance)
