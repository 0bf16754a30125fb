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
  run folder (:func:`rsa_mlx.runs.start_from`);
* the merge ratio q only scales the last stage's update, so cells that
  differ only in q share one trained run and are evaluated with ``merge=q``.

Every cell is evaluated by the same evaluator on the same prompts and
appended to ``results.jsonl`` (and ``results.csv``) with its full settings.
Started again on the same folder, a sweep skips the evaluated cells and
resumes an interrupted training from its checkpoint. The base model and each
shared stage 1 are evaluated too (rows of kind ``base`` and ``stage1``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from rsa_mlx import progress
from rsa_mlx.atomic import save_json, save_text
from rsa_mlx.config import FIELDS, RESULT_FREE, TrainConfig, resolve
from rsa_mlx.errors import ConfigError, quote
from rsa_mlx.loop import Interrupted
from rsa_mlx.methods import method_settings
from rsa_mlx.runs import RUN_FILE, finished, start_from

RESULTS = "results.jsonl"
SPEC_FILE = "sweep.json"
# Settings that only the second stage (or the final merge) depends on, by
# which stage comes second.
_SECOND_ONLY = {
    "safety": ("lam", "safety_beta", "safety_data", "merge"),
    "reward": ("beta", "reward_data", "merge"),
}


def parse_grid(items: list[str] | tuple[str, ...]) -> dict[str, list]:
    """``["safety_beta=0.1,0.05", "seed=0,1"]`` -> ``{key: [values]}``, each
    value typed as its setting (YAML scalars: ``3e-5``, ``true``)."""
    from rsa_mlx.config import yaml_value

    grid: dict[str, list] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not values.strip():
            raise ConfigError(f"--grid {item!r}: expected KEY=V1,V2,...")
        grid[key] = [yaml_value(v.strip()) for v in values.split(",")]
    return grid


def _check_grid(grid: dict[str, list]) -> None:
    for key, values in grid.items():
        if key != "method" and key not in FIELDS and not key.startswith("lora_"):
            raise ConfigError(f"grid: unknown setting {key!r}")
        if key in RESULT_FREE or key in ("model", "stages"):
            raise ConfigError(f"grid: {key!r} cannot vary within a sweep")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid: {key!r} needs a non-empty list of values")


@dataclass(frozen=True)
class Cell:
    """One setting of the grid: its config, method name and grid values."""

    config: TrainConfig
    method: str
    values: tuple  # ((key, value), ...) of the grid keys, in grid order

    @property
    def id(self) -> str:
        return f"{self.method}-{_digest(self.config.result_settings())}"

    @property
    def train_key(self) -> str:
        """Cells with equal keys share one trained run (they differ in q)."""
        settings = self.config.result_settings()
        settings.pop("merge")
        return f"{self.method}-{_digest(settings)}"

    @property
    def stage1_key(self) -> str | None:
        return stage1_key(self.config)


def _digest(settings: dict) -> str:
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def stage1_key(cfg: TrainConfig) -> str | None:
    """What the first of two stages depends on, as a short hash; ``None``
    for a one-stage run. Two configs with equal keys train the same first
    stage, bit for bit (same data, temperature, loss, seed, schedule)."""
    names = cfg.stage_names
    if len(names) < 2:
        return None
    settings = cfg.result_settings()
    # the temperatures and data by stage are replaced by the first stage's own
    for key in (*_SECOND_ONLY["reward"], *_SECOND_ONLY["safety"], "data", "stages"):
        settings.pop(key, None)
    settings.update(
        first=names[0],
        first_beta=cfg.stage_beta(names[0]),
        first_data=cfg.stage_data(names[0]),
    )
    return f"stage1-{_digest(settings)}"


def expand(base: dict, grid: dict[str, list]) -> list[Cell]:
    """Every combination of the grid's values over the ``base`` settings.

    ``method`` sets what the method defines (:mod:`rsa_mlx.methods`);
    ``lora_<key>`` sets one LoRA parameter. A setting that does not apply
    to a cell (``mu`` for a KL method) is dropped, and cells that end up
    equal are kept once.
    """
    _check_grid(grid)
    cells, seen = [], set()
    keys = list(grid)
    for combo in itertools.product(*(grid[k] for k in keys)):
        values = dict(zip(keys, combo))
        settings = dict(base)
        name = values.get("method", base.get("method"))
        settings.pop("method", None)
        if name is not None:
            settings.update(method_settings(str(name)))
        lora = dict(settings.get("lora_parameters") or {})
        for key, value in values.items():
            if key == "method":
                continue
            if key.startswith("lora_") and key not in FIELDS:
                lora[key[5:]] = value
            else:
                settings[key] = value
        if lora:
            settings["lora_parameters"] = lora
        if settings.get("risk", FIELDS["risk"].default) == "kl":
            settings.pop("mu", None)
            values.pop("mu", None)
        cfg = resolve(base=settings).with_resolved_paths()
        cell = Cell(cfg, str(name or cfg.method_name()), tuple(values.items()))
        if cell.id not in seen:
            seen.add(cell.id)
            cells.append(cell)
    # Train each shared stage 1 once, then the runs built on it, then each
    # run's merge ratios.
    first = {}
    for c in cells:
        first.setdefault(c.stage1_key, len(first))
        first.setdefault(c.train_key, len(first))
    return sorted(
        cells,
        key=lambda c: (first[c.stage1_key], first[c.train_key], -c.config.merge),
    )


# ---------------------------------------------------------------- running


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
        save_text(self.path / RESULTS, "".join(json.dumps(r) + "\n" for r in rows))
        save_text(self.path / "results.csv", to_csv(rows))


def to_csv(rows: list[dict]) -> str:
    """One line per row: id, kind, method, the grid values, the metrics,
    then every other setting of the cell."""
    grid = list(dict.fromkeys(k for r in rows for k in r.get("grid", {})))
    metrics = list(dict.fromkeys(k for r in rows for k in r["metrics"]))
    settings = list(dict.fromkeys(k for r in rows for k in r.get("settings", {})))
    settings = [k for k in settings if k not in grid]
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
    table are comparable. The grid may grow between runs.
    """
    from rsa_mlx.model import load

    if train_fn is None:
        from rsa_mlx.trainer import train as train_fn
    cells = expand(base, grid)
    sweep = Sweep(Path(path))
    _check_spec(sweep, base, description or {})
    sweep.path.mkdir(parents=True, exist_ok=True)
    save_json(
        sweep.path / SPEC_FILE,
        {"base": base, "evaluation": description or {}, "grid": grid},
    )
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
        metrics = evaluator(model, tokenizer, row["id"])
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
                grid = {
                    k: v
                    for k, v in cell.values
                    if k not in _SECOND_ONLY[cell.config.stage_names[1]]
                }
                row = {"id": key, "kind": "stage1", "method": cell.method}
                evaluate({**row, "grid": grid}, sweep.stage1_dir(cell))
            row = {"id": cell.id, "kind": "cell", "method": cell.method}
            row.update(grid=dict(cell.values), run=str(run_dir))
            row["settings"] = cell.config.result_settings()
            evaluate(row, run_dir, cell.config.merge)
            bar.advance()
    return list(sweep.rows())


def _check_spec(sweep: Sweep, base: dict, description: dict) -> None:
    path = sweep.path / SPEC_FILE
    if not path.exists():
        if (sweep.path / RESULTS).exists():
            raise ConfigError(f"{quote(sweep.path)}: results without {SPEC_FILE}")
        return
    saved = json.loads(path.read_text())
    same = json.loads(json.dumps({"base": base, "evaluation": description}))
    for key in ("base", "evaluation"):
        if saved.get(key) != same[key]:
            raise ConfigError(
                f"{quote(sweep.path)}: a sweep with another {key} is here; "
                "choose another --sweep-path (the grid may grow, nothing else)"
            )


@dataclass
class PromptEvaluator:
    """The sweep's evaluator for any model: ``rsa-mlx evaluate``'s metrics
    on held-out prompts (K samples each, scored by ``scorer``), the model
    shift from ``reference`` on those samples, and ``degenerate``: the
    share of answers the reference finds to be word salad (mean token
    log-probability below :data:`rsa_mlx.shift.DEGENERATE_LOGPROB`), which
    marks a collapsed model in the report."""

    prompts: str
    scorer: str = "demo"
    k: int = 4
    max_tokens: int = 64
    temperature: float = 1.0
    seed: int = 0
    unsafe_threshold: float | None = None
    reference: str | None = None  # the base model (set by the sweep)

    def description(self) -> dict:
        return {
            "evaluator": "prompts",
            **{k: v for k, v in self.__dict__.items() if not k.startswith("_")},
        }

    def check(self) -> None:
        """Read the prompts and the scorer now: errors before any training."""
        from rsa_mlx import evaluate as ev

        ev.check_sampling(
            k=self.k, max_tokens=self.max_tokens, temperature=self.temperature
        )
        self._records = ev.read_prompts(self.prompts)
        self._scorer = ev.load_scorer(self.scorer, self.unsafe_threshold)
        ev.check_scorer(self._scorer, self._records)

    def __call__(self, model, tokenizer, label: str) -> dict:
        from rsa_mlx import evaluate as ev
        from rsa_mlx.model import load
        from rsa_mlx.shift import DEGENERATE_LOGPROB, fluency

        if not hasattr(self, "_records"):
            self.check()
        if getattr(self, "_reference", None) is None:
            self._reference = load(self.reference)[0]
        result = ev.evaluate_model(
            model, tokenizer, self._records, self._scorer, self.k, self.max_tokens,
            self.temperature, self.seed, label=label, reference=self._reference,
        )  # fmt: skip
        answers = [row["responses"] for row in result["samples"]]
        logp = [
            x
            for row in fluency(self._reference, tokenizer, self._records, answers)
            for x in row
        ]
        summary = {k: v for k, v in result["summary"].items() if _is_number(v)}
        summary["degenerate"] = float(
            sum(not x >= DEGENERATE_LOGPROB for x in logp) / max(len(logp), 1)
        )
        return summary


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
