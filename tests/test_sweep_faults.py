"""Sweeps under faults and bad input (issue 22): empty grid values, the
results files, non-finite scores, metric names, a report without
helpfulness, changed inputs, relative paths, two processes on one folder."""

from __future__ import annotations

import csv
import io
import json
import sys
import types

import pytest

from rsa_mlx.study import grid as grids
from rsa_mlx.study import sweep
from rsa_mlx.util.errors import ConfigError
from tests.tiny import pku_rows, write_jsonl, write_model


@pytest.mark.parametrize(
    "item", ["safety_beta=0.1,,", "iters=2,", "seed=,1", "seed=0, ,1"]
)
def test_an_empty_grid_value_is_refused(item):
    with pytest.raises(ConfigError, match="an empty value"):
        grids.parse_grid([item])
    with pytest.raises(ConfigError, match="--seeds 'seed=0,,1': an empty value"):
        grids.parse_grid(["seed=0,,1"], "--seeds")


def test_results_csv_has_each_column_once():
    rows = [
        {"id": "base", "kind": "base", "method": "base", "grid": {},
         "metrics": {"unsafe_rate": 0.5}},
        {"id": "c1", "kind": "cell", "method": "sacpo",
         "grid": {"method": "sacpo", "safety_beta": 0.1, "seed": 0},
         "metrics": {"unsafe_rate": 0.25}, "settings": {"seed": 0, "iters": 2}},
    ]  # fmt: skip
    table = list(csv.reader(io.StringIO(sweep.to_csv(rows))))
    head = table[0]
    assert len(head) == len(set(head)), head
    assert head[:5] == ["id", "kind", "method", "safety_beta", "seed"]
    assert table[2][head.index("method")] == "sacpo"


# ------------------------------------------------- a tiny model and data


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    write_model(root / "model", chat=True, tied=True)
    write_jsonl(root / "data" / "train.jsonl", pku_rows(8))
    rows = [{"prompt": f"how do I do bad thing {i}?", "harmful": True} for i in (1, 2)]
    write_jsonl(root / "harmful.jsonl", rows)
    rows += [{"prompt": "how do I bake bread?", "harmful": False}]
    write_jsonl(root / "mixed.jsonl", rows)
    return root


def sweep_args(tiny, out, prompts="harmful.jsonl", *extra):
    return [
        "--model", str(tiny / "model"), "--data", str(tiny / "data"),
        "--prompts", str(tiny / prompts), "--scorer", "refusal", "-k", "1",
        "--max-tokens", "2", "--methods", "sacpo", "--set", "iters=2",
        "--set", "batch_size=2", "--set", "steps_per_eval=0",
        "--sweep-path", str(out), *extra,
    ]  # fmt: skip


def sweep_cli(*args):
    from click.testing import CliRunner

    from rsa_mlx.cli import main

    return CliRunner().invoke(main, ["sweep", *map(str, args)])


