"""The grid of a sweep: its cells, each one full training setting, and the
keys that let cells share work.

A *cell* is one full setting (method, stage-2 temperature, learning rate,
merge ratio q, seed, ...). Stage 1 does not depend on the stage-2 settings
(the safety temperature and data, the merge ratio), so cells with the same
:func:`stage1_key` share one trained stage 1; cells that differ only in q
share one trained run (:attr:`Cell.train_key`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass

from rsa_mlx.study.methods import method_settings
from rsa_mlx.tuner.config import FIELDS, RESULT_FREE, TrainConfig, resolve
from rsa_mlx.util.errors import ConfigError
from rsa_mlx.util.yaml_config import yaml_value

__all__ = ["Cell", "expand", "parse_grid", "stage1_key"]

# Settings that only the second stage (or the final merge) depends on, by
# which stage comes second.
SECOND_ONLY = {
    "safety": ("lam", "safety_beta", "safety_data", "merge"),
    "reward": ("beta", "reward_data", "merge"),
}


def parse_grid(
    items: list[str] | tuple[str, ...], flag: str = "--grid"
) -> dict[str, list]:
    """``["safety_beta=0.1,0.05", "seed=0,1"]`` -> ``{key: [values]}``, each
    value typed as its setting (YAML scalars: ``3e-5``, ``true``); an empty
    value (``0.1,,``) is refused. ``flag`` names the option in errors."""
    grid: dict[str, list] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not values.strip():
            raise ConfigError(f"{flag} {item!r}: expected KEY=V1,V2,...")
        parts = [v.strip() for v in values.split(",")]
        if "" in parts:  # "0.1,,": a cell with the default value, silently
            raise ConfigError(
                f"{flag} {item!r}: an empty value (a stray comma?); give "
                "KEY=V1,V2,... with a value between every two commas"
            )
        grid[key] = [yaml_value(v) for v in parts]
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
    for key in (*SECOND_ONLY["reward"], *SECOND_ONLY["safety"], "data", "stages"):
        settings.pop(key, None)
    settings.update(
        first=names[0],
        first_beta=cfg.stage_beta(names[0]),
        first_data=cfg.stage_data(names[0]),
    )
    return f"stage1-{_digest(settings)}"


def expand(base: dict, grid: dict[str, list]) -> list[Cell]:
    """Every combination of the grid's values over the ``base`` settings.

    ``method`` sets what the method defines (:mod:`rsa_mlx.study.methods`);
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
