"""Seeded sweeps: train and evaluate a grid of settings, sharing stage 1.

    rsa-mlx sweep -c sweep.yaml
    rsa-mlx sweep --model M --data D --methods sacpo,rsa-cvar \\
        --grid safety_beta=0.1,0.05,0.025,0.01 --seeds 0,1,2 \\
        --prompts held_out.jsonl --scorer refusal

A *cell* is one full setting (method, stage-2 temperature, learning rate,
merge ratio q, seed, ...). Cells are grouped so that expensive work is done
once:

* stage 1 does not depend on the stage-2 settings (the safety temperature
  and data, the merge ratio): it is trained once per distinct first-stage
  setting (:func:`stage1_key`) and copied, bit for bit, into every cell's
  run folder (:func:`rsa_mlx.tuner.runs.start_from`);
* the merge ratio q only scales the last stage's update, so cells that
  differ only in q share one trained run and are evaluated with ``merge=q``.

Every cell is evaluated by the same evaluator on the same prompts and
appended to ``results.jsonl`` (and ``results.csv``) with its full settings.
Started again on the same folder, a sweep skips the evaluated cells and
resumes an interrupted training from its checkpoint; ``sweep.json`` holds
the content hashes of its inputs, so a changed data, prompt or model file is
refused by name, and one process at a time holds the folder
(:mod:`rsa_mlx.util.lock`). The base model and each
shared stage 1 are evaluated too (rows of kind ``base`` and ``stage1``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from rsa_mlx.study.grid import SECOND_ONLY, Cell, expand
from rsa_mlx.tuner.config import TrainConfig
from rsa_mlx.tuner.loop import Interrupted
from rsa_mlx.tuner.model import load
from rsa_mlx.tuner.runs import (
    RUN_FILE,
    changed_inputs,
    digest_inputs,
    finished,
    input_paths,
    start_from,
)
from rsa_mlx.tuner.trainer import train
from rsa_mlx.util import progress
from rsa_mlx.util.atomic import dumps, save_json, save_text
from rsa_mlx.util.errors import ConfigError, quote
from rsa_mlx.util.fingerprint import local_path
from rsa_mlx.util.lock import folder_lock

__all__ = ["RESULTS", "SPEC_FILE", "Sweep", "SweepInterrupted", "run_sweep"]

RESULTS = "results.jsonl"
SPEC_FILE = "sweep.json"


@dataclass
class Sweep:
    """A sweep folder: where stage 1s, runs and results live."""

    path: Path

    def stage1_dir(self, cell: Cell) -> Path:
        return self.path / "stage1" / cell.stage1_key

    def run_dir(self, cell: Cell) -> Path:
        return self.path / "runs" / cell.train_key

    def rows(self) -> list[dict]:
        """The evaluated rows so far (a line cut short by a kill is dropped)."""
        path = self.path / RESULTS
        if not path.exists():
            return []
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return rows

    def append(self, row: dict) -> None:
        rows = [r for r in self.rows() if r["id"] != row["id"]] + [row]
        save_text(self.path / RESULTS, "".join(dumps(r) + "\n" for r in rows))
        save_text(self.path / "results.csv", to_csv(rows))


def to_csv(rows: list[dict]) -> str:
    """One line per row: id, kind, method, the grid values, the metrics,
    then every other setting of the cell."""
    fixed = ("id", "kind", "method")  # their own columns, once each
    grid = list(dict.fromkeys(k for r in rows for k in r.get("grid", {})))
    grid = [k for k in grid if k not in fixed]
    metrics = list(dict.fromkeys(k for r in rows for k in r["metrics"]))
    settings = list(dict.fromkeys(k for r in rows for k in r.get("settings", {})))
    settings = [k for k in settings if k not in grid and k not in fixed]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["id", "kind", "method", *grid, *metrics, *settings])
    for r in rows:
        writer.writerow(
            [r["id"], r["kind"], r["method"]]
            + [r.get("grid", {}).get(k, "") for k in grid]
            + [r["metrics"].get(k, "") for k in metrics]
            + [_cell(r.get("settings", {}).get(k, "")) for k in settings]
        )
    return out.getvalue()


def _cell(value):
    return json.dumps(value) if isinstance(value, (dict, list)) else value


def _train(cfg: TrainConfig, run_dir: Path, train_fn) -> None:
    """Train ``cfg`` in ``run_dir``, or resume it there after a kill."""
    if not finished(run_dir):
        resume = (run_dir / RUN_FILE).exists() and (run_dir / "config.yaml").exists()
        train_fn(replace(cfg, adapter_path=str(run_dir), resume=resume))


def ensure_trained(sweep: Sweep, cell: Cell, train_fn) -> Path:
    """The cell's trained run folder (training what is missing)."""
    run_dir = sweep.run_dir(cell)
    if finished(run_dir):
        return run_dir
    cfg = replace(cell.config, merge=1.0)  # q is applied at evaluation
    if cell.stage1_key is not None and not (run_dir / RUN_FILE).exists():
        source = sweep.stage1_dir(cell)
        first = replace(cfg, stages=cfg.stage_names[0])
        _train(first, source, train_fn)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        start_from(cfg, run_dir, source)
    _train(cfg, run_dir, train_fn)
    return run_dir


