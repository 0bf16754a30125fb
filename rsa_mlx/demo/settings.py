"""The demo's settings: its base model, the methods it trains, the budget of
a full and a quick run, and each method's training config."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from rsa_mlx.study.methods import METHODS
from rsa_mlx.tuner.config import TrainConfig

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
