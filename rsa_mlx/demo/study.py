"""The demo study: ``python -m rsa_mlx.train --study [--quick]``.

A seeded sweep (:mod:`rsa_mlx.study.sweep`) of the stepwise methods on the demo
world: four methods x four stage-2 temperatures (SACPO's grid of beta/lambda)
x two learning rates x three seeds, stage 1 shared across temperatures,
each model evaluated exactly (teacher-forced kind probabilities) and by its
model shift from the base model on its own sampled answers. The report
(:mod:`rsa_mlx.study.analysis`) gives intervals over seeds, each method's Pareto
front, dominance verdicts with collapsed models set aside, and whether the
world has the regime the paper targets: a catastrophic answer that is rare
under the stage-1 model but costly.

Started again with the same ``--adapter-path``, the study continues where it
stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

from rsa_mlx.demo import world
from rsa_mlx.demo.behaviour import kind_probabilities
from rsa_mlx.demo.evaluation import exact_summary
from rsa_mlx.demo.scorer import DemoScorer
from rsa_mlx.demo.settings import BASE_MODEL, Budget
from rsa_mlx.demo.world import write_dataset
from rsa_mlx.eval.evaluate import evaluate_model
from rsa_mlx.eval.prompts import PromptRecord
from rsa_mlx.study.analysis import report
from rsa_mlx.study.methods import STEPWISE, parse_methods
from rsa_mlx.study.stats import PROBABILITY, mean_ci
from rsa_mlx.study.sweep import run_sweep
from rsa_mlx.tuner.config import TrainConfig
from rsa_mlx.tuner.model import load
from rsa_mlx.util import progress
from rsa_mlx.util.atomic import save_text

HARMS = ["p_catastrophic", "mean_cost", "unsafe_rate"]


@dataclass
class Study:
    """The grid and budget of a study (``QUICK_STUDY``: about 3 minutes)."""

    methods: tuple[str, ...] = STEPWISE
    safety_betas: tuple[float, ...] = (0.1, 0.05, 0.025, 0.01)
    learning_rates: tuple[float, ...] = (3e-5, 1e-4)
    seeds: tuple[int, ...] = (0, 1, 2)
    iters: int = Budget.iters
    samples: int = 4  # sampled answers per held-out prompt (for the shift)
    world: str = "reward"  # helpfulness raters (rsa_mlx.demo.world.RATERS)

    def grid(self) -> dict[str, list]:
        return {
            "method": list(self.methods),
            "learning_rate": list(self.learning_rates),
            "seed": list(self.seeds),
            "safety_beta": list(self.safety_betas),
        }


QUICK_STUDY = Study(
    methods=("sacpo", "rsa-cvar"),
    safety_betas=(0.1, 0.01),
    learning_rates=(1e-4,),
    seeds=(0, 1, 2),
    iters=60,
    samples=2,
)


class DemoEvaluator:
    """Exact demo-world metrics plus the model shift from the base model."""

    def __init__(self, data: Path, samples: int, seed: int = 0):
        self.requests = world.read_test_requests(data / "test.jsonl")
        self.samples, self.seed = samples, seed
        self._reference = None

    def description(self) -> dict:
        return {"evaluator": "demo", "samples": self.samples, "seed": self.seed}

    def __call__(self, model, tokenizer, label: str) -> dict:

        if self._reference is None:
            self._reference = load(str(BASE_MODEL))[0]
        metrics = exact_summary(kind_probabilities(model, tokenizer, self.requests))
        records = [
            PromptRecord(r.text, None, {"harmful_request": r.harmful})
            for r in self.requests
        ]
        sampled = evaluate_model(
            model, tokenizer, records, DemoScorer(), k=self.samples, max_tokens=48,
            seed=self.seed, label=label, reference=self._reference,
        )["summary"]  # fmt: skip
        metrics.update({k: v for k, v in sampled.items() if k.startswith("shift_")})
        metrics["sampled_unsafe_rate"] = sampled["unsafe_rate"]
        return metrics


def run_study(
    cfg: TrainConfig,
    settings: dict,
    quick: bool,
    methods: str | None,
    world_rater: str = "reward",
):
    """Run (or continue) the demo study and write its report; with
    ``world_rater="rare"`` on the rare-catastrophe world (:data:`RATERS`)."""

    study = replace(QUICK_STUDY if quick else Study(), world=world_rater)
    if methods:
        study = replace(study, methods=tuple(parse_methods(methods)))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(settings.get("adapter_path") or Path("runs") / f"study-{stamp}")
    out.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    world_name = "" if study.world == "reward" else f", {study.world} world"
    progress.echo(
        f"rsa_mlx demo study{' (quick)' if quick else ''}{world_name}: output in {out}"
    )
    data = out / "data"
    if not (data / "test.jsonl").exists():
        write_dataset(data, 0, Budget.pairs_per_request, study.world)
    base, grid = sweep_spec(study, data, settings)
    evaluator = DemoEvaluator(data, study.samples)
    description = evaluator.description()
    if study.world != "reward":  # the default world's studies stay comparable
        description["world"] = study.world
    rows = run_sweep(base, grid, evaluator, out, description)
    result = report(rows, out, HARMS, "rsa_mlx demo study", world.RANGES)
    regime = world_regime(rows)
    with open(out / "report.md", "a") as f:
        f.write("\n## Does the demo world have the paper's regime?\n\n" + regime + "\n")
    _finish(out, rows, result, regime, time.perf_counter() - tic)
    return rows


def sweep_spec(study: Study, data: Path, settings: dict) -> tuple[dict, dict]:
    """The sweep's base settings and grid: the study's budget, the user's
    explicit flags on top; a flag fixes its setting, so it leaves the grid."""
    budget = Budget()
    base = {
        "model": str(BASE_MODEL),
        "data": str(data),
        "iters": study.iters,
        "batch_size": budget.batch_size,
        "num_layers": budget.num_layers,
        "lora_parameters": dict(budget.lora_parameters),
        "warmup": budget.warmup,
        "max_seq_length": 128,
        "steps_per_report": max(study.iters // 2, 1),
        "steps_per_eval": 0,
        "val_batches": 0,
        "save_every": max(study.iters // 4, 1),
        "keep_checkpoints": 1,
    }
    user = {
        k: v
        for k, v in settings.items()
        if v is not None and k not in ("adapter_path", "loss", "risk", "stages")
    }
    base.update(user)
    grid = {k: v for k, v in study.grid().items() if k not in user}
    return base, grid


def _finish(out: Path, rows: list[dict], result: dict, regime: str, seconds: float):
    """Log the session's wall time and show the table, verdicts and regime."""
    log = out / "wall_time.txt"  # one line per session: a resumed study adds up
    done = sum(r["kind"] == "cell" for r in rows)
    previous = log.read_text() if log.exists() else ""
    save_text(log, previous + f"{seconds:.0f} s, {done} cells done at the end\n")
    echo = progress.echo
    echo("\n" + result["table"])
    echo("\n" + "\n".join(f"- {line}" for line in result["verdict"]))
    echo("\n" + regime)
    echo(
        f"\nwall time {seconds:.0f}s. Report: {out / 'report.md'}, plot: {out / 'plot.png'}"
    )


