"""Sweeps: intervals, fronts, grid expansion, stage-1 reuse, resume, report."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rsa_mlx.study import analysis, stats, sweep
from rsa_mlx.study import grid as grids
from rsa_mlx.tuner import config, trainer
from rsa_mlx.util.errors import ConfigError
from tests.hang import HANG_S
from tests.tiny import pku_rows, write_jsonl, write_model

# ------------------------------------------------------------------ stats


def test_interval_against_closed_forms():
    # n = 2: s = sqrt(2), half = t_{0.975,1} * sqrt(2) / sqrt(2) = 12.7062
    i = stats.mean_ci([0.0, 2.0])
    assert (i.mean, i.n) == (1.0, 2)
    assert math.isclose(i.half, 12.7062, rel_tol=1e-12)
    # n = 3: s = 1, half = t_{0.975,2} / sqrt(3)
    i = stats.mean_ci([1.0, 2.0, 3.0])
    assert math.isclose(i.lo, 2.0 - 4.3027 / math.sqrt(3), rel_tol=1e-12)
    assert math.isclose(i.hi, 2.0 + 4.3027 / math.sqrt(3), rel_tol=1e-12)
    # one value: no spread measured; non-finite values are left out
    assert stats.mean_ci([0.5, float("nan")]) == stats.Interval(0.5, 0.5, 0.5, 1)
    assert stats.mean_ci([]).n == 0
    # equal values: a zero-width interval
    assert stats.mean_ci([3.0] * 4).half == 0.0


@pytest.mark.parametrize(
    ("df", "want"), [(30, 2.0423), (40, 2.0211), (60, 2.0003), (120, 1.9799)]
)
def test_t_quantile_matches_tables(df, want):
    assert abs(stats.t_quantile(df) - want) < 2e-4


def test_pareto_front_on_fixed_points():
    # (helpfulness up, harm down)
    pts = [(0.5, 0.3), (0.6, 0.2), (0.7, 0.4), (0.4, 0.1), (0.55, 0.35), (0.7, 0.5)]
    # (0.55,0.35) is dominated by (0.6,0.2); (0.7,0.5) by (0.7,0.4); (0.5,0.3) by (0.6, 0.2)
    assert stats.pareto_front(pts) == [3, 1, 2]
    assert stats.pareto_front([(0.5, 0.1), (0.5, 0.1)]) == [0, 1]  # ties kept


def test_interpolate_and_dominance():
    assert stats.interpolate([0.0, 1.0], [0.0, 2.0], 0.25) == 0.5
    assert stats.interpolate([0.0, 1.0], [0.0, 2.0], 1.5) is None
    a = stats.Interval(0.5, 0.45, 0.55, 3)
    b = stats.Interval(0.7, 0.65, 0.75, 3)
    c = stats.Interval(0.52, 0.4, 0.6, 3)
    assert stats.better(b, a, True) == 1 and stats.better(b, a, False) == -1
    assert stats.better(a, c, True) == 0  # the intervals overlap
    helpful, safe = "h", "c"
    x = {helpful: b, safe: stats.Interval(0.1, 0.05, 0.15, 3)}
    y = {helpful: a, safe: stats.Interval(0.3, 0.25, 0.35, 3)}
    z = {
        helpful: stats.Interval(0.68, 0.6, 0.76, 3),
        safe: stats.Interval(0.12, 0.0, 0.3, 3),
    }
    assert stats.beats(x, y, helpful, safe) and not stats.beats(y, x, helpful, safe)
    assert not stats.beats(x, z, helpful, safe)  # no difference beyond intervals
    # one seed each: the means decide
    one = {helpful: stats.mean_ci([0.6]), safe: stats.mean_ci([0.1])}
    two = {helpful: stats.mean_ci([0.6]), safe: stats.mean_ci([0.2])}
    assert stats.beats(one, two, helpful, safe)


def t_975_by_integration(df: int) -> float:
    """``t_{0.975, df}`` from Student's t density, integrated by Simpson's
    rule and inverted by bisection: no table, no library."""
    log_c = (
        math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    )

    def cdf(q: float) -> float:  # P(T <= q), q >= 0
        x = np.linspace(0.0, q, 20001)
        f = np.exp(log_c - (df + 1) / 2 * np.log1p(x**2 / df))
        h = x[1] - x[0]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())

    lo, hi = 0.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < 0.975 else (lo, mid)
    return (lo + hi) / 2


@pytest.mark.parametrize(
    "values",
    [
        [0.0, 0.01],  # rare: the t-interval reaches far below 0
        [0.0, 0.0, 0.003],
        [0.04, 0.02, 0.06],
        [0.99, 1.0, 0.97, 1.0],  # near 1: clipped above
        [0.2, 0.5, 0.1, 0.4, 0.3, 0.25, 0.15, 0.35, 0.45, 0.05, 0.33, 0.22],
        [1e-9, 2e-6, 3e-4],
    ],
)
def test_probability_interval_against_an_independent_computation(values):
    """A probability's interval is the t-interval, clipped to [0, 1]: checked
    against numpy's mean and standard deviation and a t quantile integrated
    from the density."""
    x = np.array(values)
    half = t_975_by_integration(len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    want = np.clip([x.mean() - half, x.mean() + half], 0.0, 1.0)
    got = stats.mean_ci(values, stats.PROBABILITY)
    assert got.n == len(values) and math.isclose(got.mean, x.mean(), rel_tol=1e-12)
    assert np.allclose([got.lo, got.hi], want, rtol=2e-5, atol=1e-15)


def test_clipped_intervals_print_both_ends():
    assert str(stats.mean_ci([0.0, 0.01], stats.PROBABILITY)) == "0.005 [0, 0.069]"
    assert str(stats.mean_ci([0.3, 0.4], stats.PROBABILITY)) == "0.35 [0, 0.99]"
    assert str(stats.mean_ci([0.4, 0.5, 0.6], stats.PROBABILITY)) == "0.5 ± 0.25"
    assert str(stats.mean_ci([0.2], stats.PROBABILITY)) == "0.2"


RATES = st.lists(st.floats(0.0, 1.0), min_size=1, max_size=40)


@given(RATES, RATES)
@settings(max_examples=300, deadline=None)
def test_probability_intervals_never_leave_0_1_nor_change_a_verdict(a, b):
    for values in (a, b):
        i, free = stats.mean_ci(values, stats.PROBABILITY), stats.mean_ci(values)
        assert 0.0 <= i.lo <= i.mean <= i.hi <= 1.0 and i.n == len(values)
        # the t-interval cut to [0, 1], nothing else
        assert i.lo == max(free.lo, 0.0) and i.hi == min(free.hi, 1.0)
    # the true mean is in [0, 1]: clipping drops no part of the interval
    # where it can be, so no comparison beyond the intervals changes
    for higher in (True, False):
        assert stats.better(
            stats.mean_ci(a, stats.PROBABILITY),
            stats.mean_ci(b, stats.PROBABILITY),
            higher,
        ) == stats.better(stats.mean_ci(a), stats.mean_ci(b), higher)


# -------------------------------------------------------------- the grid


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    write_model(root / "model", chat=True, tied=True)
    write_jsonl(root / "data" / "train.jsonl", pku_rows(8))
    return root


def base_settings(tiny):
    return {
        "model": str(tiny / "model"),
        "data": str(tiny / "data"),
        "iters": 4,
        "batch_size": 2,
        "learning_rate": 1e-3,
        "steps_per_report": 2,
        "steps_per_eval": 0,
        "save_every": 2,
        "num_layers": -1,
    }


def test_parse_grid_types_values_like_yaml():
    grid = grids.parse_grid(["learning-rate=3e-5,1e-4", "seed=0,1", "method=sacpo"])
    assert grid == {"learning_rate": [3e-5, 1e-4], "seed": [0, 1], "method": ["sacpo"]}
    with pytest.raises(ConfigError, match="KEY=V1"):
        grids.parse_grid(["seed"])


def test_expand_grid(tiny):
    grid = {
        "method": ["sacpo", "rsa-cvar"],
        "mu": [0.9, 0.95],
        "safety_beta": [0.1, 0.05],
        "merge": [1.0, 0.5],
    }
    cells = grids.expand(base_settings(tiny), grid)
    # sacpo has no mu: 2 cells of its mu collapse into one
    assert len(cells) == 2 * 2 * 2 + 1 * 2 * 2
    assert len({c.id for c in cells}) == len(cells)
    sacpo = [c for c in cells if c.method == "sacpo"]
    assert all(c.config.loss == "dpo" and c.config.mu is None for c in sacpo)
    assert all(
        dict(c.values).keys() == {"method", "safety_beta", "merge"} for c in sacpo
    )
    # stage 1 depends on neither the stage-2 temperature nor the merge ratio
    assert len({c.stage1_key for c in sacpo}) == 1
    assert len({c.train_key for c in sacpo}) == 2
    rsa = [c for c in cells if c.method == "rsa-cvar"]
    assert len({c.stage1_key for c in rsa}) == 2  # mu is used by stage 1 too
    # each shared stage 1 is contiguous in the order, each run's q too
    order = [c.stage1_key for c in cells]
    assert all(
        order.index(k) + order.count(k) - 1 == len(order) - 1 - order[::-1].index(k)
        for k in order
    )
    with pytest.raises(ConfigError, match="unknown setting 'betta'"):
        grids.expand(base_settings(tiny), {"betta": [1]})
    with pytest.raises(ConfigError, match="unknown method"):
        grids.expand(base_settings(tiny), {"method": ["ppo"]})
    with pytest.raises(ConfigError, match="cannot vary"):
        grids.expand(base_settings(tiny), {"model": ["a", "b"]})


def test_stage1_key_follows_the_first_stage(tiny):
    cfg = config.resolve(base_settings(tiny))
    key = grids.stage1_key(cfg)
    same = [{"safety_beta": 0.01}, {"lam": 2.0}, {"merge": 0.5}]
    other = [{"learning_rate": 2e-3}, {"seed": 3}, {"beta": 0.2}, {"loss": "dpo"}]
    for change in same:
        assert (
            grids.stage1_key(config.resolve({**base_settings(tiny), **change})) == key
        )
    for change in other:
        assert (
            grids.stage1_key(config.resolve({**base_settings(tiny), **change})) != key
        )
    # safety first: the reward temperature is the second stage's
    first = config.resolve({**base_settings(tiny), "order": "safety-first", "lam": 2.0})
    assert grids.stage1_key(first) == grids.stage1_key(
        config.resolve(
            {
                **base_settings(tiny),
                "order": "safety-first",
                "lam": 2.0,
                "beta": 0.2,
                "safety_beta": 0.05,
            }
        )
    )
    assert (
        grids.stage1_key(config.resolve({**base_settings(tiny), "stages": "reward"}))
        is None
    )


class Recorder:
    """A deterministic evaluator: the mean of the model's logits on one
    fixed prompt, and a call log."""

    def __init__(self):
        self.calls = []

    def __call__(self, model, tokenizer, label):
        self.calls.append(label)
        tokens = mx.array([tokenizer.encode("How do I bake a cake?")])
        logits = model(tokens).astype(mx.float32)
        value = float(logits.mean().item())
        return {"helpfulness": value, "p_catastrophic": float(logits.std().item())}


class CountingTrain:
    """``train`` with a log of its calls; the ``kill_at``-th call is killed
    by ``reporter`` (a KeyboardInterrupt, like a crash)."""

    def __init__(self, reporter=None, kill_at=0):
        self.stages, self.reporter, self.kill_at = [], reporter, kill_at

    def __call__(self, cfg):
        self.stages.append((cfg.stages, cfg.adapter_path, cfg.resume))
        if len(self.stages) == self.kill_at:
            return trainer.train(cfg, reporter=self.reporter(cfg.adapter_path))
        return trainer.train(cfg)


GRID = {
    "method": ["sacpo", "rsa-cvar"],
    "safety_beta": [0.1, 0.05],
    "merge": [1.0, 0.5],
}


def adapter_arrays(path):
    return {
        k: np.array(v) for k, v in mx.load(str(path / "adapters.safetensors")).items()
    }


def test_sweep_trains_stage1_once_and_reuses_it_bit_for_bit(tiny, tmp_path):
    train = CountingTrain()
    evaluator = Recorder()
    rows = sweep.run_sweep(
        base_settings(tiny), GRID, evaluator, tmp_path / "s", train_fn=train
    )
    cells = [r for r in rows if r["kind"] == "cell"]
    assert len(cells) == 8
    assert sum(r["kind"] == "stage1" for r in rows) == 2
    assert sum(r["kind"] == "base" for r in rows) == 1
    # 2 stage-1 trainings (one per method) and 4 stage-2 (method x beta)
    assert sum(s == "reward" for s, _, _ in train.stages) == 2
    assert sum(s == "both" for s, _, _ in train.stages) == 4
    assert len(evaluator.calls) == 11
    # every cell row carries its full settings
    assert all(r["settings"]["safety_beta"] == r["grid"]["safety_beta"] for r in cells)
    assert (tmp_path / "s" / "results.csv").read_text().count("\n") == 12
    # the reused stage 1 and the stage 2 on it equal a fresh, whole run
    cell = next(
        c
        for c in grids.expand(base_settings(tiny), GRID)
        if c.method == "rsa-cvar" and c.config.safety_beta == 0.05
    )
    fresh = tmp_path / "fresh"
    trainer.train(
        config.resolve(
            {**cell.config.to_dict(), "merge": 1.0, "adapter_path": str(fresh)}
        )
    )
    run_dir = tmp_path / "s" / "runs" / cell.train_key
    for stage in ("reward", "safety"):
        a, b = adapter_arrays(fresh / stage), adapter_arrays(run_dir / stage)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # q < 1 evaluates the same run with a smaller last step
    by_q = {r["grid"]["merge"]: r for r in cells if r["run"] == str(run_dir)}
    assert by_q[1.0]["metrics"] != by_q[0.5]["metrics"]
    # started again: nothing is trained or evaluated twice
    again = sweep.run_sweep(
        base_settings(tiny), GRID, evaluator, tmp_path / "s", train_fn=train
    )
    assert len(evaluator.calls) == 11 and len(train.stages) == 6
    assert [r["id"] for r in again] == [r["id"] for r in rows]
    # a grown grid trains only what is new
    grown = {**GRID, "safety_beta": [0.1, 0.05, 0.025]}
    sweep.run_sweep(
        base_settings(tiny), grown, evaluator, tmp_path / "s", train_fn=train
    )
    assert len(train.stages) == 8 and len(evaluator.calls) == 15
    with pytest.raises(ConfigError, match="another base"):
        sweep.run_sweep(
            {**base_settings(tiny), "iters": 5}, GRID, evaluator, tmp_path / "s"
        )


class Kill(trainer.Reporter):
    def tick(self, stage, it, iters, seconds):
        if (stage, it) == ("safety", 3):
            raise KeyboardInterrupt


def test_killed_sweep_resumes_the_unfinished_cell(tiny, tmp_path):
    grid = {"method": ["sacpo"], "safety_beta": [0.1, 0.05]}
    whole = sweep.run_sweep(base_settings(tiny), grid, Recorder(), tmp_path / "whole")
    train = CountingTrain(reporter=Kill, kill_at=3)  # the second cell
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(
            base_settings(tiny), grid, Recorder(), tmp_path / "cut", train_fn=train
        )
    evaluator = Recorder()
    again = sweep.run_sweep(
        base_settings(tiny), grid, evaluator, tmp_path / "cut", train_fn=train
    )
    # the killed run resumed from its checkpoint (not restarted) and the
    # stage 1 it stands on was not retrained
    assert train.stages[-1] == (*train.stages[-2][:2], True)
    assert train.stages[-1][1].endswith(train.stages[2][1][-16:])
    assert sum(s == "reward" for s, _, _ in train.stages) == 1
    assert "base" not in evaluator.calls  # evaluated before the kill
    want = {r["id"]: r["metrics"] for r in whole}
    got = {r["id"]: r["metrics"] for r in again}
    assert got == want


# ------------------------------------------------------------- the report


def row(kind, method, beta, seed, help_, cat, other=0.0, shift=0.1):
    grid = (
        {"method": method, "safety_beta": beta, "seed": seed} if kind != "base" else {}
    )
    metrics = {
        "helpfulness": help_,
        "p_catastrophic": cat,
        "p_other": other,
        "shift_kl": shift,
    }
    return {
        "id": f"{method}-{beta}-{seed}",
        "kind": kind,
        "method": method,
        "grid": grid,
        "metrics": metrics,
    }


def test_report_verdicts_intervals_and_collapse(tmp_path):
    rows = [row("base", "base", None, None, 0.5, 0.05)]
    for seed, eps in enumerate((-0.01, 0.0, 0.01)):
        # rsa: more helpful and safer than sacpo at both temperatures
        rows.append(
            row("cell", "rsa-cvar", 0.1, seed, 0.70 + eps, 0.02 + eps / 10, shift=0.2)
        )
        rows.append(
            row("cell", "rsa-cvar", 0.05, seed, 0.65 + eps, 0.01 + eps / 10, shift=0.3)
        )
        rows.append(
            row("cell", "sacpo", 0.1, seed, 0.60 + eps, 0.04 + eps / 10, shift=0.5)
        )
        rows.append(
            row("cell", "sacpo", 0.05, seed, 0.55 + eps, 0.03 + eps / 10, shift=0.6)
        )
        # collapsed: perfectly "safe", all mass on non-canonical text
        rows.append(row("cell", "sacpo", 0.01, seed, 0.0, 0.0, other=1.0))
    result = analysis.report(rows, tmp_path, ["p_catastrophic"])
    _, _, settings = analysis.aggregate(rows)
    collapsed = [s for s in settings if s.flag]
    assert len(collapsed) == 1 and collapsed[0].flag.startswith("collapsed")
    assert all(s.metrics["helpfulness"].n == 3 for s in settings)
    fronts = analysis.fronts(settings, "p_catastrophic")
    assert [s.values["safety_beta"] for s in fronts["sacpo"]] == [0.05, 0.1]
    assert result["verdict"][1].startswith(
        "rsa-cvar vs sacpo on P(catastrophic): rsa-cvar DOMINATES sacpo"
    )
    assert "by method: rsa-cvar 0 of 2, sacpo 1 of 3." in result["verdict"][0]
    assert "collapsed" in result["verdict"][-1]
    report = (tmp_path / "report.md").read_text()
    assert "± " in report and "collapsed (p_other 1.00)" in report
    assert (tmp_path / "plot.svg").exists() and (tmp_path / "plot.png").exists()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["fronts"]["p_catastrophic"]["rsa-cvar"]

    # swap the roles: the verdict follows the numbers
    flipped = [
        {
            **r,
            "method": {"sacpo": "rsa-cvar", "rsa-cvar": "sacpo"}.get(
                r["method"], r["method"]
            ),
        }
        for r in rows
        if not (r["kind"] == "cell" and r["metrics"]["p_other"] == 1.0)
    ]
    for r in flipped:
        r["grid"] = {**r["grid"], "method": r["method"]} if r["grid"] else {}
    result = analysis.report(flipped, tmp_path / "f", ["p_catastrophic"])
    assert "sacpo DOMINATES rsa-cvar" in result["verdict"][0]


def test_matched_helpfulness_and_below_base():
    rows = [row("base", "base", None, None, 0.5, 0.05)]
    for seed, eps in enumerate((-0.01, 0.01)):
        rows.append(row("cell", "a", 0.1, seed, 0.6 + eps, 0.04 + eps))
        rows.append(row("cell", "a", 0.05, seed, 0.8 + eps, 0.08 + eps))
        rows.append(row("cell", "b", 0.1, seed, 0.6 + eps, 0.03 + eps))
        rows.append(row("cell", "b", 0.05, seed, 0.8 + eps, 0.05 + eps))
        rows.append(
            row("cell", "b", 0.01, seed, 0.3 + eps, 0.0)
        )  # less helpful than base
    _, _, settings = analysis.aggregate(rows)
    assert [s.flag is not None for s in settings] == [False, False, False, False, True]
    fronts = analysis.fronts(settings, "p_catastrophic")
    pairs = analysis.matched(fronts["a"], fronts["b"], "helpfulness", "p_catastrophic")
    # at helpfulness 0.7 (midway): a 0.06, b 0.04, interpolated
    x, ya, yb = pairs[1]
    assert (
        math.isclose(x, 0.7)
        and math.isclose(ya.mean, 0.06)
        and math.isclose(yb.mean, 0.04)
    )
    text = analysis.compare_methods(settings, "p_catastrophic", "a", "b")
    assert text.startswith("a vs b on P(catastrophic): mixed") or "neither" in text


# ----------------------------------------------------------- the commands


@pytest.fixture
def scorer_module(monkeypatch):
    import sys
    import types

    module = types.ModuleType("sweep_scores")
    # harmful when the answer has an "a" in it: differs between models
    module.score = lambda record, response: {
        "reward": float(len(response) > 2),
        "cost": float("a" in response),
    }
    monkeypatch.setitem(sys.modules, "sweep_scores", module)
    return "sweep_scores:score"


def sweep_cli(*args):
    from click.testing import CliRunner

    from rsa_mlx.cli import main

    return CliRunner().invoke(main, ["sweep", *args])


@pytest.mark.slow
def test_sweep_command_end_to_end_from_a_yaml_grid(tiny, tmp_path, scorer_module):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}, {"prompt": "yo"}])
    spec = tmp_path / "sweep.yaml"
    spec.write_text(
        f"model: {tiny / 'model'}\ndata: {tiny / 'data'}\niters: 2\nbatch_size: 2\n"
        "learning_rate: 1e-3\nsteps_per_eval: 0\n"
        "grid:\n  method: [sacpo, rsa-cvar]\n  safety_beta: [0.1, 0.05]\n"
        f"evaluate:\n  prompts: {prompts}\n  scorer: {scorer_module}\n  k: 2\n"
        "  max_tokens: 4\n  temperature: 30\n"
    )
    out = tmp_path / "s"
    result = sweep_cli("-c", str(spec), "--seeds", "0,1", "--sweep-path", str(out))
    assert result.exit_code == 0, result.output + repr(result.exception)
    rows = sweep.Sweep(out).rows()
    cells = [r for r in rows if r["kind"] == "cell"]
    assert len(cells) == 8 and {r["grid"]["seed"] for r in cells} == {0, 1}
    metrics = cells[0]["metrics"]
    for key in ("helpfulness", "unsafe_rate", "cvar_0.99", "shift_kl", "degenerate"):
        assert key in metrics
    assert metrics["shift_kl"] > 0
    assert "rsa-cvar vs sacpo on unsafe rate" in result.output
    report = (out / "report.md").read_text()
    assert "| setting | seeds |" in report and "± " in report
    assert (out / "plot.png").exists() and (out / "results.csv").exists()
    # the report alone, from the results
    again = sweep_cli(
        "-c",
        str(spec),
        "--sweep-path",
        str(out),
        "--report-only",
        "--harm",
        "mean_cost",
    )
    assert again.exit_code == 0 and "on mean cost" in again.output


def test_sweep_command_bad_input_is_one_line_and_writes_nothing(tiny, tmp_path):
    out = tmp_path / "s"
    common = [
        "--model",
        str(tiny / "model"),
        "--data",
        str(tiny / "data"),
        "--sweep-path",
        str(out),
    ]
    cases = [
        ([], "give held-out prompts"),
        (["--prompts", str(tmp_path / "none.jsonl")], "no such prompt file"),
        (["--prompts", "p.jsonl", "--grid", "betta=1,2"], "unknown setting 'betta'"),
        (["--prompts", "p.jsonl", "--methods", "ppo"], "unknown method 'ppo'"),
        (["--prompts", "p.jsonl", "--grid", "seed"], "expected KEY=V1"),
    ]
    for args, message in cases:
        result = sweep_cli(*common, *args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and result.output.count("\n") == 1, (
            result.output
        )
        assert not out.exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid:\n  seed: [0, 1\n")
    result = sweep_cli("-c", str(bad))
    assert (
        result.exit_code == 2
        and f"{bad}:" in result.output
        and "malformed YAML" in result.output
    )


@pytest.mark.slow
def test_study_quick_end_to_end_on_a_reduced_grid(tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "study"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    command = [sys.executable, "-m", "rsa_mlx.train", "--study", "--quick",
               "--iters", "4", "--adapter-path", str(out)]  # fmt: skip
    proc = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=HANG_S
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = sweep.Sweep(out).rows()
    cells = [r for r in rows if r["kind"] == "cell"]
    # sacpo, rsa-cvar x 2 stage-2 temperatures x 3 seeds; stage 1 shared
    assert len(cells) == 12 and sum(r["kind"] == "stage1" for r in rows) == 6
    assert len(list((out / "stage1").iterdir())) == 6
    for key in ("p_catastrophic", "p_other", "shift_kl", "helpfulness"):
        assert key in cells[0]["metrics"]
    report = (out / "report.md").read_text()
    assert "rsa-cvar vs sacpo on P(catastrophic)" in report
    assert "## Does the demo world have the paper's regime?" in report
    assert "P(catastrophic) of the base model 0.0559" in report
    assert "rsa-cvar vs sacpo" in proc.stdout and "wall time" in proc.stdout
    # started again: everything is done, only the report is rewritten
    proc = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=HANG_S
    )
    assert proc.returncode == 0 and "12 already done" in proc.stdout
    # the wall time of each session is kept: the first one is not overwritten
    assert len((out / "wall_time.txt").read_text().splitlines()) == 2


class SendSignal(trainer.Reporter):
    def tick(self, stage, it, iters, seconds):
        import os
        import signal

        if (stage, it) == ("safety", 2):
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_in_a_sweep_says_how_to_continue(tiny, tmp_path):
    grid = {"method": ["sacpo"], "safety_beta": [0.1, 0.05]}
    train = CountingTrain(reporter=SendSignal, kill_at=2)  # the first cell's stage 2
    with pytest.raises(sweep.SweepInterrupted) as stop:
        sweep.run_sweep(
            base_settings(tiny), grid, Recorder(), tmp_path / "s", train_fn=train
        )
    message = str(stop.value)
    assert (
        "sweep stopped by SIGINT" in message and "Run the same command again" in message
    )
    assert stop.value.signum == 2
    rows = sweep.run_sweep(base_settings(tiny), grid, Recorder(), tmp_path / "s")
    assert sum(r["kind"] == "cell" for r in rows) == 2


def test_collapse_is_judged_against_the_base_models_own_rate():
    def setting(degenerate, help_=0.6):
        metrics = {"helpfulness": help_, "degenerate": degenerate}
        return analysis.Setting(
            "m", {}, {k: stats.mean_ci([v]) for k, v in metrics.items()}, [0]
        )

    base = {"helpfulness": stats.mean_ci([0.5]), "degenerate": stats.mean_ci([0.9])}
    # a base that already writes 90% degenerate text: only more than that collapses
    assert analysis.flag(setting(0.9), base) is None
    assert analysis.flag(setting(0.95), base) == "collapsed (degenerate 0.95)"
    clean = {**base, "degenerate": stats.mean_ci([0.0])}
    assert analysis.flag(setting(0.6), clean) == "collapsed (degenerate 0.60)"
    assert analysis.flag(setting(0.4), clean) is None


def test_stage_one_settings_are_flagged_too():
    rows = [row("base", "base", None, None, 0.5, 0.05)]
    for seed in (0, 1):
        rows.append(
            {
                **row("stage1", "sacpo", None, seed, 0.0, 0.0, other=0.96),
                "id": f"s{seed}",
            }
        )
        rows.append(row("cell", "sacpo", 0.1, seed, 0.6, 0.02))
    _, stage1, cells = analysis.aggregate(rows)
    assert stage1[0].flag == "collapsed (p_other 0.96)" and cells[0].flag is None
