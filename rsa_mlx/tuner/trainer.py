"""The two-stage training procedure (SPEC §4).

Stage ``reward`` fits helpfulness pairs against the base model; stage
``safety`` fits safety pairs against the stage-1 policy (its adapter frozen
under the new one, dropout off), at temperature ``beta / lam``. Each stage
sets up one LoRA adapter, its optimizer and one compiled step, then hands
them to :func:`rsa_mlx.tuner.loop.loop`. Everything is checked (settings, model,
LoRA targets, data, a run to resume) before anything is written, and
checkpoints are atomic, so ``resume`` continues exactly where a run stopped.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten
from mlx_lm.tuner.callbacks import get_reporting_callbacks
from mlx_lm.tuner.trainer import grad_checkpoint

from rsa_mlx.ops.losses import METRIC_KEYS
from rsa_mlx.ops.risk import resolve_mu
from rsa_mlx.tuner import adapters
from rsa_mlx.tuner import distributed as dist
from rsa_mlx.tuner.checkpoint import (
    Progress,
    TrainingError,
    config_hash,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from rsa_mlx.tuner.config import TrainConfig, differences, load_yaml, resolve
from rsa_mlx.tuner.data import BatchSampler, encode_pairs, epochs_to_iters, load_pairs
from rsa_mlx.tuner.loop import (
    Interrupted,
    Plan,
    Reporter,
    SilentReporter,
    StopSignals,
    loop,
    summarize,
)
from rsa_mlx.tuner.model import RUN_FILE, ResponseLogits, load
from rsa_mlx.tuner.runs import write_config
from rsa_mlx.tuner.step import Objective, make_eval, make_step
from rsa_mlx.util import progress as bars
from rsa_mlx.util.atomic import save_json
from rsa_mlx.util.errors import ConfigError, quote

__all__ = ["Interrupted", "Reporter", "TrainingError", "train", "train_stage"]

_PATCHED_CHECKPOINT: set[type] = set()


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


def make_optimizer(cfg: TrainConfig, updates: int) -> optim.AdamW:
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


def _grad_checkpoint(model: nn.Module) -> None:
    """mlx-lm's class-wide checkpointing, applied at most once per class."""

    layer_type = type(model.layers[0])
    if layer_type not in _PATCHED_CHECKPOINT:
        grad_checkpoint(model.layers[0])
        _PATCHED_CHECKPOINT.add(layer_type)


def train_mode(model: nn.Module, frozen: list[nn.Module]) -> None:
    """Training mode, except for earlier stages' adapters: a frozen stage is
    a fixed policy (the reference), so its LoRA dropout stays off."""
    model.train()
    for layer in frozen:
        layer.eval()


@dataclass
class StageData:
    train: BatchSampler
    valid: BatchSampler | None
    notes: list[str]


def prepare_data(cfg: TrainConfig, stage: str, tokenizer) -> StageData:
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


def validate(evaluate, sampler: BatchSampler, max_batches: int) -> dict:
    """Per-pair means of the step's metrics over the validation batches
    (over the whole process group: each rank evaluates its shards)."""
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
        keys = sorted(set(sums) | set(METRIC_KEYS))
        values = dist.sum_values([sums.get(k, 0.0) for k in keys] + [pairs])
        sums, pairs = dict(zip(keys, values[:-1])), round(values[-1])
    return summarize(sums, pairs)