Evaluator = Callable[..., dict]  # (model, tokenizer, label) -> {metric: float}


class SweepInterrupted(Interrupted):
    """A cell's training was stopped by a signal (after a checkpoint)."""

    def __init__(self, stopped: Interrupted, path: Path):
        super().__init__(
            stopped.signum, stopped.stage, stopped.iteration, stopped.checkpoint
        )
        self.path = path

    def __str__(self) -> str:
        name = signal.Signals(self.signum).name
        return (
            f"sweep stopped by {name} in {self.run_dir} [{self.stage}] after "
            f"iteration {self.iteration} (checkpoint saved). Run the same command "
            f"again to continue {self.path}: finished cells are kept and this one "
            "resumes from its checkpoint"
        )


def run_sweep(
    base: dict,
    grid: dict[str, list],
    evaluator: Evaluator,
    path: str | Path,
    description: dict | None = None,
    train_fn=None,
) -> list[dict]:
    """Train and evaluate every cell of ``grid`` over ``base``; return rows.

    ``evaluator(model, tokenizer, label)`` returns flat metrics; it is
    called for the base model, each shared stage 1 and every cell.
    ``description`` (JSON) says what the evaluator is; a folder started with
    another base, evaluator or description is refused, so results in one
    table are comparable. The grid may grow between runs; the content of its
    inputs (model, data, the evaluator's files) may not. One process at a
    time: a second one on the same folder is refused at once.
    """
    cells = expand(base, grid)
    sweep = Sweep(Path(path))
    spec = sweep_spec(base, grid, description or {}, cells)
    hint = "wait for it to end, or choose another --sweep-path"
    with folder_lock(sweep.path, "sweep", hint) as stale:
        if stale is not None:
            progress.echo(
                f"sweep: {sweep.path} was left locked by process {stale}, which "
                "ended without releasing it (killed?); continuing its work"
            )
        spec["inputs"] = {**_check_spec(sweep, spec), **spec["inputs"]}
        save_json(sweep.path / SPEC_FILE, spec)
        _run_cells(sweep, cells, evaluator, train_fn or train)
    return list(sweep.rows())


def _run_cells(sweep: Sweep, cells: list[Cell], evaluator, train_fn) -> None:
    """Evaluate the base model, then train and evaluate each cell not done."""
    done = {r["id"] for r in sweep.rows()}
    todo = [c for c in cells if c.id not in done]
    echo = progress.echo
    echo(
        f"sweep: {len(cells)} cells ({len({c.train_key for c in cells})} trainings, "
        f"{len({c.stage1_key for c in cells} - {None})} shared stage 1s) in "
        f"{sweep.path}; {len(cells) - len(todo)} already done"
    )
    model_path = cells[0].config.model

    def evaluate(row: dict, adapter, merge=None) -> None:
        tic = time.perf_counter()
        model, tokenizer = load(model_path, adapter_path=adapter, merge=merge)
        metrics = checked_metrics(evaluator(model, tokenizer, row["id"]), row["id"])
        sweep.append({**row, "metrics": metrics, "seconds": time.perf_counter() - tic})

    if "base" not in done:
        evaluate({"id": "base", "kind": "base", "method": "base", "grid": {}}, None)
    with progress.task("sweep", len(todo), "cells") as bar:
        for i, cell in enumerate(todo, 1):
            values = ", ".join(f"{k}={v}" for k, v in cell.values)
            echo(f"\n== sweep cell {i}/{len(todo)}: {values}")
            try:
                run_dir = ensure_trained(sweep, cell, train_fn)
            except Interrupted as e:
                raise SweepInterrupted(e, sweep.path) from None
            key = cell.stage1_key
            if key is not None and key not in {r["id"] for r in sweep.rows()}:
                evaluate(stage1_row(cell), sweep.stage1_dir(cell))
            evaluate(cell_row(cell, run_dir), run_dir, cell.config.merge)
            bar.advance()


