"""Model shift (docs/method.md §6): exact per-token KL and log-ratio tail from the base."""

from __future__ import annotations

import json
import math
import sys
import types

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_map
from mlx_lm.utils import load as mlx_load

from rsa_mlx.cli import main as cli
from rsa_mlx.eval import evaluate as ev
from rsa_mlx.eval import prompts, sampling
from rsa_mlx.eval import shift as shift_module
from rsa_mlx.eval.shift import (
    _response_batch,
    model_shift,
    shift_and_fluency,
    token_shift,
)
from rsa_mlx.tuner import adapters
from rsa_mlx.util.errors import InputError
from tests.tiny import write_jsonl, write_model

# ------------------------------------------------ float64 references


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    top = np.max(np.where(np.isfinite(x), x, -np.inf), axis=-1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))


def np_kl(logq: np.ndarray, logp: np.ndarray) -> float:
    """sum_v q(v) (log q(v) - log p(v)), by an explicit loop; 0 log 0 = 0."""
    total = 0.0
    for lq, lp in zip(logq, logp):
        if lq == -np.inf:
            continue
        total += math.exp(lq) * (lq - lp)
    return total


def brute_cvar(values, level: float) -> float:
    """Mean of the largest (1 - level) fraction, by sorting and counting."""
    x = sorted(values, reverse=True)
    tail = (1 - level) * len(x)
    if tail == 0:
        return x[0]
    total, left = 0.0, tail
    for value in x:
        share = min(1.0, left)
        total += share * value
        left -= share
        if left <= 0:
            break
    return total / tail


# ------------------------------------------------------- token_shift


def random_logits(rng, shape, vocab):
    logits = rng.normal(size=(*shape, vocab)) * 2
    flat = logits.reshape(-1, vocab)
    flat[0] *= 30  # peaked
    flat[1] = 0.0  # flat
    flat[2, :3] = -np.inf  # masked entries
    return logits


def test_token_shift_against_float64_sums():
    rng = np.random.default_rng(0)
    shape, vocab = (3, 4), 11
    a = random_logits(rng, shape, vocab)
    b = random_logits(rng, shape, vocab)
    b.reshape(-1, vocab)[3, 5] = -np.inf  # p = 0 where q > 0 ...
    a.reshape(-1, vocab)[3, 5] = -np.inf  # ... masked in q too: finite
    a.reshape(-1, vocab)[4, :4] = -np.inf  # q = 0 where p > 0: terms are 0
    targets = rng.integers(4, vocab, size=shape)
    kl, ratio = token_shift(
        mx.array(a, mx.float32), mx.array(b, mx.float32), mx.array(targets)
    )
    assert kl.shape == shape and ratio.shape == shape
    kl, ratio = np.array(kl), np.array(ratio)
    assert np.isfinite(kl).all() and np.isfinite(ratio).all()
    logq, logp = np_log_softmax(a), np_log_softmax(b)
    for idx in np.ndindex(*shape):
        want = np_kl(logq[idx], logp[idx])
        assert math.isclose(kl[idx], want, rel_tol=1e-4, abs_tol=1e-5), idx
        t = targets[idx]
        want_ratio = logq[idx][t] - logp[idx][t]
        assert math.isclose(ratio[idx], want_ratio, rel_tol=1e-4, abs_tol=1e-4)


def test_token_shift_support_mismatch_is_infinite_not_nan():
    q = mx.array([[0.0, 0.0, -np.inf]])
    p = mx.array([[0.0, -np.inf, 0.0]])
    kl, ratio = token_shift(q, p, mx.array([1]))
    assert np.array(kl)[0] == np.inf and np.array(ratio)[0] == np.inf
    # and p = 0 only where q = 0: finite, no NaN from 0 * (-inf)
    kl, _ = token_shift(p, p, mx.array([0]))
    assert np.array(kl)[0] == 0.0


def test_kl_is_never_negative_and_zero_on_equal_logits():
    rng = np.random.default_rng(1)
    for scale in (1e-3, 1.0, 10.0):
        a = mx.array(rng.normal(size=(64, 50)) * scale, mx.float32)
        b = a + mx.array(rng.normal(size=(64, 50)) * 1e-4, mx.float32)
        t = mx.array(rng.integers(0, 50, 64))
        kl, _ = token_shift(a, b, t)
        assert (np.array(kl) >= 0).all()
        kl, ratio = token_shift(a, a, t)
        assert (np.array(kl) == 0).all() and (np.array(ratio) == 0).all()


