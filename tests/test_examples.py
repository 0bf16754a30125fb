"""The examples run as users run them, offline, on tiny budgets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hang import HANG_S
from tests.hf_tiny import torch_or_skip, write_hf_model
from tests.tiny import pku_rows, write_jsonl

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(command, env, cwd):
    out = subprocess.run(
        command,
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **env},
        timeout=HANG_S,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_python_api_example(tmp_path):
    work = tmp_path / "work"
    stdout = run(
        [sys.executable, str(EXAMPLES / "python_api.py")],
        {"WORK": str(work), "ITERS": "2", "SAMPLES": "1"},
        tmp_path,
    )
    assert "| rsa |" in stdout and "stages: ['reward', 'safety']" in stdout
    assert (work / "hf" / "model.safetensors").exists()
    assert (work / "peft" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_real_model_recipe_with_local_folders_in_the_hub_layout(tmp_path):
    torch_or_skip()
    model = write_hf_model(tmp_path / "hf-model", "qwen2")
    data = tmp_path / "pku"  # PKU-SafeRLHF-30K's layout: train.jsonl, test.jsonl
    write_jsonl(data / "train.jsonl", pku_rows(8))
    write_jsonl(data / "test.jsonl", pku_rows(4, seed=1))
    work = tmp_path / "work"
    env = {
        "MODEL": str(model),
        "DATA": str(data),
        "JUDGE": str(model),  # any model mlx-lm loads can judge
        "WORK": str(work),
        "ITERS": "1",
        "EVAL_PROMPTS": "2",
        "K": "1",
        "MAX_TOKENS": "3",
        "MAX_SEQ": "128",
        "RSA_MLX": f"{sys.executable} -m rsa_mlx.cli",
        "PYTHON": sys.executable,
    }
    stdout = run(["bash", str(EXAMPLES / "real_model_recipe.sh")], env, tmp_path)
    assert "=== done" in stdout
    table = (work / "eval" / "table.md").read_text()
    assert all(f"| {name} |" in table for name in ("base", "helpful", "rsa"))
    assert (work / "hf" / "config.json").exists()
    assert (work / "peft" / "adapter_config.json").exists()
    assert "cvar" in (work / "hf" / "README.md").read_text()


def test_sweep_examples_plan_the_two_search_steps():
    from rsa_mlx.cli.sweep import plan
    from rsa_mlx.study.grid import expand

    def planned(name):
        return plan(str(EXAMPLES / name), None, None, None, (), None, (), {})

    base, grid, evaluation, path, harms = planned("sweep_smollm2.yaml")
    cells = expand(base, grid)
    assert len(cells) == 9 and len({c.train_key for c in cells}) == 9
    assert len({c.stage1_key for c in cells}) == 9  # method x seed
    assert evaluation["evaluator"] == "recipe" and harms == ["unsafe_rate"]
    assert path == "work/smollm2/sweep"
    # the scan: stage 1 does not depend on the safety temperature
    base, grid, evaluation, path, harms = planned("sweep_smollm2_scan.yaml")
    cells = expand(base, grid)
    assert len(cells) == 32 and len({c.train_key for c in cells}) == 32
    assert len({c.stage1_key for c in cells}) == 16
    assert evaluation["samples"] == 0 and path == "work/smollm2/scan"


@pytest.mark.parametrize(
    ("env", "flags"),
    [
        ({}, []),
        ({"QUICK": "1"}, ["--quick"]),
        ({"SEEDS": "0,1,2"}, ["--seeds", "0,1,2"]),
    ],
)
def test_offline_recipe_script_passes_its_settings_on(tmp_path, env, flags):
    # a stand-in Python that records the recipe's arguments: the script's
    # wiring, without an hour of training
    work = tmp_path / "work"
    (work / "wheels").mkdir(parents=True)
    (work / "wheels" / "pyrit-1.1.0-py3-none-any.whl").write_text("")
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path / "args"}\n')
    fake.chmod(0o755)
    given = {"PYTHON": str(fake), "WORK": str(work), "MODEL": "m.gguf", **env}
    run(["bash", str(EXAMPLES / "smollm2_offline_recipe.sh")], given, tmp_path)
    args = (tmp_path / "args").read_text().split("\n")[:-1]
    wheel = str(work / "wheels" / "pyrit-1.1.0-py3-none-any.whl")
    assert args == ["-m", "rsa_mlx.recipe", "--harmful", wheel, "--out",
                    f"{work}/run", "--seed", "0", "--model", "m.gguf",
                    *flags]  # fmt: skip
