"""Data-parallel training: two local processes over the ring backend.

Every run is a subprocess bounded by a timeout, on 127.0.0.1 only, with a
tiny model; each process uses one BLAS thread.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from rsa_mlx.cli import launch
from rsa_mlx.tuner import distributed as dist
from rsa_mlx.tuner.data import BatchSampler, Encoded
from rsa_mlx.util.errors import quote
from tests.hang import HANG_S
from tests.tiny import pku_rows, write_jsonl, write_model

ROOT = Path(__file__).resolve().parent.parent
# 9 pairs in batches of 4: each epoch has a last batch of 1 pair, which
# leaves rank 1 an empty shard; 4 iterations cross into the second epoch.
SETTINGS = [
    "--iters", "4", "--batch-size", "4", "--learning-rate", "1e-3",
    "--num-layers", "-1", "--steps-per-report", "1", "--save-every", "2",
]  # fmt: skip


# ------------------------------------------------------------------ sharding


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 7, 8])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_are_disjoint_contiguous_and_cover_the_batch(n, world):
    indices = list(range(100, 100 + n))
    parts = [dist.shard(indices, r, world) for r in range(world)]
    assert [i for p in parts for i in p] == indices  # disjoint, in order, all
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_shard_of_an_uneven_batch():
    assert dist.shard([5, 6, 7], 0, 2) == [5, 6]
    assert dist.shard([5, 6, 7], 1, 2) == [7]
    assert dist.shard([5], 1, 2) == []
    with pytest.raises(ValueError):
        dist.shard([1, 2], 2, 2)


def encoded(n: int) -> Encoded:
    rng = np.random.default_rng(0)
    ids = [rng.integers(1, 50, size=rng.integers(1, 9)).astype(np.int32) for _ in range(3 * n)]  # fmt: skip
    return Encoded(ids[:n], ids[n : 2 * n], ids[2 * n :])


def test_sampler_ranks_see_disjoint_shards_of_the_single_process_batches():
    data = encoded(9)  # batches of 4, 4 and 1 pairs
    single = BatchSampler(data, 4, seed=3)
    ranks = [BatchSampler(data, 4, seed=3, rank=r, world=2) for r in range(2)]
    streams = [iter(s) for s in [single, *ranks]]
    for _ in range(7):  # more than two epochs, in the same global order
        whole, *parts = [next(s) for s in streams]
        assert whole.weight is None
        assert sum(p.pairs for p in parts) == whole.pairs
        assert sum(p.real_tokens for p in parts) == whole.real_tokens
        # weights: world * share of the pairs, so their mean is 1
        assert sum(p.weight for p in parts) == pytest.approx(2.0)
        chosen = [
            tuple(row[row != 0])
            for p in parts
            for row in p.tokens[: p.pairs]
            if p.pairs
        ]
        assert chosen == [tuple(row[row != 0]) for row in whole.tokens[: whole.pairs]]
        if whole.pairs == 1:  # rank 1 stands in with one pair, weight 0
            assert parts[1].pairs == 0 and parts[1].weight == 0.0
            assert parts[1].tokens.shape[0] == 2
    assert ranks[0].state == ranks[1].state == single.state


def test_sampler_with_one_process_is_unchanged():
    data = encoded(9)
    a, b = iter(BatchSampler(data, 4, seed=1)), iter(BatchSampler(data, 4, 1, 0, 0, 1))
    for _ in range(4):
        x, y = next(a), next(b)
        assert np.array_equal(x.tokens, y.tokens) and y.weight is None
        assert len(y.arrays()) == 5


def test_a_single_process_is_a_group_of_one():
    assert dist.world_size() == 1 and dist.rank() == 0 and dist.is_main()
    assert dist.sum_values([1.5, 2.0]) == [1.5, 2.0]
    assert dist.broadcast_flag(3) == 3
    assert dist.rank_zero_only("the demo") is False


def test_commands_that_run_on_rank_zero_only(monkeypatch, capsys):
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "rank", lambda: 1)
    assert dist.rank_zero_only("the demo") is True  # rank 1 exits at once
    assert capsys.readouterr().out == ""
    monkeypatch.setattr(dist, "rank", lambda: 0)
    monkeypatch.setattr(dist, "_ALONE", False)
    assert dist.rank_zero_only("the demo") is False
    assert capsys.readouterr().out.strip() == (
        "note: the demo runs on rank 0 only; the other 1 process(es) exit"
    )
    monkeypatch.undo()


def test_launcher_exit_status():
    assert launch.exit_code({0: (0, False), 1: (0, False)}) == 0
    assert launch.exit_code({0: (-15, True), 1: (2, False)}) == 2
    assert launch.exit_code({0: (-15, False), 1: (0, False)}) == 1


# ----------------------------------------------------------------- processes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    write_model(root / "model")
    write_jsonl(root / "pku" / "train.jsonl", pku_rows(9))
    return root


def free_ports(n: int) -> int:
    """A port p with p .. p + n - 1 all free on 127.0.0.1 now: the ring
    backend listens on one port per rank from ``-p p`` on, and other programs
    on a shared host hold ports too (checking p alone let p + 1 be taken)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + n - 1 > 65535:
            continue
        with ExitStack() as held:
            try:
                for p in range(port, port + n):
                    held.enter_context(socket.socket()).bind(("127.0.0.1", p))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no {n} consecutive free ports on 127.0.0.1")


