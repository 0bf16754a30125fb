"""Checkpoints of a stage: adapters, optimizer state, progress and RNG rule.

Written atomically (a temporary folder, renamed), tagged with a hash of the
settings that make continuing meaningful, so ``resume`` continues exactly
where a run stopped or refuses with the reason.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from rsa_mlx.io.hf import check_safetensors
from rsa_mlx.tuner import adapters
from rsa_mlx.tuner.config import TrainConfig
from rsa_mlx.tuner.data import SamplerState
from rsa_mlx.util.errors import InputError, TrainingError, quote
from rsa_mlx.util.fingerprint import file_sha256

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"
TENSOR_FILES = (adapters.ADAPTER_FILE, "optimizer.safetensors")


def config_hash(cfg: TrainConfig, stage: str) -> str:
    """Hash of every setting that changes what the stage computes
    (:meth:`TrainConfig.result_settings`), the stage and its data."""
    data = {**cfg.result_settings(), "stage": stage, "data": cfg.stage_data(stage)}
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class Progress:
    """Everything besides tensors that a checkpoint restores."""

    iteration: int = 0  # batches done
    updates: int = 0  # optimizer updates done
    sampler: SamplerState = field(default_factory=SamplerState)
    seed: int = 0  # the RNG of iteration i is seeded with iteration_seed(seed, i)
    world_size: int = 1  # processes of a data-parallel run

    def to_dict(self) -> dict:
        return {
            "iteration": self.iteration,
            "world_size": self.world_size,
            "updates": self.updates,
            "epoch": self.sampler.epoch,
            "position": self.sampler.position,
            "rng": {
                "seed": self.seed,
                "rule": "mx.random.seed(seed * 1000003 + iteration)",
            },
        }

    @classmethod
    def from_dict(cls, d: dict) -> Progress:
        sampler = SamplerState(d["epoch"], d["position"])
        world = d.get("world_size", 1)
        return cls(d["iteration"], d["updates"], sampler, d["rng"]["seed"], world)


def iteration_seed(seed: int, iteration: int) -> int:
    """MLX cannot restore an RNG key, so each iteration reseeds from the
    stage seed and its index: a resumed run draws the same numbers."""
    return (seed * 1_000_003 + iteration) % 2**63


def save_checkpoint(stage_dir, model, optimizer, progress, lora, extra, digest, keep):
    """Write ``checkpoints/step_XXXXXXX`` atomically (temp folder, rename) and
    refresh the stage's ``adapters.safetensors``; prune old checkpoints."""
    root = stage_dir / CHECKPOINTS
    final = root / f"step_{progress.iteration:07d}"
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mx.save_safetensors(
        str(tmp / adapters.ADAPTER_FILE), adapters.adapter_weights(model)
    )
    mx.save_safetensors(str(tmp / TENSOR_FILES[1]), dict(tree_flatten(optimizer.state)))
    files = {name: file_sha256(tmp / name) for name in TENSOR_FILES}
    with open(tmp / STATE_FILE, "w") as f:
        state = {**progress.to_dict(), "config_hash": digest, "files": files}
        json.dump(state, f, indent=2)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    adapters.save_adapter(stage_dir, model, lora, extra)
    for old in sorted(root.glob("step_*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(stage_dir: Path) -> list[Path]:
    """The stage's checkpoints, newest first."""
    return sorted((Path(stage_dir) / CHECKPOINTS).glob("step_*"), reverse=True)


def latest_checkpoint(stage_dir: Path) -> Path | None:
    found = checkpoints(stage_dir)
    return found[0] if found else None


def damage(path: Path) -> tuple[Path, str] | None:
    """``(file, what is wrong)`` for a damaged checkpoint, None for an intact
    one: ``state.json`` must be whole, and each tensor file's bytes those
    it recorded (older checkpoints: a whole safetensors header and size)."""
    try:
        with open(path / STATE_FILE) as f:
            state = json.load(f)
        Progress.from_dict(state)
    except FileNotFoundError:
        return path / STATE_FILE, "missing"
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        return path / STATE_FILE, f"damaged: {type(e).__name__} {e}"
    files = state.get("files") or {}
    for name in TENSOR_FILES:
        try:
            if name in files and file_sha256(path / name) != files[name]:
                return path / name, "damaged: its bytes are not those saved"
            check_safetensors(path / name)
        except (InputError, OSError) as e:
            return path / name, str(e).removeprefix(f"{quote(path / name)}: ")
    return None


def intact_checkpoint(stage_dir: Path, stage: str, note) -> Path | None:
    """The stage's newest intact checkpoint (None if it has none); each
    damaged one passed over is said with ``note``, and when none is intact
    the error names the newest damaged file."""
    found = checkpoints(stage_dir)
    for i, path in enumerate(found):
        if (problem := damage(path)) is None:
            return path
        file, why = problem
        if i + 1 == len(found):
            raise InputError(
                f"{quote(file)}: {why}; no older checkpoint of the {stage} stage "
                f"is intact. Remove {quote(Path(stage_dir) / CHECKPOINTS)} to "
                "train the stage again from the start"
            )
        note(f"[{stage}] {file}: {why}; resuming from the older {found[i + 1].name}")
    return None


def load_checkpoint(path, model, optimizer, digest) -> Progress:
    """Load an intact checkpoint (see :func:`damage`) into ``model`` and
    ``optimizer``; refuse one made with other settings."""
    with open(path / STATE_FILE) as f:
        state = json.load(f)
    if state.get("config_hash") != digest:
        raise TrainingError(
            f"{path}: the checkpoint was made with other settings (model, data, "
            "loss or optimisation changed); start a new run or restore them"
        )
    model.load_weights(str(path / adapters.ADAPTER_FILE), strict=False)
    optimizer.init(model.trainable_parameters())
    loaded = mx.load(str(path / TENSOR_FILES[1]))
    optimizer.state = tree_unflatten(list(loaded.items()))
    mx.eval(model.parameters(), optimizer.state)
    return Progress.from_dict(state)