def stage_iters(cfg: TrainConfig, batches_per_epoch: int) -> int:
    """Batches of a stage, rounded up to whole optimizer updates."""
    iters = cfg.iters or epochs_to_iters(cfg.epochs or 1.0, batches_per_epoch)
    accum = cfg.grad_accumulation_steps
    return -(-iters // accum) * accum


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
    stage_dir = run_dir / stage
    for note in data.notes:
        reporter.note(f"[{stage}] data {note}")
    iters = stage_iters(cfg, len(data.train))
    accum = cfg.grad_accumulation_steps
    beta = cfg.stage_beta(stage)
    mu = resolve_mu(cfg.risk, cfg.mu)
    objective = Objective(
        cfg.loss, cfg.risk, mu, beta, cfg.alpha, cfg.length_normalize, cfg.sft_weight
    )
    lora = cfg.lora
    extra = {
        "stage": stage,
        "base_adapter": base_adapter,
        "base_model": cfg.model,
        "method": cfg.method_name(),
        "loss": cfg.loss,
        "risk": cfg.risk,
        "mu": mu,
        "alpha": cfg.alpha,
        "beta": beta,
    }
    # The adapter's random init and dropout are reproducible per stage.
    stage_seed = cfg.seed * 2 + cfg.stage_names.index(stage)
    mx.random.seed(stage_seed)
    layers = adapters.add_adapter(model, lora)
    if cfg.grad_checkpoint:
        _grad_checkpoint(model)
    optimizer = make_optimizer(cfg, iters // accum)
    optimizer.init(model.trainable_parameters())
    digest = config_hash(cfg, stage)
    world = dist.world_size()
    progress = Progress(seed=stage_seed, world_size=world)
    if cfg.resume:
        if (found := latest_checkpoint(stage_dir)) is not None:
            progress = load_checkpoint(found, model, optimizer, digest)
            dist.check_world_size(found, progress.world_size)
            reporter.note(
                f"[{stage}] resumed from {found} (iteration {progress.iteration})"
            )
        reporter.rewind(stage, progress.iteration)
    data.train.state = progress.sampler
    forward = ResponseLogits(model)
    if not forward.split:
        reporter.note(
            f"[{stage}] note: this model's head is not a plain projection; "
            "computing full logits (slower)"
        )
    step = make_step(
        model,
        optimizer,
        layers,
        objective,
        accum,
        cfg.max_grad_norm,
        cfg.compile,
        forward,
        data_parallel=world > 1,
    )
    evaluate = make_eval(layers, objective, forward)
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    group = (
        f" ({world} processes of {cfg.batch_size // world} pairs; effective batch "
        f"{cfg.batch_size * accum} pairs per update at learning rate "
        f"{cfg.learning_rate:g})"
        if world > 1
        else ""
    )
    reporter.note(
        f"[{stage}] {cfg.method_name()} beta={beta:g}: {iters} iterations of "
        f"{cfg.batch_size} pairs{group}, {trainable / 1e6:.3f}M trainable parameters"
    )

    def run_validation(it: int) -> dict:
        if data.valid is None or cfg.val_batches == 0:
            return {}
        model.eval()
        tic = time.perf_counter()
        info = validate(evaluate, data.valid, cfg.val_batches)
        train_mode(model, frozen)
        info.update(iteration=it, seconds=time.perf_counter() - tic)
        reporter.val(stage, info)
        return info

    def save() -> Path:
        progress.sampler = data.train.state
        if not dist.is_main():  # rank 0 writes for the group
            return stage_dir / "checkpoints" / f"step_{progress.iteration:07d}"
        return save_checkpoint(
            stage_dir,
            model,
            optimizer,
            progress,
            lora,
            extra,
            digest,
            cfg.keep_checkpoints,
        )

    def params_finite() -> bool:
        values = [
            mx.isfinite(v).all() for _, v in tree_flatten(model.trainable_parameters())
        ]
        return bool(mx.array(values).all().item())

    plan = Plan(
        stage,
        iters,
        accum,
        cfg.steps_per_report,
        cfg.steps_per_eval,
        cfg.save_every,
        stage_seed,
        dist.rank(),
    )
    train_mode(model, frozen)
    mx.reset_peak_memory()
    out = loop(
        plan,
        step,
        iter(data.train),
        progress,
        [model.state, optimizer.state, mx.random.state],
        reporter=reporter,
        validate=run_validation,
        save=save,
        params_finite=params_finite,
        learning_rate=lambda: optimizer.learning_rate.item(),
        stop=stop,
    )
    last_val = run_validation(iters) or out["valid"]
    if cfg.save_every:
        save()
    if dist.is_main():
        adapters.save_adapter(stage_dir, model, lora, extra)
    model.eval()
    for layer in layers:  # frozen from here on (the next stage stacks on it)
        layer.freeze()
    summary = {
        "name": stage,
        "path": stage,
        "beta": beta,
        "iterations": iters,
        "train": out["train"],
        "valid": last_val,
        "shapes": len(out["shapes"]),
    }
    return summary, layers


def default_run_dir(cfg: TrainConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.method_name()}"


def _check_run_dir(cfg: TrainConfig, run_dir: Path) -> dict:
    """Refuse a run folder that is in use, or a resume that cannot continue;
    return the stages a resumed run already finished."""
    if not cfg.resume:
        if dist.is_main() and (run_dir / RUN_FILE).exists():  # rank 0 writes
            raise TrainingError(
                f"{quote(run_dir)}: a run already exists here; pass --resume to "
                "continue it or choose another --adapter-path"
            )
        return {}
    if not (run_dir / RUN_FILE).exists() or not (run_dir / "config.yaml").exists():
        raise TrainingError(
            f"{quote(run_dir)}: nothing to resume (no {RUN_FILE} and config.yaml)"
        )
    saved = resolve(load_yaml(run_dir / "config.yaml")).with_resolved_paths()
    if changed := differences(saved, cfg):
        raise ConfigError(
            f"cannot resume {quote(run_dir)} with other settings: "
            f"{'; '.join(changed)}. Start a new run (another --adapter-path) or "
            "restore them"
        )
    with open(run_dir / RUN_FILE) as f:
        run = json.load(f)
    dist.check_world_size(run_dir, run.get("world_size", 1))
    return {s["name"]: s for s in run.get("stages", [])}


def train(
    cfg: TrainConfig, reporter: Reporter | None = None, model=None, tokenizer=None
) -> dict:
    """Run the configured stages end to end; return the run summary.

    ``model``/``tokenizer`` may be passed in (already loaded from
    ``cfg.model``); otherwise they are loaded with ``mlx_lm.load``.
    """
    cfg = cfg.with_resolved_paths()
    world, main = dist.world_size(), dist.is_main()
    if cfg.batch_size % world:
        raise ConfigError(
            f"batch_size: {cfg.batch_size} pairs do not split over {world} "
            f"processes; --batch-size is the global batch, give a multiple of {world}"
        )
    run_dir = Path(cfg.adapter_path) if cfg.adapter_path else default_run_dir(cfg)
    # Check everything before the run folder is touched.
    previous = _check_run_dir(cfg, run_dir)
    if model is None:
        model, tokenizer = load(cfg.model)
    adapters.check_targets(model, cfg.lora)
    datasets = {
        s: prepare_data(cfg, s, tokenizer) for s in cfg.stage_names if s not in previous
    }
    if not main:  # rank 0 writes the run folder and reports for the group
        reporter = SilentReporter()
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(run_dir, cfg)
    if reporter is None:
        callback = get_reporting_callbacks(
            cfg.report_to, cfg.project_name, str(run_dir), cfg.to_dict()
        )
        reporter = Reporter(run_dir, callback)
    reporter.note(f"run folder: {run_dir}")

    if world > 1:
        reporter.note(
            f"data-parallel over {dist.processes(world)}: each takes "
            f"{cfg.batch_size // world} of every {cfg.batch_size} pairs"
        )
    run = {"model": cfg.model, "method": cfg.method_name(), "merge": cfg.merge}
    run["world_size"] = world
    run["stages"] = []
    write_run = save_json if main else lambda *a: None
    if not cfg.resume:  # marks the folder as a run, resumable from the start
        write_run(run_dir / RUN_FILE, run)
    base_adapter, stage_layers = None, []
    tic = time.perf_counter()
    # A data-parallel run stops at once on a signal (ranks cannot agree on a
    # step to stop after without a sync per step): resume from a checkpoint.
    with StopSignals() if world == 1 else contextlib.nullcontext() as stop:
        for stage in cfg.stage_names:
            frozen = [m for layers in stage_layers for m in layers]
            if stage in previous:  # finished before the interruption
                layers = adapters.apply_adapter(model, run_dir / stage, with_base=False)
                run["stages"].append(previous[stage])
                reporter.note(f"[{stage}] already trained; loaded {run_dir / stage}")
            else:
                result, layers = train_stage(
                    cfg, stage, model, run_dir, reporter, base_adapter,
                    datasets[stage], frozen, stop,
                )  # fmt: skip
                run["stages"].append(result)
                write_run(run_dir / RUN_FILE, run)
            stage_layers.append(layers)
            base_adapter = f"../{stage}"

    if len(stage_layers) > 1 and cfg.merge != 1.0:  # P-SACPO: W1 + q dW2
        for layer in stage_layers[-1]:
            layer.scale = cfg.merge * layer.scale
    if main:
        adapters.save_combined(
            run_dir / "final",
            model,
            cfg.num_layers,
            {
                "method": cfg.method_name(),
                "merge": cfg.merge,
                "base_model": cfg.model,
                "stages": [s["name"] for s in run["stages"]],
            },
        )
    run["final"] = "final"
    run["seconds"] = time.perf_counter() - tic
    write_run(run_dir / RUN_FILE, run)
    reporter.note(
        f"done in {run['seconds']:.0f}s. Load the aligned model with "
        f"rsa_mlx.load(adapter_path='{run_dir}'), or with mlx-lm: "
        f"mlx_lm.generate --model {cfg.model} --adapter-path {run_dir / 'final'}"
    )
    run["run_dir"] = str(run_dir)
    return run
