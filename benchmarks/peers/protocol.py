"""The line protocol between ``bench_peers.py`` and a runner (stdlib only).

A runner loads its model and data, prints ``READY <json>`` and waits. The
driver sends ``steps N``: the runner trains N more steps of its own loop
and prints ``RESULT <json>`` with the wall time of each step (batch
building, forward, backward and optimizer update, evaluated), the losses
and peak memory. ``quit`` ends it. Everything else a runner prints is
ignored by the driver.
"""

from __future__ import annotations

import json
import os
import resource
import sys


def rss_peak_gb() -> float:
    """Peak resident memory of this process (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6 * 1.024


def send(kind: str, payload: dict) -> None:
    sys.stdout.write(f"{kind} {json.dumps(payload)}\n")
    sys.stdout.flush()


def wait() -> int | None:
    """Block for the driver's next command: steps to run, or None to quit."""
    line = sys.stdin.readline()
    if not line or line.strip() == "quit":
        return None
    return int(line.split()[1])


def finish() -> None:
    """Leave at once: a peer's loop would otherwise save or fuse adapters."""
    sys.stdout.flush()
    os._exit(0)


def load_pairs(path: str) -> list[dict]:
    """``[{"prompt": [ids], "chosen": [ids], "rejected": [ids]}, ...]``."""
    with open(path) as f:
        return json.load(f)["pairs"]


def preload_openblas() -> str | None:
    """Load OpenBLAS before MLX, as rsa_mlx does on import (rsa_mlx/util/blas.py)."""
    import ctypes

    for path in (
        "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
        "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    ):
        if os.path.exists(path):
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return path
    return None


class Session:
    """Counts steps and talks to the driver; runners call :meth:`record`
    after each evaluated step."""

    def __init__(self):
        self.todo = 0
        self.times: list[float] = []
        self.losses: list[float] = []

    def ready(self, **info) -> None:
        send("READY", info)
        self._next()

    def _next(self) -> None:
        n = wait()
        if n is None:
            finish()
        self.todo, self.times, self.losses = n, [], []

    def record(self, seconds: float, loss: float, peak_gb: float | None) -> None:
        self.times.append(seconds)
        self.losses.append(loss)
        self.todo -= 1
        if self.todo <= 0:
            send(
                "RESULT",
                {
                    "times": self.times,
                    "losses": self.losses,
                    "peak_gb": peak_gb,
                    "rss_peak_gb": rss_peak_gb(),
                },
            )
            self._next()
