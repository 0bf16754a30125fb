"""Run folders: which adapter folder an ``--adapter-path`` means.

A run folder (``run.json``) resolves to its last trained stage (which stacks
on the earlier one); a stage folder or a plain mlx-lm adapter folder
resolves to itself. Used by the loader (:func:`rsa_mlx.tuner.model.load`) and the
exporter.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from rsa_mlx.tuner import adapters
from rsa_mlx.tuner.config import TrainConfig
from rsa_mlx.util.atomic import save_json, save_text
from rsa_mlx.util.errors import InputError, TrainingError, quote
from rsa_mlx.util.fingerprint import digest, local_path

RUN_FILE = "run.json"


def read_run(run_dir: Path) -> dict:
    path = Path(run_dir) / RUN_FILE
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"{quote(path)}: malformed JSON ({e.msg})") from None


def resolve_adapter(adapter_path: Path) -> tuple[Path, dict | None]:
    """The adapter folder to apply for ``adapter_path`` and the run, if any."""
    adapter_path = Path(adapter_path)
    if not adapter_path.exists():
        raise InputError(f"{quote(adapter_path)}: no such adapter or run folder")
    if (adapter_path / RUN_FILE).exists():
        run = read_run(adapter_path)
        if not run.get("stages"):
            raise InputError(f"{quote(adapter_path)}: the run has no finished stage")
        return adapter_path / run["stages"][-1]["path"], run
    if not (adapter_path / adapters.CONFIG_FILE).exists():
        raise InputError(
            f"{quote(adapter_path)}: neither a run folder ({RUN_FILE}) nor an "
            f"adapter folder ({adapters.CONFIG_FILE})"
        )
    return adapter_path, None


def default_merge(run: dict | None) -> float:
    """The run's merge ratio q for its last stage (1 for a single stage)."""
    return float(run.get("merge", 1.0)) if run and len(run["stages"]) > 1 else 1.0


def check_merge(merge: float | None) -> None:
    """The merge ratio q must lie in [0, 1] (None: the run's own)."""
    if merge is not None and not 0.0 <= merge <= 1.0:
        raise InputError(f"--merge is a ratio q in [0, 1], not {merge:g}")


def finished(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run trained to its end (``final`` written)."""
    return (Path(run_dir) / RUN_FILE).exists() and "final" in read_run(run_dir)


def input_paths(cfg: TrainConfig) -> list[tuple[str, Path]]:
    """``(what, resolved path)`` of the run's local inputs: the model and
    each stage's data (Hugging Face ids are not local: left out)."""
    named = [("model", cfg.model)]
    named += [(f"{stage} data", cfg.stage_data(stage)) for stage in cfg.stage_names]
    return [(what, path) for what, value in named if (path := local_path(value))]


def digest_inputs(named: list[tuple[str, Path]]) -> dict[str, dict]:
    """``{path: {"what", "sha256"}}``, each path hashed once
    (:func:`rsa_mlx.util.fingerprint.digest`: streamed; a model's weights by
    their safetensors headers)."""
    out: dict[str, dict] = {}
    for what, path in named:
        if str(path) not in out:
            out[str(path)] = {"what": what, "sha256": digest(path)}
    return out


def changed_inputs(saved: dict | None, current: dict) -> list[str]:
    """``the <what> '<path>'`` for each input recorded in ``saved`` whose
    content is no longer the same (inputs not recorded are new: fine)."""
    return [
        f"the {now['what']} {quote(path)}"
        for path, now in current.items()
        if path in (saved or {}) and saved[path].get("sha256") != now["sha256"]
    ]


def write_config(run_dir: Path, cfg: TrainConfig) -> None:
    """The run's settings as ``config.yaml``, the base of ``--resume``."""
    settings = yaml.safe_dump({**cfg.to_dict(), "resume": False}, sort_keys=False)
    save_text(Path(run_dir) / "config.yaml", settings)


def start_from(cfg: TrainConfig, run_dir: Path, source: Path) -> None:
    """Make ``run_dir`` a run of ``cfg`` whose first stage is the finished
    first stage of the run in ``source``, trained with the same first-stage
    settings (the caller's promise: see :func:`rsa_mlx.study.sweep.stage1_key`).
    ``train`` with ``resume`` then trains only the later stage. The adapter
    files are copied, so the stage is reused bit for bit; the folder appears
    whole or not at all."""
    cfg = cfg.with_resolved_paths()
    first = cfg.stage_names[0]
    done = {s["name"]: s for s in read_run(source)["stages"]}
    if first not in done:
        raise TrainingError(f"{quote(source)}: its {first} stage is not finished")
    tmp = run_dir.with_name(run_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / first).mkdir(parents=True)
    for name in (adapters.CONFIG_FILE, adapters.ADAPTER_FILE):
        shutil.copy2(Path(source) / first / name, tmp / first / name)
    write_config(tmp, cfg)
    run = {"model": cfg.model, "method": cfg.method_name(), "merge": cfg.merge}
    run.update(inputs=digest_inputs(input_paths(cfg)), world_size=1)
    save_json(tmp / RUN_FILE, {**run, "stages": [done[first]]})
    tmp.rename(run_dir)
