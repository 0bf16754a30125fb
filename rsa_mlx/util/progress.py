"""Progress a person can follow: rich bars on a terminal, plain lines elsewhere.

On a terminal, long work (a training stage, validation, evaluation, the demo
as a whole) shows mlx-lm's bar (``mlx_lm.cli_ui``) with elapsed time and an
ETA; tasks opened while another is running stack in the same live display,
and :func:`echo` prints above it. When stdout is not a terminal (CI logs,
files) there is no live display: a task prints one line when it starts, at
most one line every ``PLAIN_EVERY`` seconds while it runs (done/total, ETA),
and one when it ends.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from mlx_lm.cli_ui import SquareBar, make_console
from rich.progress import Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

PLAIN_EVERY = 30.0  # seconds between plain progress lines

_live = None  # the rich Progress while a task is open on a terminal
_depth = 0
SILENT = False  # set on the ranks > 0 of a distributed run: no output at all


def interactive(stream=None) -> bool:
    stream = stream or sys.stdout
    return bool(getattr(stream, "isatty", lambda: False)())


def _console():

    return make_console()


def echo(line: str = "") -> None:
    """Print a line; above the live bars when there are any."""
    if SILENT:
        return
    if _live is not None:
        _live.console.print(line, markup=False, highlight=False, soft_wrap=True)
    else:
        print(line, flush=True)


def _format_seconds(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Task:
    """One piece of work of ``total`` units; ``advance`` it as units finish."""

    def __init__(self, description: str, total: int, unit: str, live, plain: bool):
        self.description, self.total, self.unit = description, max(total, 0), unit
        self.completed = 0
        self.start = self._last_line = time.perf_counter()
        self._live, self._plain = live, plain
        self._id = (
            live.add_task(description, total=self.total or None)
            if live is not None
            else None
        )

    def eta(self) -> float | None:
        if not self.completed or not self.total:
            return None
        elapsed = time.perf_counter() - self.start
        return elapsed / self.completed * max(self.total - self.completed, 0)

    def advance(self, n: int = 1) -> None:
        self.completed += n
        if self._id is not None:
            self._live.advance(self._id, n)
        elif self._plain:
            now = time.perf_counter()
            if now - self._last_line >= PLAIN_EVERY and self.completed < self.total:
                self._last_line = now
                eta = self.eta()
                print(
                    f"  {self.description}: {self.completed}/{self.total} {self.unit}"
                    f", {_format_seconds(now - self.start)} elapsed"
                    + (
                        f", about {_format_seconds(eta)} left"
                        if eta is not None
                        else ""
                    ),
                    flush=True,
                )

    def _close(self) -> None:
        if self._id is not None:
            self._live.remove_task(self._id)


def _make_live():

    return Progress(
        TextColumn("[bold blue]{task.description}[/bold blue]"),
        SquareBar(bar_width=30, complete_style="blue"),
        TextColumn("[progress.percentage]{task.percentage:>3.0f}%"),
        TextColumn("[ui.muted]·[/ui.muted]"),
        TextColumn("{task.completed:>5,}[ui.muted]/{task.total:,}[/ui.muted]"),
        TimeElapsedColumn(),
        TextColumn("[ui.muted]eta[/ui.muted]"),
        TimeRemainingColumn(),
        console=_console(),
        transient=True,
    )


@contextmanager
def task(
    description: str, total: int, unit: str = "steps", quiet: bool = False
) -> Iterator[Task]:
    """Show progress of ``total`` units of work while the block runs.

    ``quiet`` suppresses the plain start/end lines (a caller that reports
    on its own), not the live bar.
    """
    global _live, _depth
    if SILENT:
        yield Task(description, total, unit, None, plain=False)
        return
    live = interactive()
    if live and _live is None:
        _live = _make_live()
        _live.start()
    _depth += 1
    t = Task(description, total, unit, _live if live else None, plain=not live)
    if not live and not quiet:
        print(f"  {description}: {total} {unit}", flush=True)
    try:
        yield t
    finally:
        t._close()
        _depth -= 1
        if _depth == 0 and _live is not None:
            _live.stop()
            _live = None
        if not live and not quiet and t.completed >= t.total > 0:
            elapsed = time.perf_counter() - t.start
            print(
                f"  {description}: done, {t.completed} {unit} in "
                f"{_format_seconds(elapsed)}",
                flush=True,
            )
