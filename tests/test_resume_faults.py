"""Resuming a run under faults (issue 22): changed data, damaged files,
deleted checkpoints, and two processes on one run folder."""

from __future__ import annotations

import json

import pytest

from rsa_mlx.tuner import config, trainer
from rsa_mlx.util.errors import ConfigError
from tests.tiny import pku_rows, write_jsonl, write_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("resume") / "model")


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "data" / "train.jsonl", pku_rows(16))


def cfg_for(model, data, run_dir, **overrides):
    settings = {
        "model": str(model), "data": str(data.parent), "iters": 6,
        "batch_size": 2, "adapter_path": str(run_dir), "steps_per_eval": 0,
        "save_every": 2, "learning_rate": 1e-3, "num_layers": -1,
        "stages": "reward", "keep_checkpoints": 3,
    }  # fmt: skip
    settings.update(overrides)
    return config.resolve(settings)


class Interrupt(trainer.Reporter):
    """Kills the run at once (like a crash) after an iteration."""

    def __init__(self, run_dir, at):
        super().__init__(run_dir)
        self.at = at

    def tick(self, stage, it, iters, seconds):
        if it == self.at:
            raise KeyboardInterrupt


def interrupted(model, data, run_dir, at=5):
    with pytest.raises(KeyboardInterrupt):
        trainer.train(cfg_for(model, data, run_dir), reporter=Interrupt(run_dir, at))
    return cfg_for(model, data, run_dir, resume=True)


def test_resume_refuses_changed_data(model, data, tmp_path):
    """Item 3: the data's content hash is recorded in run.json."""
    run_dir = tmp_path / "run"
    resume = interrupted(model, data, run_dir)
    original = data.read_text()
    data.write_text("".join(original.splitlines(True)[:8]))  # cut to half
    with pytest.raises(ConfigError, match=r"the reward data .*data' changed since"):
        trainer.train(resume)
    data.write_text(original)
    assert trainer.train(resume)["final"] == "final"
    recorded = json.loads((run_dir / "run.json").read_text())["inputs"]
    assert recorded[str(data.parent)]["what"] == "reward data"


# ------------------------------------------------------------- damaged runs


class Notes(trainer.Reporter):
    def __init__(self, run_dir):
        super().__init__(run_dir)
        self.notes = []

    def note(self, text):
        self.notes.append(text)
        super().note(text)


def adapters_of(run_dir):
    import mlx.core as mx
    import numpy as np

    loaded = mx.load(str(run_dir / "reward" / "adapters.safetensors"))
    return {k: np.array(v) for k, v in loaded.items()}


def align_resume(run_dir):
    from click.testing import CliRunner

    from rsa_mlx.cli import main

    return CliRunner().invoke(
        main, ["align", "--adapter-path", str(run_dir), "--resume"]
    )


def one_line(result) -> str:
    assert result.exit_code == 2, result.output + repr(result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_a_damaged_checkpoint_falls_back_to_the_older_one(model, data, tmp_path):
    whole = tmp_path / "whole"
    trainer.train(cfg_for(model, data, whole))
    run_dir = tmp_path / "run"
    resume = interrupted(model, data, run_dir)
    steps = sorted((run_dir / "reward" / "checkpoints").glob("step_*"))
    assert [p.name for p in steps] == ["step_0000002", "step_0000004"]
    weights = steps[-1] / "adapters.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-16:] = b"\x7f" * 16  # garbage in the tensors, the header intact
    weights.write_bytes(bytes(blob))
    reporter = Notes(run_dir)
    trainer.train(resume, reporter=reporter)
    said = "\n".join(reporter.notes)
    assert f"{weights}: damaged" in said and "from the older step_0000002" in said
    want, got = adapters_of(whole), adapters_of(run_dir)
    assert all((want[k] == got[k]).all() for k in want)  # bit for bit


def test_damaged_run_files_are_one_line(model, data, tmp_path):
    run_dir = tmp_path / "run"
    interrupted(model, data, run_dir, at=3)  # one checkpoint: step 2
    state = run_dir / "reward" / "checkpoints" / "step_0000002" / "state.json"
    intact = state.read_text()
    state.write_text(intact[: len(intact) // 2])
    line = one_line(align_resume(run_dir))
    assert f"'{state}': damaged" in line and "no older checkpoint" in line


def test_a_truncated_run_json_is_one_line(model, data, tmp_path):
    run_dir = tmp_path / "run"
    interrupted(model, data, run_dir, at=3)
    run = run_dir / "run.json"
    run.write_text(run.read_text()[:20])
    line = one_line(align_resume(run_dir))
    assert f"'{run}': malformed JSON" in line


def test_deleted_checkpoints_are_said(model, data, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    resume = interrupted(model, data, run_dir)
    shutil.rmtree(run_dir / "reward" / "checkpoints")
    reporter = Notes(run_dir)
    trainer.train(resume, reporter=reporter)
    assert any(
        "no checkpoint in" in n and "trains again from the start" in n
        for n in reporter.notes
    ), reporter.notes


# ------------------------------------------------- two processes, one run

HOLD = """
import sys
from rsa_mlx.util.lock import folder_lock
with folder_lock(sys.argv[1], "training run", "wait") as stale:
    print("locked", stale, flush=True)
    sys.stdin.readline()
"""


def hold(folder):
    """Another process holding ``folder``'s lock (bounded: it waits on its
    stdin, and the test kills it)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], env=env, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    line = proc.stdout.readline()
    assert line.startswith("locked"), (line, proc.poll())
    return proc, line


def test_a_run_folder_is_one_process_at_a_time(model, data, tmp_path, capsys):
    """Item 1: a training run holds its folder; a second process is refused
    in one line; a lock left by a killed process is stale and taken over."""
    import os
    import signal

    from rsa_mlx.util.lock import Busy, check_free

    run_dir = tmp_path / "run"
    interrupted(model, data, run_dir, at=3)
    holder, _ = hold(run_dir)
    try:
        line = one_line(align_resume(run_dir))
        assert f"in use by another training run (process {holder.pid})" in line
        holder.kill()
        holder.wait(timeout=60)
    finally:
        holder.kill()
    assert -holder.returncode == signal.SIGKILL

    class Probe(Notes):  # while it trains, the folder is held
        def tick(self, stage, it, iters, seconds):
            with pytest.raises(Busy, match=f"process {os.getpid()}"):
                check_free(run_dir, "training run", "wait")

    capsys.readouterr()
    resume = cfg_for(model, data, run_dir, resume=True)
    assert trainer.train(resume, reporter=Probe(run_dir))["final"] == "final"
    # the killed holder's lock was stale: taken over, and said
    assert f"left locked by process {holder.pid}" in capsys.readouterr().out
    check_free(run_dir, "training run", "wait")  # released at the end
    again, line = hold(run_dir)  # and released cleanly: nothing stale
    again.communicate("\n", timeout=60)
    assert line.split() == ["locked", "None"]