# --------------------------------------------------------- the masks


def test_mask_covers_exactly_the_response_tokens():
    prompts = [[5, 6, 7], [8], [9, 10]]
    responses = [[1, 2], [3, 4, 11, 12], []]
    inputs, targets, index = _response_batch(prompts, responses)
    assert inputs.shape == (3, 4) == targets.shape
    assert index.size == sum(map(len, responses))
    rows, cols = np.divmod(index, inputs.shape[1])
    assert list(zip(rows, cols)) == [(0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3)]
    picked = targets.reshape(-1)[index]
    assert list(picked) == [1, 2, 3, 4, 11, 12]


# -------------------------------------------------------- model_shift


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("shift")
    write_model(root / "model")
    return root


def perturbed(folder, scale=0.3, seed=5):
    model, _ = mlx_load(str(folder))
    mx.random.seed(seed)
    model.update(
        tree_map(lambda w: w + scale * mx.random.normal(w.shape), model.parameters())
    )
    mx.eval(model.parameters())
    return model


SEQUENCES = [
    ([1, 2, 3], [40, 41]),
    ([4], [42, 43, 44, 45, 46]),
    ([5, 6], []),  # a zero-length response: contributes nothing
    ([7, 8, 9, 10, 11], [47]),
    ([12, 13], [48, 49, 50]),
]


def brute_force(model, reference, sequences):
    """Per-token KL and log-ratio, one unpadded sequence at a time."""
    kls, ratios = [], []
    for p, r in sequences:
        if not r:
            continue
        seq = mx.array([p + r])
        logq = np_log_softmax(np.array(model(seq)[0].astype(mx.float32)))
        logp = np_log_softmax(np.array(reference(seq)[0].astype(mx.float32)))
        for j, token in enumerate(r):
            t = len(p) - 1 + j
            kls.append(np_kl(logq[t], logp[t]))
            ratios.append(logq[t, token] - logp[t, token])
    return kls, ratios


def test_model_against_itself_is_exactly_zero(tiny):
    model, tok = mlx_load(str(tiny / "model"))
    got = model_shift(model, model, tok, SEQUENCES, batch_size=2)
    assert got == {
        "kl_mean": 0.0,
        "logratio_cvar": 0.0,
        "kl_cvar": 0.0,
        "logratio_mean": 0.0,
        "tokens": 11,
        "mu": 0.9,
    }
    # a separate copy of the same weights: exactly 0 as well
    twin, _ = mlx_load(str(tiny / "model"))
    assert model_shift(model, twin, None, SEQUENCES)["kl_mean"] == 0.0


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_model_shift_equals_a_float64_brute_force(tiny, batch_size):
    model, _ = mlx_load(str(tiny / "model"))
    reference = perturbed(tiny / "model")
    kls, ratios = brute_force(model, reference, SEQUENCES)
    assert len(kls) == sum(len(r) for _, r in SEQUENCES) == 11
    assert min(kls) > 1e-3  # the perturbation is not trivial
    for mu in (0.0, 0.5, 0.8, 0.95):
        got = model_shift(model, reference, None, SEQUENCES, mu, batch_size)
        assert got["tokens"] == 11 and got["mu"] == mu
        assert math.isclose(got["kl_mean"], np.mean(kls), rel_tol=1e-4)
        assert math.isclose(
            got["logratio_mean"], np.mean(ratios), rel_tol=1e-4, abs_tol=1e-4
        )
        assert math.isclose(
            got["logratio_cvar"], brute_cvar(ratios, mu), rel_tol=1e-4, abs_tol=1e-4
        )
        assert math.isclose(got["kl_cvar"], brute_cvar(kls, mu), rel_tol=1e-4)
    assert got["logratio_cvar"] >= got["logratio_mean"]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_shift_and_fluency_gives_each_responses_mean_logprob_under_the_reference(
    tiny, batch_size
):
    model, _ = mlx_load(str(tiny / "model"))
    reference = perturbed(tiny / "model")
    stats, logps = shift_and_fluency(model, reference, SEQUENCES, 0.9, batch_size)
    assert stats == model_shift(model, reference, None, SEQUENCES, 0.9, batch_size)
    assert len(logps) == len(SEQUENCES) and math.isnan(logps[2])
    for (p, r), got in zip(SEQUENCES, logps):
        if r:  # float64 reference: the mean log p(y_t) over the response
            logp = np_log_softmax(
                np.array(reference(mx.array([p + r]))[0].astype(mx.float32))
            )
            want = np.mean([logp[len(p) - 1 + j, t] for j, t in enumerate(r)])
            assert got == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_a_model_against_itself_runs_once_and_scores_as_against_a_twin(
    tiny, monkeypatch
):
    """The recipe scores the base model against itself: one forward pass a
    batch, and the same fluency as a separate copy's two passes give."""
    model, _ = mlx_load(str(tiny / "model"))
    twin, _ = mlx_load(str(tiny / "model"))
    calls = []

    class Counting(shift_module.ResponseLogits):
        def __call__(self, *args):
            calls.append(1)
            return super().__call__(*args)

    monkeypatch.setattr(shift_module, "ResponseLogits", Counting)
    full_terms = shift_module._token_terms

    def no_kl(*args):
        raise AssertionError("the vocabulary-wide KL of a model against itself")

    monkeypatch.setattr(shift_module, "_token_terms", no_kl)
    stats, logps = shift_and_fluency(model, model, SEQUENCES, 0.9, 2)
    monkeypatch.setattr(shift_module, "_token_terms", full_terms)
    once = len(calls)
    twin_stats, twin_logps = shift_and_fluency(model, twin, SEQUENCES, 0.9, 2)
    assert len(calls) == 3 * once  # the twin: two passes a batch
    assert stats == twin_stats and stats["kl_mean"] == 0.0 and stats["tokens"] == 11
    np.testing.assert_allclose(logps, twin_logps, rtol=0, atol=1e-6)


