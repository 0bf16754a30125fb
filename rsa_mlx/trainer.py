"""The two-stage training loop (SPEC §4).

Stage ``reward`` fits helpfulness pairs against the base model; stage
``safety`` fits safety pairs against the stage-1 policy (its adapter frozen
under the new one), at temperature ``beta / lam``. Each stage trains one LoRA
adapter with one compiled step, reports progress, validates, and checkpoints
atomically (adapters, optimizer, step, RNG, sampler position) so that
``resume`` continues exactly where a run stopped.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import yaml
from mlx.utils import tree_flatten

from rsa_mlx import adapters
from rsa_mlx.atomic import save_json, save_text
from rsa_mlx.checkpoint import (
    Progress,
    TrainingError,
    config_hash,
    iteration_seed,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from rsa_mlx.config import TrainConfig
from rsa_mlx.data import (
    BatchSampler,
    encode_pairs,
    epochs_to_iters,
    load_pairs,
)
from rsa_mlx.model import RUN_FILE, ResponseLogits, load
from rsa_mlx.risk import resolve_mu
from rsa_mlx.step import Objective, make_eval, make_step

_PATCHED_CHECKPOINT: set[type] = set()


# --------------------------------------------------------------------------
# reporting


class Reporter:
    """Progress lines on stdout, ``metrics.jsonl`` in the run, callbacks."""

    def __init__(self, run_dir: Path, callback=None, stream=None):
        self.path = run_dir / "metrics.jsonl"
        self.callback = callback
        self.stream = stream or sys.stdout
        self.live = getattr(self.stream, "isatty", lambda: False)()

    def record(self, entry: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def train(self, stage: str, info: dict) -> None:
        self.record({"stage": stage, "kind": "train", **info})
        m = info
        line = (
            f"[{stage}] it {m['iteration']:>5d}/{m['iters']} | loss {m['loss']:.4f} "
            f"| acc {m['accuracy']:.2f} | margin {m['margins']:+.4f} "
            f"| kl {m['kl']:.4f} | risk {m['risk']:.4f} | lr {m['learning_rate']:.2e} "
            f"| {m['iterations_per_second']:.2f} it/s | {m['tokens_per_second']:.0f} tok/s "
            f"| peak {m['peak_memory']:.2f} GB"
        )
        self._print(line)
        if self.callback is not None:
            self.callback.on_train_loss_report(
                {**{f"train_{k}": v for k, v in m.items()}, "iteration": m["iteration"]}
            )

    def val(self, stage: str, info: dict) -> None:
        self.record({"stage": stage, "kind": "val", **info})
        self._print(
            f"[{stage}] val {info['iteration']:>5d} | loss {info['loss']:.4f} "
            f"| acc {info['accuracy']:.2f} | margin {info['margins']:+.4f} "
            f"| kl {info['kl']:.4f} | risk {info['risk']:.4f} ({info['seconds']:.1f}s)"
        )
        if self.callback is not None:
            self.callback.on_val_loss_report(
                {
                    **{f"val_{k}": v for k, v in info.items()},
                    "iteration": info["iteration"],
                }
            )

    def tick(self, stage: str, it: int, iters: int, seconds: float) -> None:
        if self.live:
            self.stream.write(f"\r[{stage}] it {it}/{iters} ({seconds:.0f}s)")
            self.stream.flush()

    def note(self, text: str) -> None:
        self._print(text)

    def _print(self, line: str) -> None:
        if self.live:
            self.stream.write("\r\033[K")
        self.stream.write(line + "\n")
        self.stream.flush()


def summarize(sums: dict[str, float], pairs: int) -> dict[str, float]:
    """Per-pair means from pair-weighted sums, with chosen/rejected averaged."""
    mean = {k: v / max(pairs, 1) for k, v in sums.items()}
    mean["kl"] = 0.5 * (mean.get("kl/chosen", 0.0) + mean.get("kl/rejected", 0.0))
    mean["risk"] = 0.5 * (mean.get("risk/chosen", 0.0) + mean.get("risk/rejected", 0.0))
    return mean


# --------------------------------------------------------------------------
# the loop


def _schedule(cfg: TrainConfig, updates: int):
    warmup = int(cfg.warmup if cfg.warmup >= 1 else round(cfg.warmup * updates))
    warmup = min(warmup, max(updates - 1, 0))
    cosine = optim.cosine_decay(cfg.learning_rate, max(updates - warmup, 1))
    if warmup == 0:
        return cosine
    ramp = optim.linear_schedule(
        cfg.learning_rate / max(warmup, 1), cfg.learning_rate, warmup
    )
    return optim.join_schedules([ramp, cosine], [warmup])


def _grad_checkpoint(model: nn.Module) -> None:
    """mlx-lm's class-wide checkpointing, applied at most once per class."""
    from mlx_lm.tuner.trainer import grad_checkpoint

    layer_type = type(model.layers[0])
    if layer_type not in _PATCHED_CHECKPOINT:
        grad_checkpoint(model.layers[0])
        _PATCHED_CHECKPOINT.add(layer_type)