def world_regime(rows: list[dict]) -> str:
    """P(catastrophic) of the base model and of the stage-1 models: the
    paper targets a behaviour that is rare under the stage-1 model (here:
    below 10%) but costly (catastrophic cost 10 against 1 for a mild one)."""

    base = next((r for r in rows if r["kind"] == "base"), None)
    stage1 = [r for r in rows if r["kind"] == "stage1"]
    if base is None or not stage1:
        return "(no base or stage-1 evaluation yet)"
    b = base["metrics"]["p_catastrophic"]
    by_lr: dict = {}
    for r in stage1:
        by_lr.setdefault(r["grid"].get("learning_rate"), []).append(
            r["metrics"]["p_catastrophic"]
        )
    parts = [
        f"lr {lr:g}: {mean_ci(v, PROBABILITY)} over {len(v)} stage-1 runs"
        for lr, v in by_lr.items()
    ]
    rare = all(max(v) < 0.1 for v in by_lr.values())
    cost = {k.name: k.cost for k in world.KINDS}
    return (
        f"P(catastrophic) of the base model {b:.4f}; after stage 1 (helpfulness): "
        + "; ".join(parts)
        + f". A catastrophic answer costs {cost['catastrophic']:g}, a mild one "
        f"{cost['mild']:g}. "
        + (
            "The catastrophic answer is rare under every stage-1 model: the regime "
            "the paper targets."
            if rare
            else "Stage 1 makes the catastrophic answer common (10% or more) for "
            "some settings: outside the rare-event regime the paper targets, where "
            "a tail-risk regulariser should matter most."
        )
    )
