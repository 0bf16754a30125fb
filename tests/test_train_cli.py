"""``python -m rsa_mlx.train`` and ``rsa-mlx align`` as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx_lm.utils import load as mlx_load

from rsa_mlx.cli import main as cli_main
from rsa_mlx.train import main as train_main
from tests.tiny import pku_rows, preference_rows, write_jsonl, write_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    write_model(root / "model")
    write_jsonl(root / "pku" / "train.jsonl", pku_rows(12))
    write_jsonl(root / "pref" / "reward" / "train.jsonl", preference_rows(8))
    write_jsonl(root / "pref" / "safety" / "train.jsonl", preference_rows(8, seed=2))
    return root


def run_module(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    return subprocess.run(
        [sys.executable, "-m", "rsa_mlx.train", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
    )


def test_two_stage_run_end_to_end_as_a_subprocess(tiny, tmp_path):
    run_dir = tmp_path / "run"
    out = run_module(
        "--model",
        str(tiny / "model"),
        "--data",
        str(tiny / "pku"),
        "--iters",
        "4",
        "--batch-size",
        "3",
        "--num-layers",
        "-1",
        "--learning-rate",
        "1e-3",
        "--risk",
        "erm",
        "--mu",
        "2",
        "--steps-per-report",
        "2",
        "--merge",
        "0.8",
        "--adapter-path",
        str(run_dir),
    )
    assert out.returncode == 0, out.stderr
    assert "[reward] it     4/4" in out.stdout and "[safety] it     4/4" in out.stdout
    run = json.loads((run_dir / "run.json").read_text())
    assert [s["name"] for s in run["stages"]] == ["reward", "safety"]
    assert run["method"] == "variant2-erm2" and run["merge"] == 0.8
    tokens = mx.array([[1, 2, 3, 4]])
    model, _ = mlx_load(str(tiny / "model"), adapter_path=str(run_dir / "final"))
    assert np.isfinite(np.array(model(tokens))).all()


def test_separate_sources_yaml_config_and_order(tiny, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model: {tiny / 'model'}\nreward_data: {tiny / 'pref'}\n"
        f"safety_data: {tiny / 'pref'}\niters: 2\nbatch_size: 2\nloss: variant1\n"
        "risk: kl\norder: safety-first\nlora_parameters: {rank: 2, scale: 4.0}\n"
    )
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(
        cli_main,
        ["align", "-c", str(cfg), "--adapter-path", str(run_dir), "--iters", "3"],
    )
    assert result.exit_code == 0, result.output
    run = json.loads((run_dir / "run.json").read_text())
    assert [s["name"] for s in run["stages"]] == ["safety", "reward"]
    assert [s["iterations"] for s in run["stages"]] == [3, 3]  # CLI over YAML
    adapter = json.loads((run_dir / "safety" / "adapter_config.json").read_text())
    assert adapter["lora_parameters"]["rank"] == 2
    assert adapter["rsa_mlx"]["beta"] == pytest.approx(0.025)  # safety: beta/lam


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/nonexistent/model", "--data", "{pku}"], "error:"),
        (["--model", "{model}", "--data", "{bad}"], "train.jsonl:2: malformed JSON"),
        (
            ["--model", "{model}", "--data", "{pku}", "--mu", "3"],
            "mu: cvar needs 0 < mu <= 1",
        ),
        (["--model", "{model}"], "no data for the reward stage"),
        (["--model", "{model}", "--data", "{pku}", "--quick"], "are for the demo"),
        (
            ["--model", "{model}", "--data", "{pku}", "--risk", "var"],
            "Invalid value for '--risk'",
        ),
        (
            ["--model", "{model}", "--data", "{pku}", "-c", "/no/config.yaml"],
            "config.yaml",
        ),
    ],
)
def test_bad_input_gives_one_line_and_nonzero_exit(tiny, tmp_path, args, message):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.jsonl").write_text(json.dumps(pku_rows(1)[0]) + "\n{oops\n")
    fill = {"model": tiny / "model", "pku": tiny / "pku", "bad": bad}
    args = [a.format(**fill) for a in args] + ["--adapter-path", str(tmp_path / "run")]
    result = CliRunner().invoke(train_main, args)
    assert result.exit_code != 0
    assert message in result.output
    if result.exit_code == 2 and "Invalid value" not in result.output:
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ")
    # nothing half-written: no adapter files for a run that never started
    assert not list((tmp_path / "run").glob("*/adapters.safetensors"))


def test_help_lists_mlx_lm_spellings():
    result = CliRunner().invoke(train_main, ["--help"])
    for flag in (
        "--model",
        "--data",
        "--adapter-path",
        "--iters",
        "--batch-size",
        "--learning-rate",
        "--num-layers",
        "--max-seq-length",
        "--grad-accumulation-steps",
        "--grad-checkpoint",
        "--report-to",
        "--seed",
        "--config",
        "--resume",
        "--lam",
        "--safety-beta",
        "--merge",
    ):
        assert flag in result.output
