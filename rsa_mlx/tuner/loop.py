"""The training loop of one stage, and what it reports to.

:func:`loop` only iterates: it takes its collaborators (the compiled step,
the batches, validation, checkpointing, a reporter) as arguments, as
mlx-lm's ``train(..., loss=, iterate_batches=, training_callback=)`` does, so
each can be replaced in a test. Metrics stay on the device between reports.

A non-finite loss or gradient norm stops the run (the last good checkpoint
is kept); Ctrl-C or SIGTERM stops it after the current optimizer update with
a checkpoint and the command that resumes it (exit 130 / 143).
"""

from __future__ import annotations

import json
import shlex
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from rsa_mlx.tuner import distributed as dist
from rsa_mlx.tuner.checkpoint import Progress, iteration_seed
from rsa_mlx.util import progress as bars
from rsa_mlx.util.atomic import dumps, save_text
from rsa_mlx.util.errors import Stopped, TrainingError


class Interrupted(Stopped, TrainingError):
    """The run was stopped by a signal after saving a checkpoint."""

    def __init__(self, signum: int, stage: str, iteration: int, checkpoint: Path):
        super().__init__(signum, stage, iteration, checkpoint)
        self.signum, self.stage = signum, stage
        self.iteration, self.checkpoint = iteration, Path(checkpoint)

    @property
    def run_dir(self) -> Path:
        return self.checkpoint.parent.parent.parent  # run/stage/checkpoints/step

    def __str__(self) -> str:
        name = signal.Signals(self.signum).name
        command = (
            "python -m rsa_mlx.train --adapter-path "
            f"{shlex.quote(str(self.run_dir))} --resume"
        )
        return (
            f"[{self.stage}] stopped by {name} after iteration {self.iteration}; "
            f"checkpoint {self.checkpoint}\nresume with: {command}"
        )


class StopSignals:
    """While active, the first Ctrl-C (SIGINT) or SIGTERM asks the loop to
    stop after the current step; a second one stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        bars.echo(
            f"{signal.Signals(signum).name}: stopping after this step with a "
            "checkpoint (again to stop at once, losing it)"
        )


class Reporter:
    """Progress lines (above the progress bars), ``metrics.jsonl`` in the
    run folder, and mlx-lm reporting callbacks (wandb, swanlab)."""

    def __init__(self, run_dir: Path, callback=None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.callback = callback

    def record(self, entry: dict) -> None:
        with open(self.path, "a") as f:
            f.write(dumps(entry) + "\n")

    def rewind(self, stage: str, iteration: int) -> None:
        """Drop ``stage``'s rows after ``iteration`` (a resumed run redoes them)."""
        if not self.path.exists():
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip()
            and not (
                (row := json.loads(line)).get("stage") == stage
                and row.get("iteration", 0) > iteration
            )
        ]
        save_text(self.path, "".join(line + "\n" for line in kept))

    def train(self, stage: str, info: dict) -> None:
        self.record({"stage": stage, "kind": "train", **info})
        m = info
        eta = m.get("eta_seconds")
        self.note(
            f"[{stage}] it {m['iteration']:>5d}/{m['iters']} | loss {m['loss']:.4f} "
            f"| acc {m['accuracy']:.2f} | margin {m['margins']:+.4f} "
            f"| kl {m['kl']:.4f}{_risk(m)} | lr {m['learning_rate']:.2e} "
            f"| {m['iterations_per_second']:.2f} it/s | {m['tokens_per_second']:.0f} tok/s "
            f"| peak {m['peak_memory']:.2f} GB"
            + (f" | eta {bars._format_seconds(eta)}" if eta else "")
        )
        if self.callback is not None:
            self.callback.on_train_loss_report(
                {**{f"train_{k}": v for k, v in m.items()}, "iteration": m["iteration"]}
            )

    def val(self, stage: str, info: dict) -> None:
        self.record({"stage": stage, "kind": "val", **info})
        self.note(
            f"[{stage}] val {info['iteration']:>5d} | loss {info['loss']:.4f} "
            f"| acc {info['accuracy']:.2f} | margin {info['margins']:+.4f} "
            f"| kl {info['kl']:.4f}{_risk(info)} ({info['seconds']:.1f}s)"
        )
        if self.callback is not None:
            self.callback.on_val_loss_report(
                {
                    **{f"val_{k}": v for k, v in info.items()},
                    "iteration": info["iteration"],
                }
            )

    def tick(self, stage: str, it: int, iters: int, seconds: float) -> None:
        """Called after every iteration (a hook for callers; no output)."""

    def note(self, text: str) -> None:
        bars.echo(text)


