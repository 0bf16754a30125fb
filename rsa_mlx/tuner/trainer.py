"""The two-stage run (docs/method.md §1): the run folder, the stages in order, the
merge and the final adapter.

Stage ``reward`` fits helpfulness pairs against the base model; stage
``safety`` fits safety pairs against the stage-1 policy (its adapter frozen
under the new one, dropout off), at temperature ``beta / lam``. One stage is
:func:`rsa_mlx.tuner.stage.train_stage`. Everything is checked (settings,
model, LoRA targets, data, a run to resume) before anything is written, and
checkpoints are atomic, so ``resume`` continues exactly where a run stopped.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tuner.callbacks import get_reporting_callbacks

from rsa_mlx.tuner import adapters
from rsa_mlx.tuner import distributed as dist
from rsa_mlx.tuner.config import TrainConfig, differences, load_yaml, resolve
from rsa_mlx.tuner.loop import Interrupted, Reporter, SilentReporter, StopSignals
from rsa_mlx.tuner.model import RUN_FILE, load
from rsa_mlx.tuner.runs import (
    changed_inputs,
    digest_inputs,
    input_paths,
    read_run,
    write_config,
)
from rsa_mlx.tuner.stage import StageData, prepare_data, train_stage
from rsa_mlx.util import progress
from rsa_mlx.util.atomic import save_json
from rsa_mlx.util.errors import ConfigError, TrainingError, quote
from rsa_mlx.util.lock import check_free, folder_lock

__all__ = ["Interrupted", "Reporter", "TrainingError", "train"]


def default_run_dir(cfg: TrainConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.method_name()}"


def _check_batch_size(cfg: TrainConfig) -> None:
    world = dist.world_size()
    if cfg.batch_size % world:
        raise ConfigError(
            f"batch_size: {cfg.batch_size} pairs do not split over {world} "
            f"processes; --batch-size is the global batch, give a multiple of {world}"
        )


def _check_run_dir(cfg: TrainConfig, run_dir: Path, inputs: dict) -> dict:
    """Refuse a run folder that is in use, or a resume that cannot continue
    (other settings, or ``inputs`` whose content changed); return the stages
    a resumed run already finished."""
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
    run = read_run(run_dir)
    if changed := changed_inputs(run.get("inputs"), inputs):
        raise ConfigError(
            f"cannot resume {quote(run_dir)}: {'; '.join(changed)} changed since "
            "the run started (its content hash differs). Start a new run "
            "(another --adapter-path) or restore it"
        )
    dist.check_world_size(run_dir, run.get("world_size", 1))
    return {s["name"]: s for s in run.get("stages", [])}


def _write_run(run_dir: Path, run: dict) -> None:
    if dist.is_main():  # rank 0 writes the run folder for the group
        save_json(run_dir / RUN_FILE, run)


def open_run(cfg: TrainConfig, run_dir: Path, reporter: Reporter | None) -> Reporter:
    """Create the run folder with its ``config.yaml`` (the base of
    ``--resume``) and return the reporter of this process."""
    world = dist.world_size()
    if not dist.is_main():  # rank 0 writes the run folder and reports for the group
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
    return reporter


def train_stages(
    cfg: TrainConfig,
    model: nn.Module,
    run_dir: Path,
    reporter: Reporter,
    run: dict,
    previous: dict,
    datasets: dict[str, StageData],
) -> list[list[nn.Module]]:
    """Train each stage in order on top of the ones before (a resumed run
    loads those it finished); record each in ``run.json`` when it is done.
    Returns every stage's adapter layers."""
    base_adapter, stage_layers = None, []
    # A data-parallel run stops at once on a signal (ranks cannot agree on a
    # step to stop after without a sync per step): resume from a checkpoint.
    single = dist.world_size() == 1
    with StopSignals() if single else contextlib.nullcontext() as stop:
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
                _write_run(run_dir, run)
            stage_layers.append(layers)
            base_adapter = f"../{stage}"
    return stage_layers