def env(**extra) -> dict:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OPENBLAS_NUM_THREADS": "1",
        **extra,
    }


def run(command: list[str], cwd, **extra) -> subprocess.CompletedProcess:
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env(**extra),
        timeout=HANG_S,
    )


def launched(n: int, command: list[str], cwd, **extra):
    """``python -m rsa_mlx.launch -n n --backend ring -- command`` on 127.0.0.1."""
    port = str(free_ports(n))
    launcher = [sys.executable, "-m", "rsa_mlx.launch", "-n", str(n)]
    launcher += ["--backend", "ring", "-p", port, "--"]
    return run([*launcher, *command], cwd, **extra)


def train_command(tiny, run_dir, *extra, entry=("-m", "rsa_mlx.train")):
    return [
        sys.executable, *entry, "--model", str(tiny / "model"),
        "--data", str(tiny / "pku"), *SETTINGS, "--adapter-path", str(run_dir), *extra,
    ]  # fmt: skip


def adapter(run_dir: Path, stage: str) -> dict:
    return mx.load(str(run_dir / stage / "adapters.safetensors"))


def assert_same_adapters(a: Path, b: Path, stages=("reward", "safety", "final")):
    for stage in stages:
        x, y = adapter(a, stage), adapter(b, stage)
        assert x.keys() == y.keys()
        for k in x:
            assert np.allclose(np.array(x[k]), np.array(y[k]), atol=2e-5), (stage, k)


def rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def speakers(stderr: str, message: str) -> list[str]:
    """The ranks whose ``error:`` line says ``message`` (of two), sorted.

    A bad setting is the same on every rank: rank 0 says why; another rank
    waits 3 s for the launcher to stop it and says it too, naming itself, only
    if it is still running (cli/align.py), which a loaded host can make happen.
    So once per rank at most, and never unnamed twice."""
    said = [line for line in stderr.splitlines() if message in line]
    lines = {f"error: {message}": "rank 0", f"error: rank 1: {message}": "rank 1"}
    assert all(line in lines for line in said), stderr
    return sorted(lines[line] for line in said)


ONE_OR_BOTH = (["rank 0"], ["rank 1"], ["rank 0", "rank 1"])


@pytest.fixture(scope="module")
def runs(tiny):
    """The same training by one process and by two (``rsa-mlx align``)."""
    single = run(train_command(tiny, tiny / "single"), tiny)
    assert single.returncode == 0, single.stderr
    script = Path(sys.executable).parent / "rsa-mlx"
    entry = [str(script), "align"] if script.exists() else ["-m", "rsa_mlx.train"]
    command = train_command(tiny, tiny / "two", entry=())
    command = entry + command[1:] if script.exists() else command
    two = launched(2, command, tiny)
    assert two.returncode == 0, two.stderr
    return tiny / "single", tiny / "two", two


