"""Smoke test of benchmarks/bench_peers.py: our runner, through the driver's
line protocol, on a tiny model (the peers run only where their virtual
environments exist: benchmarks/peers/setup.sh)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 300,
}


def bench():
    spec = importlib.util.spec_from_file_location(
        "bench_peers", ROOT / "benchmarks" / "bench_peers.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # subprocesses (and the peers, where installed): ~10-60 s
@pytest.mark.parametrize("shape", ["fixed", "mix"])
def test_rsa_runner_through_the_driver(tmp_path, shape):
    bp = bench()
    pairs = bp.make_pairs(shape, TINY["vocab_size"], pairs=6)
    assert all(p["chosen"][-1] == bp.EOS and p["rejected"][-1] == bp.EOS for p in pairs)
    systems = ["rsa-dpo", "rsa-cvar"]
    for peer in ("mlx-lm-lora", "trl"):  # only where setup.sh installed them
        if (bp.PEERS / peer / "bin" / "python").exists():
            systems.append(peer)
    result = bp.run(systems, shape, tmp_path, 1, 1, 1, 2, config=TINY, pairs=6)
    for name in systems:
        assert math.isclose(result["first_loss"][name], math.log(2), rel_tol=1e-5)
        assert len(result["times"][name]) == 1
    assert result["peak_gb"]["rsa-dpo"] > 0
    assert "| rsa-cvar |" in bp.table(result)