def test_model_shift_edge_cases(tiny):
    model, _ = mlx_load(str(tiny / "model"))
    reference = perturbed(tiny / "model")
    nothing = model_shift(model, reference, None, [([1, 2], []), ([3], [])])
    assert nothing["tokens"] == 0
    assert all(
        nothing[k] is None for k in ("kl_mean", "logratio_cvar", "logratio_mean")
    )
    assert model_shift(model, reference, None, [])["tokens"] == 0
    with pytest.raises(InputError, match="no tokens"):
        model_shift(model, reference, None, [([], [1, 2])])
    with pytest.raises(InputError, match="mu must be in"):
        model_shift(model, reference, None, SEQUENCES, mu=1.5)
    # eval mode while measuring; the caller's mode comes back
    model.train()
    model_shift(model, reference, None, SEQUENCES[:1])
    assert model.training and not reference.training


# ------------------------------------------------------ evaluate_model


def constant(record, responses):
    return [{"reward": 1.0, "cost": 0.0}] * len(responses)


def test_sampled_ids_are_the_texts(tiny):
    model, tok = mlx_load(str(tiny / "model"))
    records = [prompts.PromptRecord("hello"), prompts.PromptRecord("bye")]
    texts, ids = sampling.sample_with_ids(
        model, tok, records, k=3, max_tokens=5, temperature=30.0, batch_size=4
    )
    assert texts == sampling.sample_responses(
        model, tok, records, k=3, max_tokens=5, temperature=30.0, batch_size=4
    )
    for record, row_texts, row_ids in zip(records, texts, ids):
        for text, (prompt, response) in zip(row_texts, row_ids):
            assert prompt == prompts.prompt_ids(tok, record)
            assert 1 <= len(response) <= 5 and tok.decode(response) == text