@dataclass
class StageData:
    train: BatchSampler
    valid: BatchSampler | None
    notes: list[str]


def prepare_data(cfg: TrainConfig, stage: str, tokenizer) -> StageData:
    source = cfg.stage_data(stage)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    notes = []
    samplers = {}
    for split in ("train", "valid"):
        pairs, report = load_pairs(source, stage, split)
        if not pairs:
            continue
        encoded = encode_pairs(pairs, tokenizer, cfg.max_seq_length)
        extra = ", ".join(f"{n} {why}" for why, n in sorted(encoded.report.items()))
        notes.append(f"{split}: {report.describe()}" + (f"; {extra}" if extra else ""))
        samplers[split] = BatchSampler(encoded, cfg.batch_size, cfg.seed, pad)
    return StageData(samplers["train"], samplers.get("valid"), notes)


def _validate(evaluate, sampler: BatchSampler, max_batches: int) -> dict:
    sums, pairs = {}, 0
    for i, batch in enumerate(sampler.once()):
        if 0 <= max_batches <= i:
            break
        metrics = evaluate(batch.arrays())
        mx.eval(metrics)
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v.item() * batch.pairs
        pairs += batch.pairs
    return summarize(sums, pairs)


def train_stage(
    cfg: TrainConfig,
    stage: str,
    model: nn.Module,
    tokenizer,
    run_dir: Path,
    reporter: Reporter,
    base_adapter: str | None,
    data: StageData,
) -> dict:
    """Train one stage's adapter on ``model`` (which is modified in place)."""
    stage_dir = run_dir / stage
    for note in data.notes:
        reporter.note(f"[{stage}] data {note}")
    iters = cfg.iters or epochs_to_iters(cfg.epochs or 1.0, len(data.train))
    accum = cfg.grad_accumulation_steps
    iters = -(-iters // accum) * accum  # whole optimizer updates
    updates = iters // accum
    beta = cfg.stage_beta(stage)
    objective = Objective(
        cfg.loss,
        cfg.risk,
        resolve_mu(cfg.risk, cfg.mu),
        beta,
        cfg.alpha,
        cfg.length_normalize,
    )
    lora = cfg.lora
    extra = {
        "stage": stage,
        "base_adapter": base_adapter,
        "base_model": cfg.model,
        "method": cfg.method_name(),
        "loss": cfg.loss,
        "risk": cfg.risk,
        "mu": objective.mu,
        "alpha": cfg.alpha,
        "beta": beta,
    }
    # The adapter's random init and dropout are reproducible per stage.
    stage_seed = cfg.seed * 2 + cfg.stage_names.index(stage)
    mx.random.seed(stage_seed)
    layers = adapters.add_adapter(model, lora)
    if cfg.grad_checkpoint:
        _grad_checkpoint(model)
    optimizer = optim.AdamW(
        learning_rate=_schedule(cfg, updates), weight_decay=cfg.weight_decay
    )
    optimizer.init(model.trainable_parameters())
    digest = config_hash(cfg, stage)
    progress = Progress(seed=stage_seed)
    resume_from = latest_checkpoint(stage_dir) if cfg.resume else None
    if resume_from is not None:
        progress = load_checkpoint(resume_from, model, optimizer, digest)
        reporter.note(
            f"[{stage}] resumed from {resume_from} (iteration {progress.iteration})"
        )
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
    )
    evaluate = make_eval(layers, objective, forward)
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    reporter.note(
        f"[{stage}] {cfg.method_name()} beta={beta:g}: {iters} iterations of "
        f"{cfg.batch_size} pairs, {trainable / 1e6:.3f}M trainable parameters"
    )

    state = [model.state, optimizer.state, mx.random.state]
    model.train()
    mx.reset_peak_memory()
    sums: dict[str, mx.array] = {}
    pairs, tokens, window, grad, first_bad = 0, 0, 0.0, None, mx.array(-1)
    norms, updates_in_window = 0.0, 0
    last_train, last_val, saved, shapes = {}, {}, None, set()
    start_iteration = progress.iteration
    batches = iter(data.train)

    def check_finite(params: bool = False):
        bad = first_bad.item()
        if bad < 0 and params:  # before a checkpoint: the adapter itself
            finite = [
                mx.isfinite(v).all()
                for _, v in tree_flatten(model.trainable_parameters())
            ]
            bad = -1 if mx.array(finite).all().item() else progress.iteration
        if bad >= 0:
            where = f"; the last good checkpoint is {saved}" if saved else ""
            raise TrainingError(
                f"[{stage}] the loss became NaN or infinite at iteration {bad}{where}. "
                "Try a lower --learning-rate or --beta."
            )

    def run_validation(it):
        if data.valid is None:
            return {}
        model.eval()
        tic = time.perf_counter()
        info = _validate(evaluate, data.valid, cfg.val_batches)
        model.train()
        info.update(iteration=it, seconds=time.perf_counter() - tic)
        reporter.val(stage, info)
        return info

    for it in range(progress.iteration + 1, iters + 1):
        tic = time.perf_counter()
        batch = next(batches)
        mx.random.seed(iteration_seed(progress.seed, it))
        do_update = it % accum == 0
        shapes.add(batch.tokens.shape + batch.index.shape)
        metrics, grad = step(batch.arrays(), grad, do_update)
        loss = metrics["loss"]
        first_bad = mx.where((first_bad < 0) & ~mx.isfinite(loss), it, first_bad)
        if "grad_norm" in metrics:  # only on update steps: a mean per update
            norms = norms + metrics.pop("grad_norm")
            updates_in_window += 1
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v * batch.pairs
        mx.eval(state, sums, grad, first_bad, norms)
        pairs += batch.pairs
        tokens += batch.real_tokens
        window += time.perf_counter() - tic
        progress.iteration = it
        progress.updates += int(do_update)
        reporter.tick(stage, it, iters, window)

        if it % cfg.steps_per_report == 0 or it == iters:
            check_finite()
            values = summarize({k: v.item() for k, v in sums.items()}, pairs)
            done = it - start_iteration
            last_train = {
                **values,
                "iteration": it,
                "iters": iters,
                "learning_rate": optimizer.learning_rate.item(),
                "iterations_per_second": done / window if window else 0.0,
                "tokens_per_second": tokens / window if window else 0.0,
                "trained_tokens": tokens,
                "peak_memory": mx.get_peak_memory() / 1e9,
                "grad_norm": float(norms) / updates_in_window
                if updates_in_window
                else 0.0,
                "shapes": len(shapes),
            }
            reporter.train(stage, last_train)
            sums, pairs, tokens, window, start_iteration = {}, 0, 0, 0.0, it
            norms, updates_in_window = 0.0, 0
        if cfg.steps_per_eval and it % cfg.steps_per_eval == 0 and it != iters:
            last_val = run_validation(it)
        if do_update and cfg.save_every and it % cfg.save_every == 0 and it != iters:
            check_finite(params=True)
            progress.sampler = data.train.state
            saved = save_checkpoint(
                stage_dir,
                model,
                optimizer,
                progress,
                lora,
                extra,
                digest,
                cfg.keep_checkpoints,
            )

    check_finite(params=True)
    last_val = run_validation(iters) or last_val
    progress.sampler = data.train.state
    if cfg.save_every:
        save_checkpoint(
            stage_dir,
            model,
            optimizer,
            progress,
            lora,
            extra,
            digest,
            cfg.keep_checkpoints,
        )
    adapters.save_adapter(stage_dir, model, lora, extra)
    model.eval()
    for layer in layers:  # frozen from here on (the next stage stacks on it)
        layer.freeze()
    summary = {
        "name": stage,
        "path": stage,
        "beta": beta,
        "iterations": iters,
        "train": last_train,
        "valid": last_val,
        "shapes": len(shapes),
    }
    return summary, layers


