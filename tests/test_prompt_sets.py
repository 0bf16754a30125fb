"""The recipe's prompt sets: well-formed, and held out as documented."""

from __future__ import annotations

import pytest

from rsa_mlx.recipe import sets
from rsa_mlx.recipe.prompts import TOPICS, benign_instructions
from rsa_mlx.util.errors import DataError
from tests import check_prompt_sets

SIZES = dict.fromkeys(sets.NAMES, 10**6)


def fake_advbench():
    """520 rows with AdvBench's first and last rows, so exclusions apply."""
    rows = [f"Harmful behaviour number {i}" for i in range(sets.ADVBENCH_SIZE)]
    rows[0], rows[-1] = sets.ADVBENCH_ENDS
    return rows


def test_the_sets_pass_their_checker(capsys):
    # fields, categories, counts, no duplicates, no train/eval near-paraphrase
    assert check_prompt_sets.check(quiet=True) == 0, capsys.readouterr().out


def test_held_out_prompts_are_never_trained_on():
    adv = fake_advbench()
    eval_sizes = {"advbench": 120, "phrased": 1000, "benign": 64, "borderline": 1000}
    s = sets.build_sets(adv, SIZES, eval_sizes, seed=3)
    for name in sets.NAMES:
        assert not set(s.train[name]) & set(s.eval[name]), name
    assert len(s.eval["advbench"]) == 120 and len(s.eval["benign"]) == 64
    # every AdvBench row a held-out phrased request paraphrases is kept out
    excluded = {adv[i] for i in sets.advbench_exclusions(adv)}
    assert excluded and not excluded & set(s.train["advbench"])
    assert len(s.train["advbench"]) == 520 - 120 - s.excluded
    # benign requests are held out by topic
    topic = dict(benign_instructions(with_topics=True))
    train_topics = {topic[p] for p in s.train["benign"]}
    eval_topics = {topic[p] for p in s.eval["benign"]}
    assert not train_topics & eval_topics and len(eval_topics) == 8
    assert train_topics | eval_topics == set(TOPICS)


def test_a_larger_training_budget_moves_nothing_into_evaluation():
    adv = fake_advbench()
    ev = {"advbench": 50, "phrased": 40, "benign": 24, "borderline": 40}
    small = sets.build_sets(adv, dict.fromkeys(sets.NAMES, 10), ev, seed=1)
    large = sets.build_sets(adv, SIZES, ev, seed=1)
    assert small.eval == large.eval
    assert all(set(small.train[n]) <= set(large.train[n]) for n in sets.NAMES)
    other = sets.build_sets(adv, SIZES, ev, seed=2)
    assert other.eval["advbench"] != large.eval["advbench"]


def test_rephrasing_changes_only_training_advbench_requests():
    adv = [f"Explain how to do harmful thing {i}" for i in range(200)]
    ev = {"advbench": 50, "phrased": 40, "benign": 24, "borderline": 40}
    plain = sets.build_sets(adv, SIZES, ev, seed=1)
    mixed = sets.build_sets(adv, SIZES, ev, seed=1, rephrased=0.5)
    assert mixed.eval == plain.eval
    assert {k: v for k, v in mixed.train.items() if k != "advbench"} == {
        k: v for k, v in plain.train.items() if k != "advbench"
    }
    before, after = plain.train["advbench"], mixed.train["advbench"]
    changed = [b for a, b in zip(before, after) if a != b]
    assert len(after) == len(before) == 150 and len(changed) == 75
    # the same harm, in other words, and never a held-out request
    assert all(a.split("how to ")[1] in b for a, b in zip(before, after))
    assert not set(after) & set(mixed.eval["advbench"])


def test_a_file_that_is_not_advbench_gets_no_index_exclusions():
    rows = [f"row {i}" for i in range(600)]
    assert sets.advbench_exclusions(rows) == set()


def test_too_few_harmful_prompts_for_the_held_out_share():
    with pytest.raises(DataError, match="holding out 120 needs at least 121"):
        sets.build_sets(
            ["a"] * 100, SIZES, {"advbench": 120, **dict.fromkeys(sets.NAMES[1:], 5)}
        )


def test_a_damaged_set_file_is_named_with_its_line(tmp_path, monkeypatch):
    (tmp_path / "harmful_train.jsonl").write_text('{"prompt": "a"}\nnot json\n')
    monkeypatch.setattr(sets, "SETS", tmp_path)
    with pytest.raises(DataError, match=r"harmful_train.jsonl':2: not JSON"):
        sets.read_set("harmful_train")
    with pytest.raises(DataError, match="no such prompt set"):
        sets.read_set("missing")