def test_evaluate_model_reports_the_shift_only_with_a_reference(tiny):
    model, tok = mlx_load(str(tiny / "model"))
    reference = perturbed(tiny / "model")
    records = [prompts.PromptRecord("hello"), prompts.PromptRecord("bye")]
    settings = {"k": 2, "max_tokens": 4, "temperature": 30.0, "seed": 3}
    plain = ev.evaluate_model(model, tok, records, constant, **settings)
    assert not any(key.startswith("shift") for key in plain["summary"])
    assert "KL shift" not in ev.markdown_table({"m": plain["summary"]})
    shifted = ev.evaluate_model(
        model, tok, records, constant, reference=reference, shift_mu=0.5, **settings
    )
    summary = shifted["summary"]
    # the same samples, and the same other metrics
    assert shifted["samples"] == plain["samples"]
    assert {k: v for k, v in summary.items() if not k.startswith("shift")} == plain[
        "summary"
    ]
    # the shift is of the very token ids sampled
    _, ids = sampling.sample_with_ids(model, tok, records, 2, 4, 30.0, seed=3)
    want = model_shift(model, reference, tok, [x for row in ids for x in row], 0.5)
    assert summary["shift_kl"] == want["kl_mean"] > 0
    assert summary["shift_logratio_cvar"] == want["logratio_cvar"]
    assert summary["shift_kl_cvar"] == want["kl_cvar"]
    assert summary["shift_logratio"] == want["logratio_mean"]
    assert summary["shift_tokens"] == want["tokens"] > 0
    assert summary["shift_mu"] == 0.5
    table = ev.markdown_table({"m": summary})
    assert "KL shift" in table and "CVaR log-ratio" in table
    itself = ev.evaluate_model(model, tok, records, constant, reference=model)
    assert itself["summary"]["shift_kl"] == 0.0


# ------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def adapted(tiny):
    """A plain mlx-lm adapter folder and a run folder using it."""
    model, _ = mlx_load(str(tiny / "model"))
    cfg = adapters.LoRAConfig(rank=4, num_layers=-1)
    mx.random.seed(2)
    for layer in adapters.add_adapter(model, cfg):
        layer.lora_b = 0.2 * mx.random.normal(layer.lora_b.shape)
    adapters.save_adapter(tiny / "run" / "stage1", model, cfg)
    (tiny / "run" / "run.json").write_text(
        json.dumps({"model": str(tiny / "model"), "stages": [{"path": "stage1"}]})
    )
    return tiny / "run"


@pytest.fixture
def scorer_module(monkeypatch):
    module = types.ModuleType("shift_scores")
    module.score = lambda record, response: (1.0, 0.0)
    monkeypatch.setitem(sys.modules, "shift_scores", module)
    return "shift_scores:score"


def evaluate(tiny, tmp_path, scorer, *args):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}, {"prompt": "yo"}])
    out = tmp_path / "r.json"
    result = CliRunner().invoke(
        cli,
        ["evaluate", "--prompts", str(prompts), "--scorer", scorer, "-k", "2",
         "--max-tokens", "3", "--temperature", "30", "--output", str(out), *args],
    )  # fmt: skip
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output, json.loads(out.read_text())


def test_cli_evaluate_of_an_adapter_measures_the_shift_from_its_base(
    tiny, adapted, tmp_path, scorer_module
):
    for args in (
        ["--adapter-path", str(adapted)],  # the run's base model
        ["--model", str(tiny / "model"), "--adapter-path", str(adapted / "stage1")],
    ):
        output, result = evaluate(tiny, tmp_path, scorer_module, *args)
        summary = result["summary"]
        assert summary["shift_kl"] > 0 and summary["shift_tokens"] > 0
        assert summary["shift_mu"] == 0.9
        assert result["model"]["reference"] == str(tiny / "model")
        assert f"model shift from {tiny / 'model'}: KL " in output
        assert "CVaR0.9 log-ratio" in output
        assert (
            "| worst | KL shift | CVaR KL shift | CVaR log-ratio |" in output
        )  # shift last
    _, again = evaluate(tiny, tmp_path, scorer_module, *args)
    assert again["summary"] == summary  # seeded: the same numbers


def test_cli_evaluate_without_adapter_or_with_no_shift(
    tiny, adapted, tmp_path, scorer_module
):
    output, result = evaluate(
        tiny, tmp_path, scorer_module, "--model", str(tiny / "model")
    )
    assert "model shift: none (no adapter; give --reference MODEL" in output
    assert not any(k.startswith("shift") for k in result["summary"])
    assert result["model"]["reference"] is None
    output, result = evaluate(
        tiny, tmp_path, scorer_module, "--adapter-path", str(adapted), "--no-shift"
    )
    assert "model shift: skipped (--no-shift)" in output
    assert not any(k.startswith("shift") for k in result["summary"])
    # a plain model against another base
    output, result = evaluate(
        tiny, tmp_path, scorer_module, "--model", str(tiny / "model"),
        "--reference", str(tiny / "model"),
    )  # fmt: skip
    assert result["summary"]["shift_kl"] == 0.0
    assert "model shift from" in output
