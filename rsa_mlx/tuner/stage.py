"""One stage of a run (docs/method.md §1): its data, adapter, optimizer and schedule,
objective, checkpoints and validation.

A stage adds one LoRA adapter to the model (earlier stages' adapters stay
on, frozen, and are the reference with it), builds one compiled step and
hands it to :func:`rsa_mlx.tuner.loop.loop` with the callbacks that
validate and checkpoint. :mod:`rsa_mlx.tuner.trainer` runs the stages in
order.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten
from mlx_lm.tuner.trainer import grad_checkpoint

from rsa_mlx.ops.losses import metric_keys
from rsa_mlx.ops.risk import resolve_mu
from rsa_mlx.tuner import adapters
from rsa_mlx.tuner import distributed as dist
from rsa_mlx.tuner.checkpoint import (
    CHECKPOINTS,
    Progress,
    config_hash,
    intact_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from rsa_mlx.tuner.config import TrainConfig
from rsa_mlx.tuner.data import BatchSampler, encode_pairs, epochs_to_iters, load_pairs
from rsa_mlx.tuner.loop import Plan, Reporter, StopSignals, loop, summarize
from rsa_mlx.tuner.model import ResponseLogits
from rsa_mlx.tuner.step import Objective, make_eval, make_step
from rsa_mlx.util import progress as bars

__all__ = ["StageData", "StageSpec", "prepare_data", "train_stage", "validate"]

_PATCHED_CHECKPOINT: set[type] = set()


@dataclass
class StageData:
    train: BatchSampler
    valid: BatchSampler | None
    notes: list[str]


def prepare_data(cfg: TrainConfig, stage: str, tokenizer) -> StageData:
    """A stage's batches, read and encoded before anything is written."""
    source = cfg.stage_data(stage)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    notes, samplers = [], {}
    for split in ("train", "valid"):
        pairs, report = load_pairs(source, stage, split)
        if not pairs:
            continue
        encoded = encode_pairs(pairs, tokenizer, cfg.max_seq_length)
        extra = ", ".join(f"{n} {why}" for why, n in sorted(encoded.report.items()))
        notes.append(f"{split}: {report.describe()}" + (f"; {extra}" if extra else ""))
        samplers[split] = BatchSampler(
            encoded, cfg.batch_size, cfg.seed, pad, dist.rank(), dist.world_size()
        )
    return StageData(samplers["train"], samplers.get("valid"), notes)