def checked_metrics(metrics: dict, label: str) -> dict:
    """An evaluator's metrics for row ``label``: numbers, NaN for "not
    measured" (stored as ``null``); an infinite value is an error naming
    the metric and the row, never a number a verdict reads."""
    if not isinstance(metrics, dict):
        raise ConfigError(
            f"the evaluator returned {type(metrics).__name__} for {label}"
        )
    for key, value in metrics.items():
        if isinstance(value, float) and math.isinf(value):
            raise ConfigError(
                f"the evaluator's {key!r} is {value} for {label}: metrics must be "
                "finite (or NaN: not measured)"
            )
    return metrics


def stage1_row(cell: Cell) -> dict:
    """A shared stage 1's result row (before its metrics): the cell's grid
    values without those of stage 2 alone."""
    second = SECOND_ONLY[cell.config.stage_names[1]]
    grid = {k: v for k, v in cell.values if k not in second}
    return {
        "id": cell.stage1_key,
        "kind": "stage1",
        "method": cell.method,
        "grid": grid,
    }


def cell_row(cell: Cell, run_dir: Path) -> dict:
    """A cell's result row (before its metrics), with its full settings."""
    return {
        "id": cell.id,
        "kind": "cell",
        "method": cell.method,
        "grid": dict(cell.values),
        "run": str(run_dir),
        "settings": cell.config.result_settings(),
    }


PATH_KEYS = ("model", "data", "reward_data", "safety_data")


def _resolved(settings: dict, keys=None) -> dict:
    """``settings`` (as JSON reads it back) with the values of ``keys`` (all,
    if None) that name local files or folders made absolute: the same sweep
    given relative or absolute paths is the same sweep."""
    out = json.loads(dumps(settings))
    for key, value in out.items():
        if (keys is None or key in keys) and (path := local_path(value)):
            out[key] = str(path)
    return out


def sweep_spec(base: dict, grid: dict, description: dict, cells: list[Cell]) -> dict:
    """What ``sweep.json`` records: the base settings and the evaluator's
    description (paths resolved), the grid, and the content hash of every
    local input: each cell's model and data, the evaluator's files."""
    named = [pair for cell in cells for pair in input_paths(cell.config)]
    named += [(k, p) for k, v in description.items() if (p := local_path(v))]
    return {
        "base": _resolved(base, PATH_KEYS),
        "evaluation": _resolved(description),
        "grid": grid,
        "inputs": digest_inputs(named),
    }


def _check_spec(sweep: Sweep, spec: dict) -> dict:
    """Refuse a folder holding a sweep with another base or evaluator, or
    whose inputs changed since; return the inputs it recorded."""
    path = sweep.path / SPEC_FILE
    if not path.exists():
        if (sweep.path / RESULTS).exists():
            raise ConfigError(f"{quote(sweep.path)}: results without {SPEC_FILE}")
        return {}
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{quote(path)}: damaged ({e}); not a sweep file") from None
    if saved.get("base") is not None:  # older files: as given
        saved["base"] = _resolved(saved["base"], PATH_KEYS)
    saved["evaluation"] = _resolved(saved.get("evaluation") or {})
    for key in ("base", "evaluation"):
        if saved.get(key) != spec[key]:
            raise ConfigError(
                f"{quote(sweep.path)}: a sweep with another {key} is here; "
                "choose another --sweep-path (the grid may grow, nothing else)"
            )
    if changed := changed_inputs(saved.get("inputs"), spec["inputs"]):
        raise ConfigError(
            f"{quote(sweep.path)}: {'; '.join(changed)} changed since this sweep "
            "started (its content hash differs), so new cells would not compare "
            "with the old; restore it or choose another --sweep-path"
        )
    return saved.get("inputs") or {}