@pytest.mark.slow
def test_two_processes_train_the_same_adapters_as_one(runs):
    single, two, _ = runs
    assert_same_adapters(single, two)


@pytest.mark.slow
def test_metrics_are_those_of_the_whole_batch(runs):
    single, two, _ = runs
    a, b = rows(single), rows(two)
    assert [(r["stage"], r["iteration"]) for r in a] == [
        (r["stage"], r["iteration"]) for r in b
    ]
    for x, y in zip(a, b):
        assert y["trained_tokens"] == x["trained_tokens"]
        for key in ("loss", "accuracy", "margins", "kl", "risk", "ntokens/chosen"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-5), key


@pytest.mark.slow
def test_only_rank_zero_writes_and_prints(runs):
    single, two, out = runs
    keys = [(r["stage"], r["kind"], r["iteration"]) for r in rows(two)]
    assert len(keys) == len(set(keys)) == 8  # no duplicate rows
    assert json.loads((two / "run.json").read_text())["world_size"] == 2
    assert json.loads((single / "run.json").read_text())["world_size"] == 1
    assert out.stdout.count("[reward] it     4/4") == 1
    assert out.stdout.count("run folder:") == 1
    assert "data-parallel over 2 processes" in out.stdout
    state = json.loads((two / "reward/checkpoints/step_0000004/state.json").read_text())
    assert state["world_size"] == 2


@pytest.mark.slow
def test_resume_with_another_world_size_is_refused(runs):
    single, two, _ = runs
    out = run(train_command(runs[0].parent, two, "--resume"), two.parent)
    assert out.returncode == 2
    assert "trained by 2 processes" in out.stderr and "mlx.launch -n 2" in out.stderr
    out = launched(2, train_command(runs[0].parent, single, "--resume"), single.parent)
    assert out.returncode == 2, out.stderr
    message = (
        f"{quote(single)}: this run was trained by 1 process; resume it with the "
        "same number (without mlx.launch), not 2"
    )
    assert speakers(out.stderr, message) in ONE_OR_BOTH, out.stderr


@pytest.mark.slow
def test_a_failing_rank_fails_the_run_and_resume_finishes_it(runs, tiny):
    _, two, _ = runs
    run_dir = tiny / "failed"
    command = train_command(tiny, run_dir, entry=(str(ROOT / "tests/dist_entry.py"),))
    # rank 1 cannot read its 4th batch: after the checkpoint at iteration 2
    out = launched(2, command, tiny, RSA_MLX_TEST_FAIL="1:4")
    assert out.returncode != 0
    assert "error: rank 1: train.jsonl: unreadable" in out.stderr, out.stderr
    assert "the distributed run failed" in out.stderr
    assert not (run_dir / "final").exists()
    assert (run_dir / "reward/checkpoints/step_0000002").exists()
    out = launched(2, train_command(tiny, run_dir, "--resume"), tiny)
    assert out.returncode == 0, out.stderr
    assert "resumed from" in out.stdout
    assert_same_adapters(run_dir, two)
    keys = [(r["stage"], r["iteration"]) for r in rows(run_dir)]
    assert len(keys) == len(set(keys)) == 8


@pytest.mark.slow
def test_batch_size_must_divide_by_the_world_size(tiny):
    command = train_command(tiny, tiny / "odd", "--batch-size", "3")
    out = launched(2, command, tiny)
    assert out.returncode == 2, out.stderr
    message = (
        "batch_size: 3 pairs do not split over 2 processes; --batch-size "
        "is the global batch, give a multiple of 2"
    )
    assert speakers(out.stderr, message) in ONE_OR_BOTH, out.stderr
    assert not (tiny / "odd").exists()