def save_final(
    cfg: TrainConfig,
    run_dir: Path,
    model: nn.Module,
    run: dict,
    stage_layers: list[list[nn.Module]],
) -> None:
    """Merge (P-SACPO: ``W1 + q dW2``, the last adapter's scale times q) and
    write the stacked adapters as one mlx-lm adapter in ``final``."""
    if len(stage_layers) > 1 and cfg.merge != 1.0:
        for layer in stage_layers[-1]:
            layer.scale = cfg.merge * layer.scale
    if dist.is_main():
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


def run_lock(run_dir: Path):
    """The run folder's lock (rank 0 holds it for the group): a second
    process training in the same folder is refused at once."""
    if not dist.is_main():
        return contextlib.nullcontext()
    return folder_lock(run_dir, "training run", LOCK_HINT)


LOCK_HINT = "wait for it to end, or choose another --adapter-path"


def train(
    cfg: TrainConfig, reporter: Reporter | None = None, model=None, tokenizer=None
) -> dict:
    """Run the configured stages end to end; return the run summary.

    ``model``/``tokenizer`` may be passed in (already loaded from
    ``cfg.model``); otherwise they are loaded with ``mlx_lm.load``. The run
    folder is locked while it trains (:mod:`rsa_mlx.util.lock`).
    """
    cfg = cfg.with_resolved_paths()
    _check_batch_size(cfg)
    run_dir = Path(cfg.adapter_path) if cfg.adapter_path else default_run_dir(cfg)
    # Check everything before the run folder is touched.
    if dist.is_main():
        check_free(run_dir, "training run", LOCK_HINT)
    inputs = digest_inputs(input_paths(cfg))  # content hashes, to resume by
    previous = _check_run_dir(cfg, run_dir, inputs)
    if model is None:
        model, tokenizer = load(cfg.model)
    adapters.check_targets(model, cfg.lora)
    datasets = {
        s: prepare_data(cfg, s, tokenizer) for s in cfg.stage_names if s not in previous
    }
    with run_lock(run_dir) as stale:
        if stale is not None:
            progress.echo(
                f"{run_dir} was left locked by process {stale}, which ended "
                "without releasing it (killed?); taking it over"
            )
        # checked again under the lock: another process may have been quicker
        if _check_run_dir(cfg, run_dir, inputs) != previous:
            raise TrainingError(
                f"{quote(run_dir)}: another process trained here while this one "
                "was loading; run the command again"
            )
        with wired_limit():
            return _train_in(cfg, run_dir, reporter, model, previous, datasets, inputs)


@contextlib.contextmanager
def wired_limit():
    """Raise the Metal wired-memory limit to the recommended working set while
    training, as mlx-lm's trainer does, and restore it after.

    Wired memory cannot be paged out, so a model and step that fit in it do
    not stall on the GPU. Only where Metal is available and the device
    reports ``max_recommended_working_set_size``; elsewhere (the CPU backend
    reports no such key) nothing is changed.
    """
    size = None
    if mx.metal.is_available():
        size = mx.device_info().get("max_recommended_working_set_size")
    if not size:
        yield
        return
    previous = mx.set_wired_limit(size)
    try:
        yield
    finally:
        mx.set_wired_limit(previous)


def _train_in(cfg, run_dir, reporter, model, previous, datasets, inputs) -> dict:
    """:func:`train` once everything is checked and the folder locked."""
    reporter = open_run(cfg, run_dir, reporter)
    run = {"model": cfg.model, "method": cfg.method_name(), "merge": cfg.merge}
    run.update(inputs=inputs, world_size=dist.world_size(), stages=[])
    if not cfg.resume:  # marks the folder as a run, resumable from the start
        _write_run(run_dir, run)
    tic = time.perf_counter()
    stage_layers = train_stages(cfg, model, run_dir, reporter, run, previous, datasets)
    save_final(cfg, run_dir, model, run, stage_layers)
    run["final"] = "final"
    run["seconds"] = time.perf_counter() - tic
    _write_run(run_dir, run)
    reporter.note(
        f"done in {run['seconds']:.0f}s. Load the aligned model with "
        f"rsa_mlx.load(adapter_path='{run_dir}'), or with mlx-lm: "
        f"mlx_lm.generate --model {cfg.model} --adapter-path {run_dir / 'final'}"
    )
    run["run_dir"] = str(run_dir)
    return run
