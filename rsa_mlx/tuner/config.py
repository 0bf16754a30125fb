"""Training configuration: every setting, its default and its help, in one place.

Values resolve as command line > YAML config (``-c``) > the defaults below,
as in mlx-lm: flags default to ``None`` and only values that were given
override. YAML keys use the field names (``batch_size``, ``lora_parameters``).
The command-line options of ``python -m rsa_mlx.train`` / ``rsa-mlx align``
are generated from these fields (:func:`rsa_mlx.cli.align.train_options`), so a
default or a help text is written once.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

from rsa_mlx.ops.losses import DEFAULT_ALPHA, DEFAULT_BETA, DEFAULT_LOSS, LOSSES
from rsa_mlx.ops.risk import DEFAULT_MEASURE, MEASURES, resolve_mu
from rsa_mlx.util.errors import ConfigError
from rsa_mlx.util.yaml_config import read_yaml


@dataclass
class LoRAConfig:
    """LoRA settings of one stage (mlx-lm's ``lora_parameters``).

    ``scale`` multiplies the update directly (mlx-lm convention, not
    ``alpha / rank``). ``num_layers = -1`` adapts every block; ``keys`` picks
    module paths inside a block (e.g. ``["self_attn.q_proj"]``), default all
    linear layers. These are the one source of the LoRA defaults.
    """

    rank: int = field(default=8, metadata={"help": "LoRA rank."})
    scale: float = field(
        default=20.0, metadata={"help": "LoRA scale (multiplies the update)."}
    )
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    num_layers: int = 16
    keys: list[str] | None = field(
        default=None,
        metadata={
            "help": "Comma-separated module paths in a block, e.g. "
            "self_attn.q_proj,self_attn.v_proj.",
            "default_text": "all linear layers",
        },
    )

    def lora_parameters(self) -> dict:
        params = {"rank": self.rank, "scale": self.scale, "dropout": self.dropout}
        if self.keys is not None:
            params["keys"] = list(self.keys)
        return params


STAGE_CHOICES = ("both", "reward", "safety")
ORDER_CHOICES = ("reward-first", "safety-first")
_LORA = LoRAConfig()


def setting(default=None, help: str = "", *, factory=None, **meta):
    """A config field with its help text (and, for the CLI: ``choices``,
    ``default_text``, ``cli=False`` to leave it off the command line)."""
    meta["help"] = help
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """All settings of ``python -m rsa_mlx.train`` / ``rsa-mlx align``."""

    # model and data
    model: str | None = setting(
        None,
        "Base model: local mlx-lm folder or Hugging Face id.",
        default_text="the bundled demo",
    )
    data: str | None = setting(
        None,
        "Data for both stages (PKU-SafeRLHF rows, or a folder with reward/ and "
        "safety/): file, folder or HF dataset id.",
    )
    reward_data: str | None = setting(None, "Helpfulness pairs for the reward stage.")
    safety_data: str | None = setting(None, "Safety pairs for the safety stage.")
    stages: str = setting("both", "Stages to train.", choices=STAGE_CHOICES)
    order: str = setting(
        "reward-first", "Stage order when training both.", choices=ORDER_CHOICES
    )
    # method (docs/method.md §3-§4)
    loss: str = setting(
        DEFAULT_LOSS, "dpo, variant1 (TDPO1/Ra-DPO1) or variant2.", choices=LOSSES
    )
    risk: str = setting(DEFAULT_MEASURE, "Token-level risk measure.", choices=MEASURES)
    mu: float | None = setting(
        None,
        "Risk level (not for kl).",
        default_text="0.95 for cvar and truncated, 5 for erm",
    )
    alpha: float = setting(DEFAULT_ALPHA, "variant2's weight of the risk difference.")
    beta: float = setting(DEFAULT_BETA, "Reward-stage temperature.")
    lam: float = setting(4.0, "Safety-stage temperature is beta/lam (SACPO).")
    safety_beta: float | None = setting(
        None, "Safety-stage temperature, directly.", default_text="beta/lam"
    )
    merge: float = setting(1.0, "Merge ratio q of the final model, W1 + q dW2.")
    length_normalize: bool = setting(False, "Divide sequence sums by response length.")
    sft_weight: float = setting(
        0.0,
        "Weight of an NLL term on the chosen answer, per token (RPO); 0: none.",
    )
    # LoRA (mlx-lm spellings; --lora-* flags fill lora_parameters)
    num_layers: int = setting(_LORA.num_layers, "Blocks to adapt, -1 for all.")
    lora_parameters: dict = setting(
        help="LoRA rank, scale, dropout and keys.",
        factory=_LORA.lora_parameters,
        cli=False,
    )
    # optimisation
    iters: int | None = setting(None, "Batches per stage.", default_text="one epoch")
    epochs: float | None = setting(None, "Epochs per stage (instead of --iters).")
    batch_size: int = setting(4, "Preference pairs per batch.")
    grad_accumulation_steps: int = setting(1, "Batches per optimizer update.")
    learning_rate: float = setting(1e-5, "AdamW learning rate (cosine decay).")
    warmup: float = setting(
        0.1, "Linear warm-up: a fraction of the updates if < 1, else updates."
    )
    weight_decay: float = setting(0.0, "AdamW weight decay.")
    bias_correction: bool = setting(
        False,
        "Adam's bias correction, as torch and TRL do; off is mlx-lm's default, "
        "where early updates are 3-6x larger at the same learning rate.",
    )
    max_grad_norm: float = setting(1.0, "Gradient clipping norm; 0: none.")
    max_seq_length: int = setting(1024, "Longest prompt + response in tokens.")
    grad_checkpoint: bool = setting(
        False, "Recompute activations in the backward to save memory."
    )
    compile: bool = setting(True, "mx.compile the training step.")
    # run folder, reporting, checkpoints
    adapter_path: str | None = setting(
        None, "Run folder.", default_text="runs/<time>-<method>"
    )
    steps_per_report: int = setting(10, "Iterations between progress reports.")
    steps_per_eval: int = setting(
        100, "Iterations between validations; 0: only at the end."
    )
    val_batches: int = setting(
        -1, "Validation batches; -1: the whole split, 0: no validation."
    )
    save_every: int = setting(
        100, "Iterations between checkpoints; 0: none (Ctrl-C still saves)."
    )
    keep_checkpoints: int = setting(2, "Checkpoints kept per stage.")
    report_to: str | None = setting(None, "wandb and/or swanlab (comma-separated).")
    project_name: str | None = setting(None, "Project name for --report-to.")
    resume: bool = setting(
        False, "Continue the run in --adapter-path from its last checkpoint."
    )
    seed: int = setting(0, "Seed of adapter init, dropout and batch order.")

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
        return LoRAConfig(**self.lora_parameters, num_layers=self.num_layers)

    def method_name(self) -> str:
        mu = resolve_mu(self.risk, self.mu)
        risk = self.risk if mu is None else f"{self.risk}{mu:g}"
        return f"{self.loss}-{risk}" if self.loss != "dpo" else "dpo"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def result_settings(self) -> dict:
        """The settings that change what training computes (see RESULT_FREE)."""
        return {k: v for k, v in self.to_dict().items() if k not in RESULT_FREE}

    def with_resolved_paths(self) -> TrainConfig:
        """Local model and data paths made absolute (hub ids stay ids), so
        a run folder works from any directory."""
        changes = {}
        for key in ("model", "data", "reward_data", "safety_data"):
            value = getattr(self, key)
            if value is not None and Path(value).expanduser().exists():
                changes[key] = str(Path(value).expanduser().resolve())
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------- validation
    def check(self) -> TrainConfig:
        """Check every value; raise :class:`ConfigError` naming the first bad one."""
        for f in dataclasses.fields(self):
            options = f.metadata.get("choices")
            if options and getattr(self, f.name) not in options:
                raise ConfigError(
                    f"{f.name}: {getattr(self, f.name)!r} is not one of "
                    f"{', '.join(options)}"
                )
        if self.risk == "kl" and self.mu is not None:
            raise ConfigError(
                "mu: the kl measure has no level; drop --mu, or choose "
                "--risk cvar, erm or truncated"
            )
        try:
            resolve_mu(self.risk, self.mu)
        except ValueError as e:
            raise ConfigError(f"mu: {e}") from None
        for key in ("beta", "lam", "batch_size", "grad_accumulation_steps"):
            _positive(key, getattr(self, key))
        for key in ("learning_rate", "max_seq_length", "steps_per_report"):
            _positive(key, getattr(self, key))
        for key in ("alpha", "weight_decay", "max_grad_norm", "warmup", "sft_weight"):
            _at_least(key, getattr(self, key), 0)
        for key in ("steps_per_eval", "save_every"):
            _at_least(key, getattr(self, key), 0)
        _at_least("keep_checkpoints", self.keep_checkpoints, 1)
        _at_least("val_batches", self.val_batches, -1)
        if self.safety_beta is not None:
            _positive("safety_beta", self.safety_beta)
        if not 0.0 <= self.merge <= 1.0:
            raise ConfigError(
                f"merge: the merge ratio q must be in [0, 1], got {self.merge}"
            )
        if self.iters is not None and self.iters < 1:
            raise ConfigError(f"iters: must be at least 1, got {self.iters}")
        if self.epochs is not None:
            _positive("epochs", self.epochs)
        if self.iters is not None and self.epochs is not None:
            raise ConfigError("iters and epochs: give one of them, not both")
        if self.num_layers == 0 or self.num_layers < -1:
            raise ConfigError(
                f"num_layers: must be -1 (all) or at least 1, got {self.num_layers}"
            )
        self._check_lora()
        return self

    def _check_lora(self) -> None:
        params = self.lora_parameters
        known = {f.name for f in dataclasses.fields(LoRAConfig)} - {"num_layers"}
        if unknown := set(params) - known:
            hint = (
                " (mlx-lm's LoRA uses scale, not alpha)" if "alpha" in unknown else ""
            )
            raise ConfigError(
                f"lora_parameters: unknown key {sorted(unknown)[0]!r}{hint}"
            )
        rank, scale = params.get("rank", _LORA.rank), params.get("scale", _LORA.scale)
        dropout = params.get("dropout", _LORA.dropout)
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ConfigError(f"lora rank: must be an integer >= 1, got {rank!r}")
        if not _number(scale) or not math.isfinite(scale):
            raise ConfigError(f"lora scale: must be a finite number, got {scale!r}")
        if not _number(dropout) or not 0.0 <= dropout < 1.0:
            raise ConfigError(f"lora dropout: must be in [0, 1), got {dropout!r}")
        keys = params.get("keys")
        if keys is not None and (
            not isinstance(keys, list)
            or not keys
            or not all(isinstance(k, str) and k for k in keys)
        ):
            raise ConfigError(
                f"lora keys: must be a non-empty list of module paths, got {keys!r}"
            )


# Settings that do not change what a run computes: resume may change them.
RESULT_FREE = frozenset(
    {
        "adapter_path",
        "resume",
        "compile",
        "grad_checkpoint",
        "steps_per_report",
        "steps_per_eval",
        "val_batches",
        "save_every",
        "keep_checkpoints",
        "report_to",
        "project_name",
    }
)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive(key: str, value) -> None:
    if not value > 0:
        raise ConfigError(f"{key}: must be positive, got {value!r}")


def _at_least(key: str, value, low) -> None:
    if not value >= low:
        raise ConfigError(f"{key}: must be at least {low}, got {value!r}")


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


_ACCEPT = {
    bool: (bool,),
    int: (int,),
    float: (int, float),
    str: (str, Path),
    dict: (dict,),
}


def field_type(key: str, cls: type = TrainConfig) -> type:
    """A dataclass field's type without ``None`` (``float | None`` -> ``float``)."""
    hint = typing.get_type_hints(cls)[key]
    return next((a for a in typing.get_args(hint) if a is not type(None)), hint)


def _check_type(key: str, value):
    """Coerce ``value`` to the field's type, or raise a one-line error."""
    hint = typing.get_type_hints(TrainConfig)[key]
    if value is None:
        if type(None) in typing.get_args(hint):
            return None
        raise ConfigError(f"{key}: must not be null")
    base = field_type(key)
    if not isinstance(value, _ACCEPT[base]) or (
        base is not bool and isinstance(value, bool)
    ):
        raise ConfigError(f"{key}: expected {base.__name__}, got {value!r}")
    return float(value) if base is float else str(value) if base is str else value


def load_yaml(path: str | Path) -> dict:
    """Read a YAML config; unknown keys are errors (not silently ignored)."""
    data = read_yaml(path)
    for key in data:
        if key not in FIELDS:
            raise ConfigError(f"{str(Path(path))!r}: unknown setting {key!r}")
    return data


def resolve(
    cli: dict | None = None,
    yaml_path: str | Path | None = None,
    base: dict | None = None,
) -> TrainConfig:
    """Defaults < ``base`` < YAML < command line (``None`` = not given)."""
    layers = [base or {}, load_yaml(yaml_path) if yaml_path is not None else {}]
    layers.append({k: v for k, v in (cli or {}).items() if v is not None})
    merged: dict = {}
    for layer in layers:
        for key, value in layer.items():
            if key == "lora_parameters" and isinstance(value, dict):
                # partial LoRA settings fill in the rest from lower layers
                value = {**(merged.get(key) or FIELDS[key].default_factory()), **value}
            merged[key] = value
    values = {}
    for key, value in merged.items():
        if key not in FIELDS:
            raise ConfigError(f"unknown setting {key!r}")
        values[key] = _check_type(key, value)
    return TrainConfig(**values).check()


def differences(saved: TrainConfig, given: TrainConfig) -> list[str]:
    """``key: saved -> given`` for every result-changing setting that differs."""
    a, b = saved.result_settings(), given.result_settings()
    return [f"{k} {a[k]!r} -> {b[k]!r}" for k in a if a[k] != b[k]]
