"""The bundled demo: ``python -m rsa_mlx.train`` with no arguments.

Offline and in minutes on a laptop CPU, it aligns the bundled base model of
the demo world (:mod:`rsa_mlx.demo.world`) for helpfulness and then for
safety with RSA, and, at the same budget, with the baselines:

=========  ==========================================================
dpo        helpfulness only (one stage, DPO)
sacpo      stepwise DPO then DPO (SACPO)
tdpo       stepwise TDPO2 (variant2 with the KL regulariser)
rsa-cvar   stepwise Ra-DPO2 with CVaR (RSA)
rsa-erm    stepwise Ra-DPO2 with entropic risk (RSA)
=========  ==========================================================

plus a sweep of the merge ratio q of the RSA model (P-SACPO style). Every
model is evaluated the same way: exact, teacher-forced probabilities of each
kind of answer (helpfulness, mean cost, probability of a catastrophic answer,
no sampling noise) and K sampled answers per held-out prompt (unsafe rate,
CVaR of the cost). The run folder holds the data, the adapters,
``results.json``, ``report.md``, ``plot.svg`` and ``plot.png``.

Progress is shown for the demo as a whole (methods trained, models
evaluated, with an ETA) by :mod:`rsa_mlx.progress`; its lines are printed
with :func:`rsa_mlx.progress.echo`, above any live bars.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from rsa_mlx import progress
from rsa_mlx.config import TrainConfig
from rsa_mlx.methods import METHODS

ASSETS = Path(__file__).parent / "assets"
BASE_MODEL = ASSETS / "base"

MERGED = "rsa-cvar"  # the model whose merge ratio is swept
# Trained again with the next seed, so the report shows how much a number
# moves between two seeds (for intervals: ``--study``).
SEED_CHECK = ("sacpo", "rsa-cvar")


@dataclass
class Budget:
    """The demo's defaults; explicit command-line flags override them."""

    iters: int = 240
    batch_size: int = 8
    learning_rate: float = 3e-5
    num_layers: int = -1
    lora_parameters: dict = field(
        default_factory=lambda: {"rank": 8, "scale": 4.0, "dropout": 0.0}
    )
    warmup: float = 0.1
    steps_per_report: int = 40
    steps_per_eval: int = 120
    save_every: int = 0
    pairs_per_request: int = 6
    samples: int = 16  # sampled answers per held-out prompt
    merge_points: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)


QUICK = Budget(
    iters=60,
    steps_per_report=20,
    steps_per_eval=0,
    samples=4,
    pairs_per_request=3,
    merge_points=(0.0, 0.5, 1.0),
)


def method_config(
    cfg_defaults: TrainConfig,
    budget: Budget,
    name: str,
    data: Path,
    out: Path,
    settings: dict,
    folder: str | None = None,
) -> TrainConfig:
    """The demo's settings for ``name``, with the user's explicit flags on top."""
    base = {
        "model": str(BASE_MODEL),
        "data": str(data),
        "iters": budget.iters,
        "batch_size": budget.batch_size,
        "learning_rate": budget.learning_rate,
        "num_layers": budget.num_layers,
        "lora_parameters": dict(budget.lora_parameters),
        "warmup": budget.warmup,
        "steps_per_report": budget.steps_per_report,
        "steps_per_eval": budget.steps_per_eval,
        "save_every": budget.save_every,
        "max_seq_length": 128,
        "adapter_path": str(out / "methods" / (folder or name)),
    }
    base.update(METHODS[name])
    user = {k: v for k, v in settings.items() if v is not None and k != "adapter_path"}
    if "lora_parameters" in user:
        user["lora_parameters"] = {**base["lora_parameters"], **user["lora_parameters"]}
    for key in ("loss", "risk", "stages"):  # what defines the method is not overridable
        user.pop(key, None)
    if METHODS[name]["risk"] == "kl":
        user.pop("mu", None)
    return replace(cfg_defaults, **{**base, **user}).check()


def evaluation_count(chosen: list[str], budget: Budget) -> int:
    """Models the demo evaluates: the base, each method, the merge sweep,
    the second seeds."""
    sweep = [q for q in budget.merge_points if q != 1.0] if MERGED in chosen else []
    return 1 + len(chosen) + len(sweep) + len(reseeded(chosen))


def reseeded(chosen: list[str]) -> list[str]:
    return [m for m in SEED_CHECK if m in chosen]


def run(
    cfg: TrainConfig, settings: dict, quick: bool = False, methods: str | None = None
):
    """Run the demo end to end and write the report; return the results."""
    from rsa_mlx.atomic import save_json
    from rsa_mlx.demo.report import write_report
    from rsa_mlx.demo.world import write_dataset
    from rsa_mlx.trainer import train

    chosen = (
        list(METHODS) if methods is None else [m.strip() for m in methods.split(",")]
    )
    unknown = [m for m in chosen if m not in METHODS]
    if unknown:
        from rsa_mlx.config import ConfigError

        raise ConfigError(
            f"unknown demo method {unknown[0]!r}; choose from {', '.join(METHODS)}"
        )
    budget = QUICK if quick else Budget()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(settings.get("adapter_path") or Path("runs") / f"demo-{stamp}")
    if (out / "results.json").exists():
        from rsa_mlx.config import ConfigError

        raise ConfigError(
            f"{out}: a demo run already exists here; choose another --adapter-path"
        )
    out.mkdir(parents=True, exist_ok=True)
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

    runs = {}
    # Helpfulness-only DPO is exactly SACPO's first stage (same data, seed
    # and settings): with both chosen, train it once and evaluate that stage.
    shared = {"dpo"} if {"dpo", "sacpo"} <= set(chosen) else set()
    trainings = len(chosen) - len(shared) + len(reseeded(chosen))
    total = trainings + evaluation_count(chosen, budget)
    with progress.task("demo: train and evaluate", total, "models") as overall:
        for i, name in enumerate(chosen, 1):
            if name in shared:
                continue
            method_cfg = method_config(cfg, budget, name, data, out, settings)
            echo(
                f"\n== [{i}/{len(chosen)}] training {name}: "
                f"{' -> '.join(method_cfg.stage_names)} ({method_cfg.method_name()})"
            )
            runs[name] = train(method_cfg)
            overall.advance()
        for name in reseeded(chosen):
            again = {**settings, "seed": seed + 1}
            method_cfg = method_config(
                cfg, budget, name, data, out, again, folder=f"{name}-seed{seed + 1}"
            )
            echo(
                f"\n== training {name} again with seed {seed + 1} (seed-to-seed change)"
            )
            runs[f"{name} seed={seed + 1}"] = train(method_cfg)
            overall.advance()
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


def _evaluate(out: Path, runs: dict, shared: set, budget: Budget, seed: int, task):
    from rsa_mlx.demo.report import evaluate_all

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