def stage_iters(cfg: TrainConfig, batches_per_epoch: int) -> int:
    """Batches of a stage, rounded up to whole optimizer updates."""
    iters = cfg.iters or epochs_to_iters(cfg.epochs or 1.0, batches_per_epoch)
    accum = cfg.grad_accumulation_steps
    return -(-iters // accum) * accum


@dataclass(frozen=True)
class StageSpec:
    """What one stage computes and where it writes, derived from the run's
    settings before the stage starts."""

    name: str
    dir: Path
    iters: int
    accum: int
    seed: int
    objective: Objective
    metadata: dict  # the stage's record in adapter_config.json and checkpoints
    digest: str  # a checkpoint of other settings is refused on resume

    @classmethod
    def of(
        cls,
        cfg: TrainConfig,
        name: str,
        run_dir: Path,
        base_adapter: str | None,
        batches_per_epoch: int,
    ) -> StageSpec:
        beta, mu = cfg.stage_beta(name), resolve_mu(cfg.risk, cfg.mu)
        objective = Objective(
            cfg.loss,
            cfg.risk,
            mu,
            beta,
            cfg.alpha,
            cfg.length_normalize,
            cfg.sft_weight,
        )
        metadata = {
            "stage": name,
            "base_adapter": base_adapter,
            "base_model": cfg.model,
            "method": cfg.method_name(),
            "loss": cfg.loss,
            "risk": cfg.risk,
            "mu": mu,
            "alpha": cfg.alpha,
            "beta": beta,
        }
        return cls(
            name=name,
            dir=run_dir / name,
            iters=stage_iters(cfg, batches_per_epoch),
            accum=cfg.grad_accumulation_steps,
            # the adapter's random init and dropout are reproducible per stage
            seed=cfg.seed * 2 + cfg.stage_names.index(name),
            objective=objective,
            metadata=metadata,
            digest=config_hash(cfg, name),
        )

    def plan(self, cfg: TrainConfig) -> Plan:
        return Plan(
            self.name,
            self.iters,
            self.accum,
            cfg.steps_per_report,
            cfg.steps_per_eval,
            cfg.save_every,
            self.seed,
            dist.rank(),
        )


def schedule(cfg: TrainConfig, updates: int):
    """Linear warm-up to ``learning_rate`` over ``warmup`` updates (a fraction
    of ``updates`` if < 1), then cosine decay over the rest."""
    warmup = int(cfg.warmup if cfg.warmup >= 1 else round(cfg.warmup * updates))
    warmup = min(warmup, max(updates - 1, 0))
    cosine = optim.cosine_decay(cfg.learning_rate, max(updates - warmup, 1))
    if warmup == 0:
        return cosine
    ramp = optim.linear_schedule(cfg.learning_rate / warmup, cfg.learning_rate, warmup)
    return optim.join_schedules([ramp, cosine], [warmup])


def adamw(cfg: TrainConfig, updates: int) -> optim.AdamW:
    """AdamW with the warm-up + cosine :func:`schedule` over ``updates``.

    With ``bias_correction`` the update is torch's (and TRL's):
    ``lr * m_hat / (sqrt(v_hat) + eps)`` with ``m_hat = m / (1 - b1^t)`` and
    ``v_hat = v / (1 - b2^t)``; without it (mlx-lm's default) it is
    ``lr * m / (sqrt(v) + eps)``, ``(1 - b1^t) / sqrt(1 - b2^t)`` times the
    corrected update: 3.2x at t = 1, 6.5x at t = 10, 2.8x at t = 138 for the
    default betas. Over a short alignment run a learning rate therefore
    means 3-6x more without the correction than in torch or a paper.
    """
    return optim.AdamW(
        learning_rate=schedule(cfg, updates),
        weight_decay=cfg.weight_decay,
        bias_correction=cfg.bias_correction,
    )


def make_optimizer(cfg: TrainConfig, spec: StageSpec, model: nn.Module):
    optimizer = adamw(cfg, spec.iters // spec.accum)
    optimizer.init(model.trainable_parameters())
    return optimizer


def _grad_checkpoint(model: nn.Module) -> None:
    """mlx-lm's class-wide checkpointing, applied at most once per class."""
    layer_type = type(model.layers[0])
    if layer_type not in _PATCHED_CHECKPOINT:
        grad_checkpoint(model.layers[0])
        _PATCHED_CHECKPOINT.add(layer_type)


def train_mode(model: nn.Module, frozen: Iterable[nn.Module]) -> None:
    """Training mode, except for earlier stages' adapters: a frozen stage is
    a fixed policy (the reference), so its LoRA dropout stays off."""
    model.train()
    for layer in frozen:
        layer.eval()


def restore(
    cfg: TrainConfig, spec: StageSpec, model, optimizer, reporter: Reporter
) -> Progress:
    """The progress to start from: on ``resume`` the newest intact
    checkpoint's (its tensors loaded into ``model`` and ``optimizer``; a
    damaged newer one is passed over with a note), else zero."""
    progress = Progress(seed=spec.seed, world_size=dist.world_size())
    if not cfg.resume:
        return progress
    if (found := intact_checkpoint(spec.dir, spec.name, reporter.note)) is not None:
        progress = load_checkpoint(found, model, optimizer, spec.digest)
        dist.check_world_size(found, progress.world_size)
        reporter.note(
            f"[{spec.name}] resumed from {found} (iteration {progress.iteration})"
        )
    elif spec.dir.exists():  # begun before, its checkpoints gone
        reporter.note(
            f"[{spec.name}] no checkpoint in {spec.dir / CHECKPOINTS} to resume "
            "from: this stage trains again from the start"
        )
    reporter.rewind(spec.name, progress.iteration)
    return progress


def response_logits(model: nn.Module, stage: str, reporter: Reporter) -> ResponseLogits:
    forward = ResponseLogits(model)
    if not forward.split:
        reporter.note(
            f"[{stage}] note: this model's head is not a plain projection; "
            "computing full logits (slower)"
        )
    return forward


def describe(cfg: TrainConfig, spec: StageSpec, model: nn.Module) -> str:
    """The stage's one-line summary: method, length, batch, parameters."""
    world = dist.world_size()
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    group = (
        f" ({world} processes of {cfg.batch_size // world} pairs; effective batch "
        f"{cfg.batch_size * spec.accum} pairs per update at learning rate "
        f"{cfg.learning_rate:g})"
        if world > 1
        else ""
    )
    return (
        f"[{spec.name}] {cfg.method_name()} beta={spec.objective.beta:g}: "
        f"{spec.iters} iterations of {cfg.batch_size} pairs{group}, "
        f"{trainable / 1e6:.3f}M trainable parameters"
    )


def validate(
    evaluate: Callable, sampler: BatchSampler, max_batches: int, keys: Iterable[str]
) -> dict:
    """Per-pair means of the step's metrics over the validation batches
    (over the whole process group: each rank evaluates its shards).
    ``keys`` are the names of the metrics ``evaluate`` returns."""
    total = len(sampler) if max_batches < 0 else min(max_batches, len(sampler))
    sums, pairs = {}, 0
    with bars.task("val", total, "batches", quiet=True) as bar:
        for _, batch in zip(range(total), sampler.once()):
            if batch.pairs:  # an empty shard only stands in for the step
                metrics = evaluate(batch.arrays())
                mx.eval(metrics)
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + v.item() * batch.pairs
                pairs += batch.pairs
            bar.advance()
    if dist.world_size() > 1:  # a rank may have seen no pairs: use known keys
        keys = sorted(set(sums) | set(keys))
        values = dist.sum_values([sums.get(k, 0.0) for k in keys] + [pairs])
        sums, pairs = dict(zip(keys, values[:-1])), round(values[-1])
    return summarize(sums, pairs)


@dataclass
class StageHooks:
    """What the loop calls back into: validation, checkpoints, the check of
    the parameters before one is written, the learning rate."""

    cfg: TrainConfig
    spec: StageSpec
    model: nn.Module
    optimizer: optim.Optimizer
    progress: Progress
    data: StageData
    evaluate: Callable
    frozen: list[nn.Module]
    reporter: Reporter

    def run_validation(self, it: int) -> dict:
        if self.data.valid is None or self.cfg.val_batches == 0:
            return {}
        self.model.eval()
        tic = time.perf_counter()
        keys = metric_keys(self.spec.objective.loss)
        info = validate(self.evaluate, self.data.valid, self.cfg.val_batches, keys)
        train_mode(self.model, self.frozen)
        info.update(iteration=it, seconds=time.perf_counter() - tic)
        self.reporter.val(self.spec.name, info)
        return info

    def save(self) -> Path:
        self.progress.sampler = self.data.train.state
        if not dist.is_main():  # rank 0 writes for the group
            return self.spec.dir / "checkpoints" / f"step_{self.progress.iteration:07d}"
        return save_checkpoint(
            self.spec.dir,
            self.model,
            self.optimizer,
            self.progress,
            self.cfg.lora,
            self.spec.metadata,
            self.spec.digest,
            self.cfg.keep_checkpoints,
        )

    def params_finite(self) -> bool:
        params = tree_flatten(self.model.trainable_parameters())
        return bool(mx.array([mx.isfinite(v).all() for _, v in params]).all().item())

    def learning_rate(self) -> float:
        return self.optimizer.learning_rate.item()


def train_stage(
    cfg: TrainConfig,
    stage: str,
    model: nn.Module,
    run_dir: Path,
    reporter: Reporter,
    base_adapter: str | None,
    data: StageData,
    frozen: list[nn.Module] = (),
    stop: StopSignals | None = None,
) -> tuple[dict, list[nn.Module]]:
    """Train one stage's adapter on ``model`` (modified in place); ``frozen``
    are the earlier stages' adapter layers. Returns the summary and layers."""
    spec = StageSpec.of(cfg, stage, run_dir, base_adapter, len(data.train))
    for note in data.notes:
        reporter.note(f"[{stage}] data {note}")
    mx.random.seed(spec.seed)  # before the adapter's random init
    layers = adapters.add_adapter(model, cfg.lora)
    if cfg.grad_checkpoint:
        _grad_checkpoint(model)
    optimizer = make_optimizer(cfg, spec, model)
    progress = restore(cfg, spec, model, optimizer, reporter)
    data.train.state = progress.sampler
    forward = response_logits(model, stage, reporter)
    step = make_step(
        model,
        optimizer,
        layers,
        spec.objective,
        spec.accum,
        cfg.max_grad_norm,
        cfg.compile,
        forward,
        data_parallel=dist.world_size() > 1,
    )
    evaluate = make_eval(layers, spec.objective, forward)
    hooks = StageHooks(
        cfg, spec, model, optimizer, progress, data, evaluate, list(frozen), reporter
    )
    reporter.note(describe(cfg, spec, model))
    train_mode(model, frozen)
    mx.reset_peak_memory()
    out = loop(
        spec.plan(cfg),
        step,
        iter(data.train),
        progress,
        [model.state, optimizer.state, mx.random.state],
        reporter=reporter,
        validate=hooks.run_validation,
        save=hooks.save,
        params_finite=hooks.params_finite,
        learning_rate=hooks.learning_rate,
        stop=stop,
    )
    return finish(hooks, layers, out), layers


def finish(hooks: StageHooks, layers: list[nn.Module], out: dict) -> dict:
    """Validate and save the trained stage, freeze its adapter (the next
    stage stacks on it) and return its summary for ``run.json``."""
    cfg, spec, model = hooks.cfg, hooks.spec, hooks.model
    last_val = hooks.run_validation(spec.iters) or out["valid"]
    if cfg.save_every:
        hooks.save()
    if dist.is_main():
        adapters.save_adapter(spec.dir, model, cfg.lora, spec.metadata)
    model.eval()
    for layer in layers:
        layer.freeze()
    return {
        "name": spec.name,
        "path": spec.name,
        "beta": spec.objective.beta,
        "iterations": spec.iters,
        "train": out["train"],
        "valid": last_val,
        "shapes": len(out["shapes"]),
    }