class SilentReporter(Reporter):
    """The reporter of data-parallel ranks > 0: rank 0 reports for the group."""

    def __init__(self, run_dir: Path | None = None, callback=None):
        self.path, self.callback = None, None

    def record(self, entry: dict) -> None:
        pass

    def rewind(self, stage: str, iteration: int) -> None:
        pass

    def note(self, text: str) -> None:
        pass


def summarize(sums: dict[str, float], pairs: int) -> dict[str, float]:
    """Per-pair means from pair-weighted sums, with chosen/rejected averaged
    (``risk`` only where the step computed the risk: not for DPO)."""
    mean = {k: v / max(pairs, 1) for k, v in sums.items()}
    mean["kl"] = 0.5 * (mean.get("kl/chosen", 0.0) + mean.get("kl/rejected", 0.0))
    if "risk/chosen" in mean:
        mean["risk"] = 0.5 * (mean["risk/chosen"] + mean["risk/rejected"])
    return mean


def _risk(m: dict) -> str:
    return f" | risk {m['risk']:.4f}" if "risk" in m else ""


@dataclass
class Plan:
    """How long a stage runs and how often it reports, validates and saves."""

    stage: str
    iters: int
    accum: int = 1
    steps_per_report: int = 10
    steps_per_eval: int = 0
    save_every: int = 0
    seed: int = 0  # iteration i draws from mx.random.seed(iteration_seed(seed, i))
    rank: int = 0  # data-parallel ranks > 0 draw other numbers (their own dropout)


def reduce_window(sums: dict, pairs: int, tokens: int) -> tuple[dict, int, int]:
    """A report window's pair-weighted metric sums and counts, summed over
    the process group (as they are for a single process)."""
    keys = sorted(sums)
    values = dist.sum_values([sums[k].item() for k in keys])
    pairs, tokens = dist.sum_values([pairs, tokens], dtype=mx.int32)
    return dict(zip(keys, values)), int(pairs), int(tokens)


def first_bad_in_group(bad: int, iters: int) -> int:
    """The earliest iteration any rank saw a non-finite value, else -1."""
    code = dist.broadcast_flag(iters + 1 - bad if bad >= 0 else 0)
    return iters + 1 - code if code > 0 else -1


@dataclass
class Window:
    """The iterations since the last report: pair-weighted metric sums and
    gradient norms stay on the device until the report reads them."""

    start: int  # the last iteration before the window
    sums: dict[str, mx.array] = field(default_factory=dict)
    norms: mx.array | float = 0.0
    updates: int = 0  # optimizer updates, one gradient norm each
    pairs: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def add(self, metrics: dict, pairs: int) -> mx.array:
        """Add one step's metrics; return whether its loss or gradient norm
        is not finite (on the device)."""
        bad = ~mx.isfinite(metrics["loss"])
        if "grad_norm" in metrics:  # update steps only: a mean per update
            norm = metrics.pop("grad_norm")
            bad = bad | ~mx.isfinite(norm)
            self.norms = self.norms + norm
            self.updates += 1
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v * pairs
        return bad

    def report(
        self, it: int, iters: int, learning_rate: float, eta: float | None, shapes: int
    ) -> dict:
        """The window's metrics over the process group, and its speed."""
        sums, pairs, tokens = reduce_window(self.sums, self.pairs, self.tokens)
        done, seconds = it - self.start, self.seconds
        return {
            **summarize(sums, pairs),
            "iteration": it,
            "iters": iters,
            "learning_rate": learning_rate,
            "iterations_per_second": done / seconds if seconds else 0.0,
            "tokens_per_second": tokens / seconds if seconds else 0.0,
            "trained_tokens": tokens,
            "peak_memory": mx.get_peak_memory() / 1e9,
            "grad_norm": float(self.norms) / self.updates if self.updates else 0.0,
            "shapes": shapes,
            "eta_seconds": eta,
        }


