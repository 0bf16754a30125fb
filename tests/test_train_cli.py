"""``python -m rsa_mlx.train`` and ``rsa-mlx align`` as a user runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx_lm.utils import load as mlx_load

from rsa_mlx.cli import main as cli_main
from rsa_mlx.cli.align import main as train_main
from rsa_mlx.tuner import adapters, config
from tests.hang import HANG_S
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
        timeout=HANG_S,
    )


@pytest.mark.slow
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
        (["--model", "{model}", "--data", "{pku}", "--lora-dropout", "1.5"], "dropout"),
        (["--model", "{model}", "--data", "{pku}", "--warmup", "-1"], "warmup"),
        (["--model", "{model}", "--data", "{pku}", "--lora-rank", "-2"], "lora rank"),
        (["--model", "{model}", "--data", "{pku}", "--lora-rank", "0"], "lora rank"),
        (["--model", "{model}", "--data", "{pku}", "--num-layers", "0"], "num_layers"),
        (
            ["--model", "{model}", "--data", "{pku}", "--lora-keys", "nonsense"],
            "'nonsense' is not a linear layer",
        ),
        (["--model", "{model}", "--data", "{pku}", "--merge", "2"], "merge"),
        (["--model", "{model}", "--data", "{pku}", "--alpha", "-1"], "alpha"),
        (["--model", "{model}", "--data", "{pku}", "--weight-decay", "-1"], "weight"),
        (["--model", "{model}", "--data", "{pku}", "--steps-per-eval", "-1"], "eval"),
        (
            ["--model", "{model}", "--data", "{pku}", "--risk", "kl", "--mu", "0.5"],
            "the kl measure has no level",
        ),
        (["--resume"], "nothing to resume"),
    ],
)
def test_bad_input_gives_one_line_and_nonzero_exit(tiny, tmp_path, args, message):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.jsonl").write_text(json.dumps(pku_rows(1)[0]) + "\n{oops\n")
    fill = {"model": tiny / "model", "pku": tiny / "pku", "bad": bad}
    args = [a.format(**fill) for a in args] + ["--adapter-path", str(tmp_path / "run")]
    result = CliRunner().invoke(train_main, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    if "Invalid value" not in result.output:
        lines = [x for x in result.output.splitlines() if x.strip()]
        lines = [x for x in lines if not x.startswith("note: MLX is using")]
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
    # nothing written at all for a run that never started
    assert not (tmp_path / "run").exists()


def test_config_errors_leave_nothing_behind_so_the_retry_works(tiny, tmp_path):
    run_dir = tmp_path / "run"
    base = ["--model", str(tiny / "model"), "--data", str(tiny / "pku")]
    base += ["--iters", "1", "--stages", "reward", "--adapter-path", str(run_dir)]
    bad = CliRunner().invoke(train_main, [*base, "--lora-keys", "nonsense"])
    assert bad.exit_code == 2 and not run_dir.exists()
    good = CliRunner().invoke(train_main, [*base, "--lora-keys", "self_attn.q_proj"])
    assert good.exit_code == 0, good.output


def test_resume_of_a_typo_starts_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(train_main, ["--resume", "--adapter-path", "typo"])
    assert result.exit_code == 2
    assert "nothing to resume in 'typo'" in result.output
    assert list(tmp_path.iterdir()) == []  # no demo started, no typo/data/


def test_refused_resume_names_the_settings_and_keeps_the_run(tiny, tmp_path):
    run_dir = tmp_path / "run"
    args = ["--model", str(tiny / "model"), "--data", str(tiny / "pku"), "--iters"]
    args += ["2", "--stages", "reward", "--adapter-path", str(run_dir)]
    assert CliRunner().invoke(train_main, args).exit_code == 0
    saved = (run_dir / "config.yaml").read_bytes()
    resume = ["--adapter-path", str(run_dir), "--resume"]
    result = CliRunner().invoke(train_main, [*resume, "--learning-rate", "2e-3"])
    assert result.exit_code == 2
    assert "with other settings: learning_rate 1e-05 -> 0.002" in result.output
    assert (run_dir / "config.yaml").read_bytes() == saved
    # the saved settings are the base of a resume: nothing to give again
    again = CliRunner().invoke(train_main, [*resume, "--steps-per-report", "5"])
    assert again.exit_code == 0, again.output


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_exit_status_and_resume_hint(monkeypatch, tmp_path, signum):
    from rsa_mlx.cli import align as entry
    from rsa_mlx.tuner.trainer import Interrupted

    checkpoint = tmp_path / "my run" / "reward" / "checkpoints" / "step_0000003"

    def stopped(options):
        raise Interrupted(signum, "reward", 3, checkpoint)

    monkeypatch.setattr(entry, "run", stopped)
    result = CliRunner().invoke(train_main, [])
    assert result.exit_code == 128 + signum  # 130 for Ctrl-C, 143 for SIGTERM
    assert f"--adapter-path '{tmp_path / 'my run'}' --resume" in result.output


def test_bugs_keep_their_traceback(monkeypatch):
    from rsa_mlx.cli import align as entry

    def bug(options):
        raise ValueError("a bug, not bad input")

    monkeypatch.setattr(entry, "run", bug)
    result = CliRunner().invoke(train_main, [])
    assert result.exit_code == 1 and isinstance(result.exception, ValueError)


def test_slow_blas_is_named_once_with_the_fix(monkeypatch):
    from rsa_mlx.cli import align as entry
    from rsa_mlx.util import blas

    monkeypatch.setattr(entry, "run", lambda options: None)
    monkeypatch.setattr(blas.STATUS, "loaded", False)
    monkeypatch.setattr(entry.sys, "platform", "linux")
    result = CliRunner().invoke(train_main, [])
    assert result.output.count("reference BLAS") == 1
    assert "apt-get install libopenblas0-pthread" in result.output
    monkeypatch.setattr(blas.STATUS, "loaded", True)
    assert "BLAS" not in CliRunner().invoke(train_main, []).output


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
    # every setting is a flag, with the default from TrainConfig
    for name, f in config.FIELDS.items():
        if f.metadata.get("cli", True):
            assert "--" + name.replace("_", "-") in result.output, name
    assert "--lora-rank INTEGER" in result.output
    lines = " ".join(result.output.split())
    assert f"LoRA rank. [default: {adapters.LoRAConfig().rank}]" in lines
    assert "AdamW learning rate (cosine decay). [default: 1e-05]" in lines