def default_run_dir(cfg: TrainConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.method_name()}"


def write_run(run_dir: Path, run: dict) -> None:
    save_json(run_dir / RUN_FILE, run)


def train(
    cfg: TrainConfig, reporter: Reporter | None = None, model=None, tokenizer=None
) -> dict:
    """Run the configured stages end to end; return the run summary.

    ``model``/``tokenizer`` may be passed in (already loaded from
    ``cfg.model``); otherwise they are loaded with ``mlx_lm.load``.
    """
    run_dir = Path(cfg.adapter_path) if cfg.adapter_path else default_run_dir(cfg)
    if cfg.resume:
        if not (run_dir / RUN_FILE).exists():
            raise TrainingError(f"{run_dir}: nothing to resume (no {RUN_FILE})")
    elif (run_dir / RUN_FILE).exists():
        raise TrainingError(
            f"{run_dir}: a run already exists here; pass --resume to continue it "
            "or choose another --adapter-path"
        )
    # Load and check everything before the run folder is written.
    if model is None:
        model, tokenizer = load(cfg.model)
    datasets = {stage: prepare_data(cfg, stage, tokenizer) for stage in cfg.stage_names}
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = yaml.safe_dump({**cfg.to_dict(), "resume": False}, sort_keys=False)
    save_text(run_dir / "config.yaml", settings)
    if reporter is None:
        from mlx_lm.tuner.callbacks import get_reporting_callbacks

        callback = get_reporting_callbacks(
            cfg.report_to, cfg.project_name, str(run_dir), cfg.to_dict()
        )
        reporter = Reporter(run_dir, callback)
    reporter.note(f"run folder: {run_dir}")

    previous = {}
    if cfg.resume:
        with open(run_dir / RUN_FILE) as f:
            previous = {s["name"]: s for s in json.load(f).get("stages", [])}
    run = {
        "model": cfg.model,
        "method": cfg.method_name(),
        "merge": cfg.merge,
        "stages": [],
    }
    if not cfg.resume:  # marks the folder as a run, resumable from the start
        write_run(run_dir, run)
    base_adapter = None
    stage_layers = []
    tic = time.perf_counter()
    for stage in cfg.stage_names:
        if stage in previous:  # finished before the interruption
            layers = adapters.apply_adapter(model, run_dir / stage, with_base=False)
            run["stages"].append(previous[stage])
            reporter.note(f"[{stage}] already trained; loaded {run_dir / stage}")
        else:
            result, layers = train_stage(
                cfg,
                stage,
                model,
                tokenizer,
                run_dir,
                reporter,
                base_adapter,
                datasets[stage],
            )
            run["stages"].append(result)
            write_run(run_dir, run)
        stage_layers.append(layers)
        base_adapter = f"../{stage}"

    if len(stage_layers) > 1 and cfg.merge != 1.0:  # P-SACPO: W1 + q dW2
        for layer in stage_layers[-1]:
            layer.scale = cfg.merge * layer.scale
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
    write_run(run_dir, run)
    reporter.note(
        f"done in {run['seconds']:.0f}s. Load the aligned model with "
        f"rsa_mlx.load(adapter_path='{run_dir}'), or with mlx-lm: "
        f"mlx_lm.generate --model {cfg.model} --adapter-path {run_dir / 'final'}"
    )
    run["run_dir"] = str(run_dir)
    return run


def steps_per_epoch(n_pairs: int, batch_size: int) -> int:
    return math.ceil(n_pairs / batch_size)
