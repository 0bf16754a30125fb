"""``python -m rsa_mlx.launch``: ``mlx.launch`` with the ranks' exit status.

The same options and command as ``mlx.launch`` (it runs mlx's launcher), for
example::

    python -m rsa_mlx.launch -n 2 --backend ring -- $(which rsa-mlx) align ...

``mlx.launch`` stops the other ranks when one fails but itself exits 0 (mlx
0.32). This wrapper exits with the status of the first rank that failed on
its own (not one the launcher stopped), after one ``error:`` line naming
the failed ranks, so that scripts and CI see a failed run as failed.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from mlx._distributed_utils import launch

    statuses: dict[int, tuple] = {}
    base = launch.RemoteProcess

    class Recorded(base):
        def __init__(self, rank, *args, **kwargs):
            super().__init__(rank, *args, **kwargs)
            self._rsa_rank = rank

        @property
        def exit_status(self):
            status = super().exit_status
            statuses[self._rsa_rank] = status
            return status

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    launch.RemoteProcess = Recorded
    try:
        launch.main()
    finally:
        launch.RemoteProcess = base
    return exit_code(statuses)


def exit_code(statuses: dict[int, tuple]) -> int:
    """0 when every rank succeeded; else one ``error:`` line listing the
    failed ranks and the status of one that failed on its own (a rank the
    launcher stopped exits by SIGTERM; a signal alone gives 1)."""
    failed = [(r, code) for r, (code, _) in sorted(statuses.items()) if code]
    if not failed:
        return 0
    how = ", ".join(
        f"rank {r} " + (f"exited with code {c}" if c > 0 else f"by signal {-c}")
        for r, c in failed
    )
    print(f"error: the distributed run failed ({how})", file=sys.stderr)
    own = [c for _, c in failed if 0 < c < 256]
    return max(own) if own else 1


if __name__ == "__main__":
    sys.exit(main())