def one_line(result) -> str:
    assert result.exit_code == 2, result.output + repr(result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def strict_json(line: str):
    """``json.loads`` that refuses NaN and Infinity, as JSON does."""

    def refuse(name):
        raise ValueError(f"bare {name} is not JSON")

    return json.loads(line, parse_constant=refuse)


def test_a_sweep_without_helpfulness_reports_its_harms(tiny, tmp_path):
    """Item 8 (and 4, 5, 12): every prompt harmful, scored by refusal."""
    out = tmp_path / "s"
    result = sweep_cli(*sweep_args(tiny, out, "harmful.jsonl", "--harm", "unsafe_rate"))
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "measures no helpfulness on these prompts" in result.stderr
    rows = [strict_json(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert rows and all(r["metrics"]["helpfulness"] is None for r in rows)
    report = (out / "report.md").read_text()
    assert "No helpfulness was measured" in report and "| unsafe rate |" in report
    assert "(No plot" in report and not (out / "plot.svg").exists()
    strict_json((out / "summary.json").read_text())
    # the report alone: the folder holds the model and the prompts (item 12)
    result = sweep_cli("--sweep-path", out, "--report-only", "--harm", "mean_cost")
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "No helpfulness was measured" in result.output
    # a misspelt harm is refused, and the report is left as it was (item 5)
    before = (out / "report.md").read_text()
    line = one_line(
        sweep_cli("--sweep-path", out, "--report-only", "--harm", "unsafe-rate")
    )
    assert "harm metric 'unsafe-rate': not a metric of the results in" in line
    assert (out / "report.md").read_text() == before
    assert "needs --sweep-path" in one_line(sweep_cli("--report-only"))


def test_unknown_harm_metrics_are_refused_before_training(tiny, tmp_path):
    spec = tmp_path / "sweep.yaml"
    spec.write_text("harms: [nonexistent_metric]\n")
    out = tmp_path / "s"
    line = one_line(sweep_cli("-c", spec, *sweep_args(tiny, out, "mixed.jsonl")))
    assert (
        "harm metric 'nonexistent_metric': not a metric of the prompts evaluator"
        in line
    )
    assert "unsafe_rate" in line and not out.exists()
    args = sweep_args(tiny, out, "mixed.jsonl", "--harm", "unsafe-rate")
    assert "'unsafe-rate'" in one_line(sweep_cli(*args)) and not out.exists()


def test_the_prompt_evaluator_names_its_metrics_before_running(tiny):
    from rsa_mlx.study.evaluators import make_evaluator
    from rsa_mlx.tuner.model import load

    model = str(tiny / "model")
    ev = make_evaluator(
        {"prompts": str(tiny / "mixed.jsonl"), "scorer": "refusal", "k": 1,
         "max_tokens": 2}, reference=model,
    )  # fmt: skip
    net, tokenizer = load(model)
    assert sorted(ev(net, tokenizer, "base")) == sorted(ev.metric_names())
    only_harmful = make_evaluator(
        {"prompts": str(tiny / "harmful.jsonl"), "scorer": "refusal"}, model
    )
    assert "helpfulness" not in only_harmful.metric_names()


@pytest.mark.parametrize(
    ("score", "what"),
    [({"reward": 1.0, "cost": float("nan")}, "cost nan"),
     ({"reward": float("inf"), "cost": 0.0}, "reward inf"),
     ({"reward": 1.0, "cost": float("-inf")}, "cost -inf")],
)  # fmt: skip
def test_a_non_finite_score_names_the_scorer_and_the_row(
    tiny, tmp_path, monkeypatch, score, what
):
    module = types.ModuleType("bad_scores")
    module.score = lambda record, response: dict(score)
    monkeypatch.setitem(sys.modules, "bad_scores", module)
    out = tmp_path / "s"
    args = sweep_args(tiny, out, "mixed.jsonl")
    args[args.index("refusal")] = "bad_scores:score"
    line = one_line(sweep_cli(*args))
    assert (
        f"scorer bad_scores:score returned a non-finite or non-numeric {what}" in line
    )
    assert "mixed.jsonl:1" in line
    assert not (out / "results.jsonl").exists()  # nothing read as safe


def test_results_files_are_json_and_infinite_metrics_refused(tmp_path):
    from rsa_mlx.util.atomic import save_json

    save_json(tmp_path / "x.json", {"a": float("nan"), "b": [float("inf"), 1.0]})
    assert strict_json((tmp_path / "x.json").read_text()) == {
        "a": None,
        "b": [None, 1.0],
    }
    folder = sweep.Sweep(tmp_path)
    folder.append({"id": "base", "kind": "base", "method": "base",
                   "metrics": {"helpfulness": float("nan")}})  # fmt: skip
    assert strict_json((tmp_path / "results.jsonl").read_text())["metrics"] == {
        "helpfulness": None
    }
    with pytest.raises(ConfigError, match="'mean_cost' is inf for base"):
        sweep.checked_metrics({"mean_cost": float("inf")}, "base")


def test_report_only_needs_only_the_folder(tmp_path):
    """Item 12: the folder's sweep.json holds the model and the prompts."""
    out = tmp_path / "s"
    out.mkdir()
    (out / "sweep.json").write_text(
        json.dumps({"base": {"model": "m"}, "evaluation": {"prompts": "p"}})
    )
    rows = [{"id": "base", "kind": "base", "method": "base", "grid": {},
             "metrics": {"helpfulness": 0.5, "unsafe_rate": 0.5}}]  # fmt: skip
    for seed in (0, 1):
        rows.append({"id": f"c{seed}", "kind": "cell", "method": "sacpo",
                     "grid": {"method": "sacpo", "seed": seed},
                     "metrics": {"helpfulness": 0.6, "unsafe_rate": 0.2 + seed / 10}})  # fmt: skip
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = sweep_cli("--sweep-path", out, "--report-only")
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "| sacpo | 2 |" in (out / "report.md").read_text()
    before = (out / "report.md").read_text()
    line = one_line(
        sweep_cli("--sweep-path", out, "--report-only", "--harm", "p_unsafe")
    )
    assert "'p_unsafe': not a metric of the results" in line and "unsafe_rate" in line
    assert (out / "report.md").read_text() == before


# ------------------------------------------ inputs that change, relative paths


class Recorder:
    """A deterministic evaluator: one number of the model's logits."""

    def __call__(self, model, tokenizer, label):
        import mlx.core as mx

        logits = model(mx.array([tokenizer.encode("bake a cake")])).astype(mx.float32)
        return {"helpfulness": float(logits.mean().item()), "unsafe_rate": 0.0}


def small_base(root):
    return {
        "model": str(root / "model"), "data": str(root / "data"), "iters": 2,
        "batch_size": 2, "learning_rate": 1e-3, "steps_per_eval": 0,
        "save_every": 2, "num_layers": -1,
    }  # fmt: skip


@pytest.fixture
def own(tmp_path):
    """A model, data and prompts of this test's own, to change."""
    write_model(tmp_path / "model", chat=True, tied=True)
    write_jsonl(tmp_path / "data" / "train.jsonl", pku_rows(8))
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi", "harmful": True}])
    return tmp_path


def test_changed_data_or_prompts_are_refused_on_a_grown_grid(own):
    """Item 2: content hashes of the data, the prompts and the model."""
    grid = {"method": ["sacpo"], "safety_beta": [0.1]}
    grown = {"method": ["sacpo"], "safety_beta": [0.1, 0.05]}
    description = {"evaluator": "test", "prompts": str(own / "p.jsonl")}
    out = own / "s"
    sweep.run_sweep(small_base(own), grid, Recorder(), out, description)
    data = own / "data" / "train.jsonl"
    original = data.read_text()
    data.write_text("".join(original.splitlines(True)[:4]))  # cut to half
    with pytest.raises(ConfigError, match=r"the reward data .*data' changed since"):
        sweep.run_sweep(small_base(own), grown, Recorder(), out, description)
    data.write_text(original)
    prompts = own / "p.jsonl"
    prompts.write_text(prompts.read_text().replace("true", "false"))
    with pytest.raises(ConfigError, match=r"the prompts .*p\.jsonl' changed since"):
        sweep.run_sweep(small_base(own), grown, Recorder(), out, description)
    prompts.write_text(prompts.read_text().replace("false", "true"))
    config = own / "model" / "config.json"
    config.write_text(
        config.read_text().replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": 0.1')
    )
    with pytest.raises(ConfigError, match=r"the model .*model' changed since"):
        sweep.run_sweep(small_base(own), grown, Recorder(), out, description)
    config.write_text(
        config.read_text().replace('"rms_norm_eps": 0.1', '"rms_norm_eps": 1e-05')
    )
    rows = sweep.run_sweep(small_base(own), grown, Recorder(), out, description)
    assert sum(r["kind"] == "cell" for r in rows) == 2
    recorded = json.loads((out / "sweep.json").read_text())["inputs"]
    whats = {v["what"] for v in recorded.values()}
    assert whats == {"model", "reward data", "prompts"}


def test_relative_and_absolute_paths_are_one_sweep(own, monkeypatch):
    """Item 13: paths are compared resolved."""
    grid = {"method": ["sacpo"], "safety_beta": [0.1]}
    out = own / "s"
    absolute = {"evaluator": "test", "prompts": str(own / "p.jsonl")}
    sweep.run_sweep(small_base(own), grid, Recorder(), out, absolute)
    monkeypatch.chdir(own)
    relative = {**small_base(own), "model": "model", "data": "./data"}
    rows = sweep.run_sweep(
        relative, grid, Recorder(), "s", {**absolute, "prompts": "p.jsonl"}
    )
    assert sum(r["kind"] == "cell" for r in rows) == 1
    with pytest.raises(ConfigError, match="another base"):
        sweep.run_sweep({**relative, "iters": 3}, grid, Recorder(), "s", absolute)


def test_digests_stream_files_and_read_only_weight_headers(tmp_path):
    from rsa_mlx.util.fingerprint import digest

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})
    blob = len(header).to_bytes(8, "little") + header.encode()
    (folder / "model.safetensors").write_bytes(blob + b"\0" * 8)
    first = digest(folder)
    (folder / "model.safetensors").write_bytes(blob + b"\1" * 8)  # weights only
    (folder / ".lock").write_text("123")  # hidden: left out
    (folder / "pytorch_model.bin").write_bytes(b"x")  # not read by mlx-lm
    assert digest(folder) == first
    (folder / "config.json").write_text('{"a": 1}')
    assert digest(folder) != first
    assert digest(folder / "config.json") != digest(
        tmp_path / "m" / "model.safetensors"
    )


# ------------------------------------------------- two processes, one folder

BLOCKING_SCORER = """
import os, pathlib, time

def score(record, response):
    pathlib.Path(os.environ["SWEEP_READY"]).touch()
    go = pathlib.Path(os.environ["SWEEP_GO"])
    deadline = time.monotonic() + 120
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return {"reward": 1.0, "cost": 0.0}
"""


def wait_for(path, proc, seconds=180):
    import time

    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.1)