class NonFinite:
    """The first iteration whose loss or gradient norm was NaN or infinite,
    kept on the device and read (over the process group) only at reports
    and before checkpoints, so no step waits for the host."""

    def __init__(self, stage: str, iters: int):
        self.stage, self.iters, self.first = stage, iters, mx.array(-1)

    def mark(self, it: int, bad: mx.array) -> None:
        self.first = mx.where((self.first < 0) & bad, it, self.first)

    def check(
        self, checkpoint: Path | None, params_finite: Callable | None, it: int
    ) -> None:
        """Raise if any rank saw a non-finite value or, with
        ``params_finite``, if the parameters are no longer finite."""
        bad = first_bad_in_group(self.first.item(), self.iters)
        if bad < 0 and params_finite is not None and not params_finite():
            bad = it
        if bad >= 0:
            where = f"; the last good checkpoint is {checkpoint}" if checkpoint else ""
            raise TrainingError(
                f"[{self.stage}] the loss or gradient became NaN or infinite at "
                f"iteration {bad}{where}. Try a lower --learning-rate, --beta or "
                "--lora-scale."
            )


def loop(
    plan: Plan,
    step: Callable,
    batches: Iterator,
    progress: Progress,
    state: list,
    *,
    reporter: Reporter,
    validate: Callable[[int], dict],
    save: Callable[[], Path],
    params_finite: Callable[[], bool],
    learning_rate: Callable[[], float],
    stop: StopSignals | None = None,
) -> dict:
    """Run iterations ``progress.iteration + 1 .. plan.iters`` of ``step``.

    ``step(arrays, grad, do_update) -> (metrics, grad)``; ``validate(it)``
    returns validation metrics (``{}`` for none); ``save()`` writes a
    checkpoint of the current state and returns its path. Returns the last
    training and validation metrics, the checkpoint and the batch shapes seen.
    """
    stage, iters = plan.stage, plan.iters
    out = {"train": {}, "valid": {}, "checkpoint": None, "shapes": set()}
    window, grad = Window(start=progress.iteration), None
    guard = NonFinite(stage, iters)

    def check(params: bool = False) -> None:
        finite = params_finite if params else None
        guard.check(out["checkpoint"], finite, progress.iteration)

    label = stage if window.start == 0 else f"{stage} (from {window.start})"
    with bars.task(label, iters - window.start, "iterations", quiet=True) as bar:
        for it in range(window.start + 1, iters + 1):
            tic = time.perf_counter()
            batch = next(batches)
            seed = iteration_seed(plan.seed, it)  # resume draws the same numbers
            mx.random.seed(seed ^ (plan.rank << 48) if plan.rank else seed)
            do_update = it % plan.accum == 0
            out["shapes"].add(batch.tokens.shape + batch.index.shape)
            metrics, grad = step(batch.arrays(), grad, do_update)
            guard.mark(it, window.add(metrics, batch.pairs))
            mx.eval(state, window.sums, grad, guard.first, window.norms)
            window.pairs += batch.pairs
            window.tokens += batch.real_tokens
            window.seconds += time.perf_counter() - tic
            progress.iteration = it
            progress.updates += int(do_update)
            bar.advance()
            reporter.tick(stage, it, iters, window.seconds)

            if it % plan.steps_per_report == 0 or it == iters:
                check()
                lr, shapes = learning_rate(), len(out["shapes"])
                out["train"] = window.report(it, iters, lr, bar.eta(), shapes)
                reporter.train(stage, out["train"])
                window = Window(start=it)
            if stop is not None and stop.signum is not None and do_update:
                check(params=True)
                raise Interrupted(stop.signum, stage, it, save())
            if plan.steps_per_eval and it % plan.steps_per_eval == 0 and it != iters:
                out["valid"] = validate(it) or out["valid"]
            saving = do_update and plan.save_every and it % plan.save_every == 0
            if saving and it != iters:  # the last one is saved by the caller
                check(params=True)
                out["checkpoint"] = save()
    check(params=True)
    return out
