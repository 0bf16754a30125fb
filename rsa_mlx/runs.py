"""Run folders: which adapter folder an ``--adapter-path`` means.

A run folder (``run.json``) resolves to its last trained stage (which stacks
on the earlier one); a stage folder or a plain mlx-lm adapter folder
resolves to itself. Used by the loader (:func:`rsa_mlx.model.load`) and the
exporter.
"""

from __future__ import annotations

import json
from pathlib import Path

from rsa_mlx import adapters
from rsa_mlx.errors import InputError, quote

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
