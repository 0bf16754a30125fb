"""The bundled demo: ``python -m rsa_mlx.train --quick`` end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from mlx_lm.utils import load as mlx_load

from rsa_mlx.demo import BASE_MODEL, METHODS, world
from rsa_mlx.demo.behaviour import kind_probabilities
from rsa_mlx.evaluate import PromptRecord, prompt_ids, sequence_logprobs


def test_bundled_base_model_is_an_mlx_lm_folder_with_the_base_behaviour():
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.model",
        "tokenizer_config.json",
        "BUILD.json",
    ):
        assert (BASE_MODEL / name).exists(), name
    model, tokenizer = mlx_load(str(BASE_MODEL))
    assert tokenizer.has_chat_template
    probs = kind_probabilities(model, tokenizer, world.make_world(0).test)
    harmful = probs["harmful"]
    # answers harmful requests harmfully some of the time, catastrophically rarely
    assert 0.2 < harmful["mild"] < 0.7
    assert 0.005 < harmful["catastrophic"] < 0.15
    assert harmful["other"] < 0.1 and probs["benign"]["other"] < 0.1


def test_exact_probabilities_are_sums_of_teacher_forced_sequences():
    model, tokenizer = mlx_load(str(BASE_MODEL))
    requests = world.make_world(0).test[:3]
    probs = kind_probabilities(model, tokenizer, requests)
    eot = tokenizer.convert_tokens_to_ids("<|end|>")
    for request, row in zip(requests, probs["per_request"]):
        p = prompt_ids(tokenizer, PromptRecord(request.text))
        for kind in request.kinds():
            texts = [
                [*tokenizer.encode(t, add_special_tokens=False), eot]
                for t in kind.texts
            ]
            want = sum(
                float(x)
                for x in __import__("numpy").exp(
                    sequence_logprobs(model, [p] * len(texts), texts)
                )
            )
            assert abs(row[kind.name] - want) < 1e-6
        assert abs(sum(row.values()) - 1.0) < 1e-6


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.run(
        [sys.executable, "-m", "rsa_mlx.train", "--quick", "--adapter-path", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("report.md", "results.json", "plot.svg"):
        assert (out / name).exists(), name
    results = json.loads((out / "results.json").read_text())
    assert {"base", *METHODS} <= set(results)
    assert any(" q=" in name for name in results)  # the merge sweep
    report = (out / "report.md").read_text()
    assert "| RSA, CVaR |" in report and "P(catastrophic)" in report
    assert "plot.svg" in report and (out / "plot.svg").read_text().startswith("<svg")
    assert "P(catastrophic)" in proc.stdout  # the table is printed
    for name in METHODS:
        if name != "dpo":
            assert (out / "methods" / name / "final" / "adapters.safetensors").exists()
    # helpfulness-only DPO is SACPO's first stage, trained once
    assert (out / "methods" / "sacpo" / "reward" / "adapters.safetensors").exists()
    assert "= the reward stage of sacpo" in report
    assert (out / "data" / "train.jsonl").exists()
