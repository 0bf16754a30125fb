"""The real-model recipe end to end on a tiny random model: the run and its
resume, every setting as a flag, the command line, bad input (the SmolLM2
run is an example and a benchmark, not a test)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from rsa_mlx.recipe import settings
from rsa_mlx.recipe.run import method_settings, run
from rsa_mlx.util.errors import ConfigError
from tests.gguf_tiny import write_hf
from tests.recipe_tiny import TINY, tiny_recipe


@pytest.mark.slow
def test_recipe_smoke_run_on_a_tiny_model_and_resume(tmp_path):
    # a llama with a BPE that has merges and a chat template: GGUF can hold it
    write_hf(tmp_path / "model", "llama", tied=True, max_position_embeddings=1024)
    cfg = tiny_recipe(tmp_path)
    out = tmp_path / "out"
    summary = run(cfg)
    assert list(summary) == ["base", "stage1", "sacpo", "rsa-erm"]
    for name in ("report.md", "plot.svg", "results.json", "data/eval.jsonl"):
        assert (out / name).exists(), name
    sets = [
        json.loads(r)["set"] for r in (out / "data/eval.jsonl").read_text().splitlines()
    ]
    assert sets.count("advbench") == 3 and sets.count("borderline") == 2
    reward = (out / "data" / "reward" / "train.jsonl").read_text().splitlines()
    safety = (out / "data" / "safety" / "train.jsonl").read_text().splitlines()
    assert len(safety) > len(reward)  # refusal pairs plus the contrast pairs
    made = json.loads((out / "data" / "pairs.json").read_text())
    # the default leaves cut answers open: the tiny model's run to the limit
    assert made["reward"]["truncated"]["chosen"] > 0
    assert made["safety"]["truncated"]["rejected"] > 0
    evaluated = json.loads((out / "eval" / "rsa-erm.json").read_text())
    assert len(evaluated["answers"]["advbench"]["greedy"]) == 3
    for key in ("unsafe_rate", "helpfulness", "loops", "shift_kl",
                "refusal_phrased_sampled", "fluency_benign_greedy"):  # fmt: skip
        assert key in evaluated["metrics"], key
    report = (out / "report.md").read_text()
    assert "Examples (greedy)" in report and "RSA (ERM)" in report
    assert (out / "export-hf" / "config.json").exists()
    assert (out / "aligned.gguf").stat().st_size > 0
    # the time of every step, over all calls
    saved = json.loads((out / "results.json").read_text())
    steps = saved["steps"]
    for step in ("pairs", "train sacpo", "train rsa-erm", "evaluate base", "export"):
        assert steps[step] > 0, step
    assert saved["seconds"] == pytest.approx(sum(steps.values()))
    # a second run finds every step done and changes nothing
    stamp = (out / "runs" / "rsa-erm" / "final" / "adapters.safetensors").stat()
    assert run(cfg) == summary
    assert json.loads((out / "results.json").read_text())["steps"] == steps
    assert (out / "runs" / "rsa-erm" / "final" / "adapters.safetensors").stat() == stamp
    # a setting that changes the data or the training is refused by name
    with pytest.raises(ConfigError, match=r"learning_rate 5e-05 -> 0\.001"):
        run(tiny_recipe(tmp_path, learning_rate=1e-3))


def test_every_recipe_setting_is_a_flag_and_reaches_the_trainer(tmp_path):
    from click.testing import CliRunner

    from rsa_mlx.cli.recipe import main
    from rsa_mlx.tuner.config import resolve

    help_text = CliRunner().invoke(main, ["--help"], terminal_width=200).output
    for field in dataclasses.fields(settings.RecipeConfig):
        assert "--" + field.name.replace("_", "-") in help_text, field.name
    cfg = settings.resolve_recipe(
        {
            "learning_rate": 2e-5,
            "beta": 0.2,
            "safety_beta": 0.05,
            "epochs": 3.0,
            "num_layers": 7,
            "lora_rank": 4,
            "lora_scale": 10.0,
            "sft_weight": 0.5,
            "bias_correction": True,
            "batch_size": 8,
            "max_seq_length": 200,
            "seed": 5,
            "harmful": "h",
        }
    )
    for method in ("sacpo", "rsa-cvar", "rsa-erm"):
        train = resolve(
            method_settings(cfg, method, "m", tmp_path, tmp_path / "r", False)
        )
        assert (train.learning_rate, train.beta, train.safety_beta) == (2e-5, 0.2, 0.05)
        assert (train.epochs, train.num_layers, train.batch_size) == (3.0, 7, 8)
        assert (
            train.lora_parameters["rank"] == 4 and train.lora_parameters["scale"] == 10
        )
        assert (train.sft_weight, train.bias_correction, train.seed) == (0.5, True, 5)
        assert train.max_seq_length == 200 and train.method_name().startswith(
            "dpo" if method == "sacpo" else "variant2"
        )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--learning-rate", "-1"], "learning_rate: must be positive"),
        (["--sft-weight", "-0.5"], "sft_weight: must be at least 0"),
        (["--advbench-eval", "0"], "advbench_eval: must be at least 1"),
        (["--methods", "sacpo,ppo"], "unknown method 'ppo'"),
        (["--num-layers", "0"], "num_layers: -1 (all) or at least 1"),
        (["--advbench-rephrased", "1.5"], "advbench_rephrased: a share in [0, 1]"),
        (["--refusal-sentences", "-1"], "refusal_sentences: must be at least 0"),
        (["--cut-answers", "closed"], "cut_answers: one of ended, open, got 'closed'"),
    ],
)
def test_bad_recipe_flags_are_one_line_and_exit_2(tmp_path, args, message):
    from click.testing import CliRunner

    from rsa_mlx.cli.recipe import main

    result = CliRunner().invoke(
        main, ["--model", "m", "--harmful", "h", "--out", str(tmp_path / "o"), *args]
    )
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_recipe_yaml_and_quick_preset_with_flags_on_top(tmp_path):
    (tmp_path / "r.yaml").write_text("learning_rate: 3e-5\nadvbench_eval: 40\n")
    cfg = settings.resolve_recipe(
        {"advbench_eval": 50}, tmp_path / "r.yaml", quick=True
    )
    assert cfg.learning_rate == 3e-5  # YAML over the defaults
    assert cfg.advbench_eval == 50  # the command line over YAML
    assert cfg.phrased_eval == settings.QUICK["phrased_eval"]  # the preset
    (tmp_path / "bad.yaml").write_text("learning_rat: 1\n")
    with pytest.raises(ConfigError, match="unknown recipe setting 'learning_rat'"):
        settings.resolve_recipe({}, tmp_path / "bad.yaml")


@pytest.mark.slow
def test_recipe_command_quick_on_a_tiny_model(tmp_path):
    from click.testing import CliRunner

    from rsa_mlx.recipe.__main__ import main

    cfg = tiny_recipe(tmp_path)
    args = ["--model", cfg.model, "--harmful", cfg.harmful]
    tiny = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    out = tmp_path / "q"
    result = CliRunner().invoke(
        main, [*args, *tiny, "--out", str(out), "--no-export", "--cut-answers", "ended"]
    )
    assert result.exit_code == 0, result.output
    # answers cut by the token limit, ended: nothing marked truncated
    made = json.loads((out / "data" / "pairs.json").read_text())
    assert made["reward"]["truncated"] == {"chosen": 0, "rejected": 0}
    row = json.loads(
        (out / "data" / "reward" / "train.jsonl").read_text().split("\n")[0]
    )
    assert "chosen_truncated" not in row
    assert "refused: AdvBench" in (out / "report.md").read_text()
    assert (out / "plot.png").exists() and not (out / "export-hf").exists()
    assert not (out / "aligned.gguf").exists()
    Path(cfg.harmful).write_text("too few\n")
    o2 = ["--out", str(tmp_path / "o2"), "--no-export"]
    result = CliRunner().invoke(main, [*args, *tiny, *o2])
    assert result.exit_code == 2
    assert "1 harmful prompts: holding out 3 needs at least 4" in result.output


def test_recipe_checks_the_gguf_export_before_any_work(tmp_path):
    from rsa_mlx.util.errors import InputError

    cfg = tiny_recipe(tmp_path)
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    del config["max_position_embeddings"]
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="no max_position_embeddings"):
        run(cfg)
    config["max_position_embeddings"] = 4096  # now the word-level tokenizer
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="a BPE without merges"):
        run(cfg)
    assert not (tmp_path / "out" / "data").exists()


def test_stage1_is_evaluated_unless_switched_off(tmp_path):
    from rsa_mlx.recipe.run import FREE, models_to_evaluate

    runs = {"sacpo": tmp_path / "a", "rsa-cvar": tmp_path / "b"}
    assert list(models_to_evaluate("m", runs)) == [
        "base",
        "stage1",
        "sacpo",
        "rsa-cvar",
    ]
    assert models_to_evaluate("m", runs)["stage1"]["adapter_path"] == str(
        tmp_path / "a" / "reward"
    )
    assert list(models_to_evaluate("m", runs, stage1=False)) == [
        "base",
        "sacpo",
        "rsa-cvar",
    ]
    assert "eval_stage1" in FREE  # a rerun may evaluate more or less
    quick = settings.resolve_recipe({"harmful": "h"}, quick=True)
    assert not quick.eval_stage1 and settings.RecipeConfig().eval_stage1
