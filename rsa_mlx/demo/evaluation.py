"""Evaluate the demo's models: exact expectations over the held-out prompts
(teacher-forced probabilities of each kind of answer, no sampling noise) and
sampled answers scored by the demo's rule scorer."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rsa_mlx.demo import world
from rsa_mlx.demo.behaviour import kind_probabilities
from rsa_mlx.demo.scorer import DemoScorer
from rsa_mlx.demo.settings import BASE_MODEL, MERGED
from rsa_mlx.eval.evaluate import evaluate_model
from rsa_mlx.eval.metrics import weighted_cvar
from rsa_mlx.eval.prompts import PromptRecord
from rsa_mlx.tuner.model import load
from rsa_mlx.util import progress
from rsa_mlx.util.atomic import save_json

__all__ = ["evaluate_all", "evaluate_one", "exact_summary"]


def exact_summary(probs: dict) -> dict:
    """Helpfulness and harm as exact expectations over held-out prompts.

    Each prompt counts equally; a response's cost is its kind's cost
    (non-canonical text: reward 0, cost 0).
    """
    costs, weights = [], []
    rows = probs["per_request"]
    for row in rows:
        for kind, p in row.items():
            costs.append(0.0 if kind == "other" else world.KIND[kind].cost)
            weights.append(p / len(rows))
    costs, weights = np.array(costs), np.array(weights)
    return {
        "helpfulness": probs["expected"]["helpfulness"],
        "unsafe_rate": float(weights[costs > 0].sum()),
        "mean_cost": probs["expected"]["mean_cost"],
        "cvar_0.9": weighted_cvar(costs, weights, 0.9),
        "cvar_0.99": weighted_cvar(costs, weights, 0.99),
        "p_catastrophic": probs["expected"]["p_catastrophic"],
        "p_other": float(np.mean([r["other"] for r in rows])),
    }


def evaluate_one(
    model, tokenizer, requests, records, samples: int, seed: int, label: str = "model"
) -> dict:
    probs = kind_probabilities(model, tokenizer, requests)
    sampled = evaluate_model(
        model,
        tokenizer,
        records,
        DemoScorer(),
        k=samples,
        max_tokens=48,  # every canonical answer is at most 17 tokens
        temperature=1.0,
        seed=seed,
        label=label,
    )
    kinds = {}
    for row in sampled["samples"]:
        for s in row["scores"]:
            kinds[s["kind"]] = kinds.get(s["kind"], 0) + 1
    return {
        "exact": exact_summary(probs),
        "sampled": {**sampled["summary"], "kinds": kinds},
        "kinds": {"benign": probs["benign"], "harmful": probs["harmful"]},
        "samples": sampled["samples"],
    }


def evaluate_all(out: Path, runs: dict, budget, seed: int, on_model=None) -> dict:
    """Every model evaluated the same way; per-model JSON under ``eval/``.

    ``on_model()`` is called after each model (the demo's overall progress).
    """
    requests = world.read_test_requests(out / "data" / "test.jsonl")
    records = [
        PromptRecord(r.text, None, {"harmful_request": r.harmful}) for r in requests
    ]
    targets = [("base", None, None)]
    for name, run in runs.items():
        targets.append((name, run.get("adapter", run["run_dir"]), None))
        if name == MERGED and len(run["stages"]) > 1:
            for q in budget.merge_points:
                if q != 1.0:
                    targets.append((f"{name} q={q:g}", run["run_dir"], q))
    DemoScorer().check(records)
    (out / "eval").mkdir(exist_ok=True)
    results = {}
    for name, adapter, merge in targets:
        model, tokenizer = load(str(BASE_MODEL), adapter_path=adapter, merge=merge)
        result = evaluate_one(
            model, tokenizer, requests, records, budget.samples, seed, label=name
        )
        save_json(out / "eval" / f"{name.replace(' ', '_')}.json", result)
        result.pop("samples")
        results[name] = result
        e = result["exact"]
        progress.echo(
            f"  {name:18s} helpfulness {e['helpfulness']:.3f}  mean cost {e['mean_cost']:.3f}"
            f"  P(catastrophic) {e['p_catastrophic']:.4f}"
        )
        if on_model is not None:
            on_model()
    return results
