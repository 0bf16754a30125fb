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
