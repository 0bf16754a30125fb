"""The recipe over seeds: intervals against a NumPy reference, the paired
comparison, refused inputs, and ``--seeds`` end to end on a tiny model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from rsa_mlx.recipe import seeds
from rsa_mlx.util.errors import ConfigError, InputError
from tests.recipe_tiny import TINY, tiny_recipe

T975_2DF = 4.302653  # t_{0.975, 2}, three seeds


def metrics(refused, over, fluency, loops, shift=0.5):
    """Flat recipe metrics of one model (greedy)."""
    out = {"shift_kl": shift, "unsafe_rate": 1 - refused, "helpfulness": 1 - over}
    for name, value in (("advbench", refused), ("phrased", refused / 2),
                        ("benign", over), ("borderline", 2 * over)):  # fmt: skip
        out[f"refusal_{name}_greedy"] = value
        out[f"loops_{name}_greedy"] = loops if name == "phrased" else loops / 4
        out[f"degenerate_{name}_greedy"] = 0.0
    out["fluency_benign_greedy"] = fluency
    return out


def write_run(folder, seed, sacpo, rsa, base_fluency=-0.6, **settings):
    folder.mkdir(parents=True)
    results = {
        "base": metrics(0.02, 0.0, base_fluency, 0.1, shift=0.0),
        "sacpo": metrics(*sacpo),
        "rsa-cvar": metrics(*rsa),
    }
    given = {"seed": seed, "out": str(folder), "learning_rate": 5e-5, **settings}
    (folder / "results.json").write_text(
        json.dumps({"settings": given, "results": results})
    )
    return folder


def three_runs(tmp_path):
    sacpo = [(0.9, 0.0, -1.0, 0.02), (0.8, 0.1, -1.1, 0.0), (0.95, 0.0, -0.9, 0.04)]
    rsa = [(0.92, 0.0, -1.0, 0.0), (0.83, 0.05, -1.0, 0.0), (0.975, 0.0, -0.95, 0.0)]
    return (
        [
            write_run(tmp_path / f"seed-{i}", i, s, r, base_fluency=-0.6 - 0.05 * i)
            for i, (s, r) in enumerate(zip(sacpo, rsa))
        ],
        sacpo,
        rsa,
    )


def reference_ci(values):
    x = np.asarray(values, dtype=np.float64)
    half = T975_2DF * x.std(ddof=1) / np.sqrt(len(x))
    return x.mean(), x.mean() - half, x.mean() + half


def test_measures_take_the_worst_set_and_the_fluency_against_the_base():
    m = seeds.measures(metrics(0.9, 0.1, -1.0, 0.08), metrics(0, 0, -0.7, 0.0))
    assert m["refused: other phrasings"] == pytest.approx(0.45)
    assert m["over-refused: borderline"] == pytest.approx(0.2)
    assert m["loops (worst set)"] == pytest.approx(0.08)  # phrased, not the mean
    assert m["benign fluency - base"] == pytest.approx(-0.3)
    missing = seeds.measures({}, {})
    assert all(math.isnan(v) for v in missing.values())


def test_summary_intervals_match_a_float64_reference(tmp_path):
    paths, sacpo, _ = three_runs(tmp_path)
    summary = seeds.summarise(seeds.load_runs(paths))
    assert list(summary) == ["base", "sacpo", "rsa-cvar"]
    got = summary["sacpo"]["refused: AdvBench"]
    mean, lo, hi = reference_ci([s[0] for s in sacpo])
    # (the library's t table has four decimals)
    assert (got.mean, got.n) == (pytest.approx(mean), 3)
    assert got.lo == pytest.approx(lo, abs=1e-5)
    assert got.hi == pytest.approx(min(hi, 1.0))  # a rate's interval is clipped
    drift = [s[2] - (-0.6 - 0.05 * i) for i, s in enumerate(sacpo)]
    got = summary["sacpo"]["benign fluency - base"]
    assert (got.mean, got.lo, got.hi) == pytest.approx(reference_ci(drift), abs=1e-5)


def test_methods_are_compared_seed_by_seed(tmp_path):
    paths, sacpo, rsa = three_runs(tmp_path)
    runs = seeds.load_runs(paths)
    diff = seeds.paired(runs, "rsa-cvar", "sacpo")
    want = [r[0] - s[0] for r, s in zip(rsa, sacpo)]
    got = diff["refused: AdvBench"]
    assert (got.mean, got.lo, got.hi) == pytest.approx(reference_ci(want), abs=1e-5)
    # the paired differences (0.02, 0.03, 0.025) exclude 0: better, although
    # the two methods' own intervals overlap
    own = seeds.summarise(runs)
    assert (
        own["rsa-cvar"]["refused: AdvBench"].lo < own["sacpo"]["refused: AdvBench"].hi
    )
    assert seeds.verdict(got, higher=True) == "better"
    assert seeds.verdict(got, higher=False) == "worse"
    assert seeds.verdict(diff["KL shift"], higher=False) == "tie"  # all equal: 0
    report = seeds.seed_report(runs)
    assert "RSA (CVaR) minus SACPO (DPO -> DPO)" in report
    assert "| refused: AdvBench | 2.5% [1.3, 3.7] | better |" in report


def test_a_single_seed_has_no_interval_and_no_verdict(tmp_path):
    paths, _, _ = three_runs(tmp_path)
    runs = seeds.load_runs(paths[:1])
    assert seeds.summarise(runs)["sacpo"]["refused: AdvBench"].n == 1
    assert seeds.verdict(seeds.paired(runs, "rsa-cvar", "sacpo")["KL shift"], True) == (
        "one seed"
    )


def test_runs_of_other_recipes_or_the_same_seed_are_refused(tmp_path):
    good = write_run(tmp_path / "a", 0, (0.9, 0, -1, 0), (0.9, 0, -1, 0))
    other = write_run(
        tmp_path / "b", 1, (0.9, 0, -1, 0), (0.9, 0, -1, 0), learning_rate=1e-4
    )
    same = write_run(tmp_path / "c", 0, (0.9, 0, -1, 0), (0.9, 0, -1, 0))
    with pytest.raises(InputError, match=r"other settings .*learning_rate"):
        seeds.load_runs([good, other])
    # evaluated otherwise (a rerun may change that): not one recipe either
    good_e = write_run(
        tmp_path / "e", 2, (0.9, 0, -1, 0), (0.9, 0, -1, 0), eval_samples=0
    )
    sampled = write_run(
        tmp_path / "f", 3, (0.9, 0, -1, 0), (0.9, 0, -1, 0), eval_samples=1
    )
    with pytest.raises(InputError, match=r"other settings .*eval_samples"):
        seeds.load_runs([good_e, sampled])
    with pytest.raises(InputError, match="two runs share a seed"):
        seeds.load_runs([good, same])
    with pytest.raises(InputError, match="no results"):
        seeds.load_runs([good, tmp_path / "missing"])
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "results.json").write_text("{")
    with pytest.raises(InputError, match="not a recipe result"):
        seeds.load_runs([tmp_path / "d"])


@pytest.mark.parametrize("text", ["0,x", "1,1", ","])
def test_bad_seeds_flag_is_one_line_and_exit_2(tmp_path, text):
    from click.testing import CliRunner

    from rsa_mlx.cli.recipe import main

    with pytest.raises(ConfigError):
        seeds.parse_seeds(text)
    out = tmp_path / "o"
    result = CliRunner().invoke(
        main, ["--model", "m", "--harmful", "h", "--out", str(out), "--seeds", text]
    )
    assert result.exit_code == 2, result.output
    assert "--seeds" in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.slow
def test_seeds_flag_runs_each_seed_and_writes_the_summary(tmp_path):
    from click.testing import CliRunner

    from rsa_mlx.recipe.__main__ import main

    cfg = tiny_recipe(tmp_path)
    tiny = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    out = tmp_path / "s"
    args = ["--model", cfg.model, "--harmful", cfg.harmful, *tiny, "--no-export",
            "--no-eval-stage1", "--out", str(out), "--seeds", "3,4"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    for seed in (3, 4):
        saved = json.loads((out / f"seed-{seed}" / "results.json").read_text())
        assert saved["settings"]["seed"] == seed
        assert list(saved["results"]) == ["base", "sacpo", "rsa-erm"]
    # the held-out split follows the seed
    evals = [(out / f"seed-{s}" / "data" / "eval.jsonl").read_text() for s in (3, 4)]
    assert evals[0] != evals[1]
    report = (out / "seeds.md").read_text()
    assert report.startswith("# The recipe over seeds 3, 4")
    assert "RSA (ERM) minus SACPO" in report
    summary = json.loads((out / "seeds.json").read_text())
    assert summary["greedy"]["sacpo"]["refused: AdvBench"]["n"] == 2


def test_every_method_is_compared_with_each_before_it(tmp_path):
    paths, _, rsa = three_runs(tmp_path)
    erm = [(0.7, 0.0, -1.2, 0.0), (0.75, 0.0, -1.1, 0.0), (0.8, 0.0, -1.0, 0.0)]
    for path, row in zip(paths, erm):
        data = json.loads((path / "results.json").read_text())
        data["results"]["rsa-erm"] = metrics(*row)
        (path / "results.json").write_text(json.dumps(data))
    runs = seeds.load_runs(paths)
    assert seeds.comparisons(seeds.summarise(runs)) == [
        ("rsa-cvar", "sacpo"), ("rsa-erm", "sacpo"), ("rsa-erm", "rsa-cvar"),
    ]  # fmt: skip
    report = seeds.write_seed_report(tmp_path, paths)
    assert "## RSA (ERM) minus RSA (CVaR), seed by seed" in report
    saved = json.loads((tmp_path / "seeds.json").read_text())["paired"]["greedy"]
    assert list(saved) == ["rsa-cvar - sacpo", "rsa-erm - sacpo", "rsa-erm - rsa-cvar"]
    got = saved["rsa-erm - rsa-cvar"]["refused: AdvBench"]
    want = reference_ci([e[0] - r[0] for e, r in zip(erm, rsa)])
    assert (got["mean"], got["lo"], got["hi"]) == pytest.approx(want, abs=1e-5)


def test_runs_that_sampled_are_summarised_for_both_decodings(tmp_path):
    paths, sacpo, _ = three_runs(tmp_path)
    saved = seeds.write_seed_report(tmp_path, paths)
    assert "sampled" not in json.loads((tmp_path / "seeds.json").read_text())
    assert "(sampled answers)" not in saved
    for path in paths:
        data = json.loads((path / "results.json").read_text())
        data["settings"]["eval_samples"] = 1
        for metrics_ in data["results"].values():
            for key in [k for k in metrics_ if k.endswith("_greedy")]:
                metrics_[key.replace("_greedy", "_sampled")] = metrics_[key] * 0.8
        (path / "results.json").write_text(json.dumps(data))
    text = seeds.write_seed_report(tmp_path, paths)
    assert "(greedy answers)" in text and "(sampled answers)" in text
    saved = json.loads((tmp_path / "seeds.json").read_text())
    got = saved["sampled"]["sacpo"]["refused: AdvBench"]
    want = reference_ci([0.8 * s[0] for s in sacpo])
    assert (got["mean"], got["lo"], got["hi"]) == pytest.approx(want, abs=1e-5)
    assert list(saved["paired"]) == ["greedy", "sampled"]
    assert saved["greedy"]["sacpo"]["refused: AdvBench"]["mean"] == pytest.approx(
        np.mean([s[0] for s in sacpo])
    )