@pytest.mark.slow
def test_two_sweeps_on_one_folder_and_a_stale_lock(tiny, tmp_path):
    """Item 1: the second process is refused in one line while the first
    holds the folder; a lock left by a killed process is taken over."""
    import os
    import signal
    import subprocess

    (tmp_path / "blocking_scorer.py").write_text(BLOCKING_SCORER)
    ready, go = tmp_path / "ready", tmp_path / "go"
    env = {**os.environ, "SWEEP_READY": str(ready), "SWEEP_GO": str(go),
           "PYTHONPATH": f"{os.getcwd()}{os.pathsep}{tmp_path}"}  # fmt: skip

    def command(out):
        args = sweep_args(tiny, out, "mixed.jsonl")
        args[args.index("refusal")] = "blocking_scorer:score"
        return [sys.executable, "-m", "rsa_mlx.cli", "sweep", *args]

    def start(out):
        return subprocess.Popen(command(out), env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip

    out = tmp_path / "s"
    first = start(out)
    try:
        wait_for(ready, first)  # it holds the folder, evaluating the base model
        second = subprocess.run(command(out), env=env, capture_output=True,
                                text=True, timeout=180)  # fmt: skip
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(lines) == 1, second.stderr
        assert f"in use by another sweep (process {first.pid})" in lines[0]
        go.touch()
        _, stderr = first.communicate(timeout=300)
        assert first.returncode == 0, stderr[-2000:]
    finally:
        first.kill()
    assert not list((out / "runs").glob("*.partial"))
    # killed while it holds the folder: its lock is stale, the next one works
    go.unlink()
    ready.unlink()
    out = tmp_path / "killed"
    killed = start(out)
    try:
        wait_for(ready, killed)
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait(timeout=60)
    finally:
        killed.kill()
    go.touch()
    again = subprocess.run(command(out), env=env, capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"left locked by process {killed.pid}" in again.stdout + again.stderr
    assert len([r for r in sweep.Sweep(out).rows() if r["kind"] == "cell"]) == 1


def test_a_sweep_folder_held_by_another_process_is_refused(tiny, tmp_path):
    from tests.test_resume_faults import hold

    out = tmp_path / "s"
    holder, _ = hold(out)
    try:
        line = one_line(sweep_cli(*sweep_args(tiny, out, "mixed.jsonl")))
        assert f"in use by another sweep (process {holder.pid})" in line
        assert not (out / "sweep.json").exists()
    finally:
        holder.kill()
        holder.wait(timeout=60)
