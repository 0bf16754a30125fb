"""Training configuration: every default in one place.

Values resolve as command line > YAML config (``-c``) > the defaults below,
as in mlx-lm: flags default to ``None`` and only values that were given
override. YAML keys use the field names (``batch_size``, ``lora_parameters``).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rsa_mlx.adapters import LoRAConfig
from rsa_mlx.errors import ConfigError
from rsa_mlx.losses import LOSSES
from rsa_mlx.risk import MEASURES, resolve_mu

STAGE_CHOICES = ("both", "reward", "safety")
ORDER_CHOICES = ("reward-first", "safety-first")


@dataclass
class TrainConfig:
    """All settings of ``python -m rsa_mlx.train`` / ``rsa-mlx align``."""

    # model and data
    model: str | None = None  # local folder or HF id; None: the bundled demo
    data: str | None = None  # one source for both stages (PKU-SafeRLHF rows)
    reward_data: str | None = None  # helpfulness pairs (stage "reward")
    safety_data: str | None = None  # safety pairs (stage "safety")
    stages: str = "both"  # both | reward | safety
    order: str = "reward-first"  # reward-first | safety-first (SACPO)
    # method (SPEC §3-§4)
    loss: str = "variant2"  # dpo | variant1 | variant2
    risk: str = "cvar"  # kl | cvar | erm | truncated
    mu: float | None = None  # risk level; None: 0.95 (cvar), 5 (erm)
    alpha: float = 0.5
    beta: float = 0.1  # reward-stage temperature
    lam: float = 4.0  # safety-stage temperature is beta / lam ...
    safety_beta: float | None = None  # ... unless set directly
    merge: float = 1.0  # P-SACPO merge ratio q of the final model
    length_normalize: bool = False
    # LoRA (mlx-lm spellings)
    num_layers: int = 16
    lora_parameters: dict = field(
        default_factory=lambda: {"rank": 8, "scale": 20.0, "dropout": 0.0}
    )
    # optimisation
    iters: int | None = None  # batches per stage; default: one epoch
    epochs: float | None = None
    batch_size: int = 4  # preference pairs per batch
    grad_accumulation_steps: int = 1
    learning_rate: float = 1e-5
    warmup: float = 0.1  # fraction of updates if < 1, else a number of updates
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_seq_length: int = 1024
    grad_checkpoint: bool = False
    compile: bool = True
    # run folder, reporting, checkpoints
    adapter_path: str | None = None  # run folder; default runs/<time>-<method>
    steps_per_report: int = 10
    steps_per_eval: int = 100  # 0: only at the end
    val_batches: int = -1  # -1: the whole validation split
    save_every: int = 100  # optimizer updates between checkpoints; 0: none
    keep_checkpoints: int = 2
    report_to: str | None = None  # wandb, swanlab (mlx-lm callbacks)
    project_name: str | None = None
    resume: bool = False
    seed: int = 0

    # ---------------------------------------------------------------- derived
    @property
    def stage_names(self) -> list[str]:
        if self.stages != "both":
            return [self.stages]
        first = ["reward", "safety"]
        return first if self.order == "reward-first" else first[::-1]

    def stage_beta(self, stage: str) -> float:
        """Reward stage: beta. Safety stage: safety_beta, else beta / lam
        (the SACPO convention), whichever order the stages run in."""
        if stage == "reward":
            return self.beta
        return (
            self.safety_beta if self.safety_beta is not None else self.beta / self.lam
        )

    def stage_data(self, stage: str) -> str:
        source = self.reward_data if stage == "reward" else self.safety_data
        source = source or self.data
        if source is None:
            raise ConfigError(
                f"no data for the {stage} stage: give --data, or --{stage}-data"
            )
        return source

    @property
    def lora(self) -> LoRAConfig:
        params = self.lora_parameters
        return LoRAConfig(
            rank=int(params.get("rank", 8)),
            scale=float(params.get("scale", 20.0)),
            dropout=float(params.get("dropout", 0.0)),
            num_layers=self.num_layers,
            keys=params.get("keys"),
        )

    def method_name(self) -> str:
        mu = resolve_mu(self.risk, self.mu)
        risk = self.risk if mu is None else f"{self.risk}{mu:g}"
        return f"{self.loss}-{risk}" if self.loss != "dpo" else "dpo"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------- validation
    def check(self) -> TrainConfig:
        def choice(key, options):
            if getattr(self, key) not in options:
                raise ConfigError(
                    f"{key}: {getattr(self, key)!r} is not one of {', '.join(options)}"
                )

        choice("stages", STAGE_CHOICES)
        choice("order", ORDER_CHOICES)
        choice("loss", LOSSES)
        choice("risk", MEASURES)
        try:
            resolve_mu(self.risk, self.mu)
        except ValueError as e:
            raise ConfigError(f"mu: {e}") from None
        positive = [
            "beta",
            "lam",
            "batch_size",
            "grad_accumulation_steps",
            "learning_rate",
        ]
        positive += ["max_seq_length", "steps_per_report"]
        for key in positive:
            if not getattr(self, key) > 0:
                raise ConfigError(
                    f"{key}: must be positive, got {getattr(self, key)!r}"
                )
        if self.safety_beta is not None and not self.safety_beta > 0:
            raise ConfigError(
                f"safety_beta: must be positive, got {self.safety_beta!r}"
            )
        if not 0.0 <= self.merge <= 1.0:
            raise ConfigError(
                f"merge: the merge ratio q must be in [0, 1], got {self.merge}"
            )
        if self.iters is not None and self.iters < 1:
            raise ConfigError(f"iters: must be at least 1, got {self.iters}")
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"epochs: must be positive, got {self.epochs}")
        if self.iters is not None and self.epochs is not None:
            raise ConfigError("iters and epochs: give one of them, not both")
        params = self.lora_parameters
        if unknown := set(params) - {"rank", "scale", "dropout", "keys"}:
            hint = (
                " (mlx-lm's LoRA uses scale, not alpha)" if "alpha" in unknown else ""
            )
            raise ConfigError(
                f"lora_parameters: unknown key {sorted(unknown)[0]!r}{hint}"
            )
        return self


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


_ACCEPT = {
    bool: (bool,),
    int: (int,),
    float: (int, float),
    str: (str, Path),
    dict: (dict,),
}


def _check_type(key: str, value):
    """Coerce ``value`` to the field's type, or raise a one-line error."""
    hint = typing.get_type_hints(TrainConfig)[key]
    args = typing.get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{key}: must not be null")
    base = next((a for a in args if a is not type(None)), hint)
    if not isinstance(value, _ACCEPT[base]) or (
        base is not bool and isinstance(value, bool)
    ):
        raise ConfigError(f"{key}: expected {base.__name__}, got {value!r}")
    return float(value) if base is float else str(value) if base is str else value


def load_yaml(path: str | Path) -> dict:
    """Read a YAML config; unknown keys are errors (not silently ignored)."""
    path = Path(path)
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None)
        raise ConfigError(
            f"{path}{line}: malformed YAML" + (f" ({problem})" if problem else "")
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings")
    for key in data:
        if key not in _FIELDS:
            raise ConfigError(f"{path}: unknown setting {key!r}")
    return data


def resolve(
    cli: dict | None = None, yaml_path: str | Path | None = None
) -> TrainConfig:
    """Defaults < YAML < command line (``None`` on the command line = not given)."""
    layers = [load_yaml(yaml_path) if yaml_path is not None else {}]
    layers.append({k: v for k, v in (cli or {}).items() if v is not None})
    merged: dict = {}
    for layer in layers:
        for key, value in layer.items():
            if key == "lora_parameters" and isinstance(value, dict):
                # partial LoRA settings fill in the rest from lower layers
                base = merged.get(key) or _FIELDS[key].default_factory()
                value = {**base, **value}
            merged[key] = value
    values = {}
    for key, value in merged.items():
        if key not in _FIELDS:
            raise ConfigError(f"unknown setting {key!r}")
        values[key] = _check_type(key, value)
    return TrainConfig(**values).check()
