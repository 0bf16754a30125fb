"""Progress output: plain lines off a terminal, rich bars on one."""

from __future__ import annotations

import io

from rsa_mlx.util import progress


def test_plain_lines_when_stdout_is_not_a_terminal(capsys, monkeypatch):
    clock = iter(range(0, 1000, 20))  # each call: 20 s later
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    with progress.task("evaluate base", 4, "batches") as bar:
        for _ in range(4):
            bar.advance()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "  evaluate base: 4 batches"
    # at most one line per PLAIN_EVERY seconds while running, with an ETA
    assert lines[1].startswith("  evaluate base: 2/4 batches, 40s elapsed")
    assert "left" in lines[1]
    assert lines[-1].startswith("  evaluate base: done, 4 batches in")
    assert all("elapsed" in x and "left" in x for x in lines[1:-1])
    assert len(lines) < 2 + 4  # not one line per unit


def test_quiet_tasks_print_nothing_and_echo_prints_lines(capsys):
    with progress.task("reward", 3, quiet=True) as bar:
        bar.advance(3)
        progress.echo("[reward] it 3/3")
    assert capsys.readouterr().out == "[reward] it 3/3\n"


def test_live_bars_on_a_terminal_nest_and_print_above(monkeypatch):
    from rich.console import Console

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    monkeypatch.setattr(progress, "interactive", lambda stream=None: True)
    monkeypatch.setattr(progress, "_console", lambda: console)
    with progress.task("demo", 2, "methods") as outer:
        with progress.task("reward", 5) as inner:
            inner.advance(5)
            progress.echo("a line above the bars")
        outer.advance(2)
        assert progress._live is not None
    assert progress._live is None  # the live display ends with the last task
    text = out.getvalue()
    assert "a line above the bars" in text and "demo" in text and "reward" in text
    assert outer.eta() == 0.0
