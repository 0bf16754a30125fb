"""Data-parallel training on MLX's distributed engine (``mlx.launch``).

Started under ``mlx.launch``, every process (rank) loads the model and the
data, cuts each global batch of ``--batch-size`` pairs into ``world``
disjoint shards (:func:`shard`) and runs the compiled step on its own shard.
The step weights each rank's gradient by its share of the batch's pairs and
averages it over the group (:func:`rsa_mlx.tuner.step.make_step`), so the update is the
single-process one even when the last batch of an epoch does not split
evenly. Metrics are pair-weighted sums, summed over the group when they are
reported. Only rank 0 prints and writes files.

A single process (no launcher) is a group of size 1 and everything here is
then a no-op: the code paths are those of a plain run.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path

import mlx.core as mx
import numpy as np

from rsa_mlx.util import progress
from rsa_mlx.util.errors import ConfigError, quote

__all__ = [
    "broadcast_flag",
    "group",
    "is_main",
    "rank",
    "rank_zero_only",
    "run_alone",
    "shard",
    "sum_values",
    "world_size",
]


@cache
def group() -> mx.distributed.Group:
    """The process group (size 1 without a launcher)."""
    return mx.distributed.init()


_ALONE = False


def world_size() -> int:
    return 1 if _ALONE else group().size()


def rank() -> int:
    return 0 if _ALONE else group().rank()


def run_alone() -> None:
    """From here on this process works as a single one (a command that runs
    on rank 0 only, the others having exited)."""
    global _ALONE
    _ALONE = True


def rank_zero_only(what: str) -> bool:
    """For commands that do not run data-parallel: ``True`` on ranks > 0
    (which should exit at once); rank 0 says so in one line and goes on
    alone. ``False`` without a launcher."""
    if world_size() == 1:
        return False
    if not is_main():
        return True

    progress.echo(
        f"note: {what} runs on rank 0 only; the other "
        f"{world_size() - 1} process(es) exit"
    )
    run_alone()
    return False


def is_main() -> bool:
    return rank() == 0


def shard(indices: Sequence[int], rank: int, world: int) -> list[int]:
    """Rank ``rank``'s contiguous share of a batch's pair ``indices``.

    The shards of ranks ``0 .. world-1`` are disjoint and, concatenated in
    rank order, give ``indices`` back; their sizes differ by at most one
    (the first ``len % world`` ranks take one more). A batch with fewer pairs
    than ranks leaves some shards empty.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a group of {world}")
    n = len(indices)
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    stop = start + base + (rank < extra)
    return list(indices[start:stop])


def sum_values(values: Sequence[float], dtype=mx.float32) -> list[float]:
    """Sum a few host numbers over the group (one all-reduce); as given
    when the group has one process."""
    if world_size() == 1:
        return list(values)
    total = mx.distributed.all_sum(mx.array(values, dtype=dtype), stream=mx.cpu)
    return np.array(total).tolist()


def broadcast_flag(value: int) -> int:
    """The largest of the ranks' values (e.g. any rank's failure)."""
    if world_size() == 1:
        return value
    return int(mx.distributed.all_max(mx.array(value), stream=mx.cpu).item())


def check_world_size(where: Path, saved: int) -> None:
    """Refuse to resume a run with another number of processes."""
    world = world_size()
    how = "without mlx.launch" if saved == 1 else f"mlx.launch -n {saved}"
    if saved != world:
        raise ConfigError(
            f"{quote(where)}: this run was trained by {processes(saved)}; resume "
            f"it with the same number ({how}), not {world}"
        )


def processes(n: int) -> str:
    return "1 process" if n == 1 else f"{n} processes"
