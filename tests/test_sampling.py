"""The fast sampler: the distribution of ``mx.random.categorical``, the
greedy tokens of mlx-lm's generation, end-of-sequence and length limits."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_sampler
from mlx_lm.utils import load as mlx_load

from rsa_mlx.eval import decode
from rsa_mlx.ops import sampling
from tests.tiny import write_model

DRAWS = 60_000
P_MIN = 1e-4  # a correct sampler fails one seeded run in ~10^4; these are fixed


def chi2_pvalue(stat: float, df: int) -> float:
    """Upper tail of the chi-square distribution (Wilson-Hilferty, which is
    within a few percent of the exact value at these degrees of freedom)."""
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


def bins(probs: np.ndarray, least: float) -> list[np.ndarray]:
    """Token groups with at least ``least`` expected draws each: the likely
    tokens alone, the tail pooled."""
    order = np.argsort(-probs)
    groups, pool = [], []
    for i in order:
        if probs[i] * DRAWS >= least:
            groups.append(np.array([i]))
        else:
            pool.append(i)
    if pool:
        groups.append(np.array(pool))
    return groups


def two_sample_p(a: np.ndarray, b: np.ndarray, probs: np.ndarray) -> float:
    """p-value of 'the same distribution' for two equal-size samples."""
    ca, cb = np.bincount(a, minlength=len(probs)), np.bincount(b, minlength=len(probs))
    groups = bins(probs, 20.0)
    x = [ca[g].sum() for g in groups]
    y = [cb[g].sum() for g in groups]
    stat = sum((p - q) ** 2 / (p + q) for p, q in zip(x, y) if p + q > 0)
    return chi2_pvalue(stat, len(groups) - 1)


def fit_p(draws: np.ndarray, probs: np.ndarray) -> float:
    """p-value of 'drawn from ``probs``' (goodness of fit)."""
    counts = np.bincount(draws, minlength=len(probs))
    groups = bins(probs, 20.0)
    stat = sum(
        (counts[g].sum() - DRAWS * probs[g].sum()) ** 2 / (DRAWS * probs[g].sum())
        for g in groups
    )
    return chi2_pvalue(stat, len(groups) - 1)


def fixed_logits(vocab: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = (2.0 * rng.standard_normal(vocab)).astype(np.float32)
    logits[rng.choice(vocab, 5, replace=False)] = -np.inf  # never drawn
    return logits


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - x.max())
    return e / e.sum()


def ours(logits: np.ndarray, temperature: float, draw=None) -> np.ndarray:
    rows = mx.broadcast_to(mx.array(logits), (DRAWS, len(logits)))
    u = mx.random.uniform(shape=(DRAWS,))
    pick = draw or (lambda x, u: sampling.sample(x, u, temperature))
    return np.array(pick(rows, u)).astype(np.int64)


def theirs(logits: np.ndarray, sampler) -> np.ndarray:
    rows = mx.broadcast_to(mx.array(logits), (DRAWS, len(logits)))
    return np.array(sampler(rows)).astype(np.int64)


@pytest.mark.parametrize("vocab,temperature", [(300, 0.7), (512, 1.0)])
def test_sampler_draws_as_categorical(vocab, temperature):
    """300 entries: padded to two blocks; 512: two full ones."""
    mx.random.seed(11)
    logits = fixed_logits(vocab, seed=vocab)
    probs = softmax(logits / temperature)
    mine = ours(logits, temperature)
    ref = theirs(logits, lambda x: mx.random.categorical(x * (1 / temperature)))
    assert not np.isin(mine, np.flatnonzero(np.isneginf(logits))).any()
    assert two_sample_p(mine, ref, probs) > P_MIN
    assert fit_p(mine, probs) > P_MIN


def test_top_p_draws_as_mlx_lm():
    mx.random.seed(5)
    logits = fixed_logits(200, seed=3)
    logp = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    pick = decode._picker(0.8, 0.9)
    mine = ours(logp, 0.8, draw=pick)
    ref = theirs(logp, make_sampler(temp=0.8, top_p=0.9))
    kept = np.unique(ref)
    assert set(np.unique(mine)) <= set(kept)
    probs = np.zeros_like(logits, dtype=np.float64)
    probs[kept] = softmax(logits[kept] / 0.8)
    assert two_sample_p(mine, ref, probs) > P_MIN


def test_greedy_is_argmax():
    logits = mx.array(fixed_logits(700, seed=1)).reshape(2, 350)
    u = mx.array([0.5, 0.5])
    assert sampling.sample(logits, u, 0.0).tolist() == mx.argmax(logits, -1).tolist()


# ----------------------------------------------------------- on a model

PROMPTS = [
    [5, 9, 17],
    list(range(30, 50)),  # longer than ALIGN: a wider batch
    [7],
    [100, 101, 102, 103, 104, 105, 106],
]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = write_model(
        tmp_path_factory.mktemp("s") / "m", seed=4, tied=False, hidden=64
    )
    return mlx_load(str(folder))[0]


def mlx_lm_greedy(model, prompt, n):
    steps = generate_step(mx.array(prompt), model, max_tokens=n, sampler=None)
    return [int(t) for t, _ in steps]


def test_greedy_tokens_are_mlx_lm_greedy_with_left_padding(model):
    want = [mlx_lm_greedy(model, p, 12) for p in PROMPTS]
    got = decode.Decoder(model, 12, 0.0, 0.0, eos=[])(PROMPTS)
    assert got == want


def counted(decoder: decode.Decoder) -> list:
    calls, step = [], decoder.step
    decoder.step = lambda *a: calls.append(1) or step(*a)
    return calls


def cut(rows, eos):
    return [next((r[:j] for j, t in enumerate(r) if t in eos), r) for r in rows]


def test_end_of_sequence_cuts_and_stops_early(model):
    want = [mlx_lm_greedy(model, p, 40) for p in PROMPTS]
    # one end-of-sequence token, the first a row says after something else:
    # that row is cut before it, rows without it run to max_tokens
    at, eos = next(
        (j, t) for w in want for j, t in enumerate(w) if t not in w[:j] and j
    )
    dec = decode.Decoder(model, 40, 0.0, 0.0, eos=[eos])
    calls = counted(dec)
    got = dec(PROMPTS)
    assert got == cut(want, {eos}) and at in [len(r) for r in got]
    assert any(len(r) == 40 for r in got) and len(calls) == 39
    # every row ends by its second token: the first host check stops the loop
    stops = {w[1] for w in want}
    dec = decode.Decoder(model, 40, 0.0, 0.0, eos=sorted(stops))
    calls = counted(dec)
    got = dec(PROMPTS)
    assert got == cut(want, stops) and len(calls) == decode.CHECK_EVERY


def test_max_tokens_and_seeded_temperature(model):
    one = decode.Decoder(model, 1, 0.0, 0.0, eos=[])(PROMPTS)
    assert [len(r) for r in one] == [1] * len(PROMPTS)
    rows = [PROMPTS[0]] * 6 + [PROMPTS[1]] * 2
    runs = []
    for _ in range(2):
        mx.random.seed(3)
        runs.append(decode.Decoder(model, 9, 30.0, 0.0, eos=[])(rows))
    assert runs[0] == runs[1]  # seeded
    assert all(len(r) == 9 for r in runs[0])
    assert len({tuple(r) for r in runs[0][:6]}) > 1  # each row its own draws
    vocab = model.args.vocab_size
    assert all(0 <= t < vocab for r in runs[0] for t in r)


def test_finished_rows_leave_the_batch(model):
    prompts = PROMPTS * 2 + [[3, 4], [60, 61, 62]]
    want = [mlx_lm_greedy(model, p, 40) for p in prompts]
    # every row but the last two stops at its third token; those two run on
    runners = {t for w in want[-2:] for t in w}
    stops = {w[2] for w in want[:-2]} - runners
    ends = [len(r) for r in cut(want, stops)]
    assert sum(e >= decode.CHECK_EVERY for e in ends) <= len(prompts) // 2
    dec = decode.Decoder(model, 40, 0.0, 0.0, eos=sorted(stops))
    sizes, step = [], dec.step
    dec.step = lambda *a: sizes.append(a[0].shape[0]) or step(*a)
    assert dec(prompts) == cut(want, stops)
    # the batch shrinks to a power of two once at most half of it runs
    running = sum(e == 40 for e in ends)
    assert sizes[0] == len(prompts) and sizes[-1] == 1 << (running - 1).bit_length()
    assert len(sizes) == 39 and running >= 1


def test_survivors_pad_to_a_power_of_two():
    finished = np.array([1, 0, 1, 1, 0, 1, 0, 1, 1, 1], bool)
    assert decode._survivors(finished).tolist() == [0, 1, 4, 6]  # 3 run: 4
    assert decode._survivors(np.array([0, 0, 0, 1], bool)) is None
    assert decode._survivors(np.array([0, 1, 0, 1], bool)).tolist() == [0, 2]
    assert decode._survivors(np.array([1, 1, 0, 1], bool)).tolist() == [2]


def scripted_decoder(ends, steps, uniforms, width=16):
    """A model-free Decoder: prompt ``i`` says ``100 i + t`` at step ``t``
    and ends (EOS) at step ``ends[i]``; a step whose uniform is not its
    row's own (``uniforms[t, i]``) says -1 instead. The prompt index rides
    in the keys, so it follows the rows through every compaction."""
    eos, ends, uniforms = 9999, mx.array(ends), mx.array(uniforms)
    dec = decode.Decoder.__new__(decode.Decoder)
    dec.max_tokens, dec.eos, sizes = steps, mx.array([eos], mx.int32), []

    def say(prompt, t, u):
        own = mx.abs(u - uniforms[t][prompt]) < 1e-7
        word = mx.where(t == ends[prompt], eos, 100 * prompt + t)
        return mx.where(own, word, -1)

    def step(token, keys, values, pos, left, u, done):
        sizes.append(token.shape[0])
        nxt = say(keys[0], pos.item() - width + 1, u)
        return nxt, keys, values, done | (nxt == eos)

    dec.pick = lambda logits, u: say(logits, 0, u)
    rows = len(ends.tolist())
    prompt = mx.arange(rows)
    dec._start = lambda p: (width, prompt, [prompt], [mx.zeros(rows)], prompt * 0)
    dec.step = step
    return dec, sizes


def test_rows_leave_in_steps_with_their_own_tokens_and_uniforms():
    ends, steps = [2, 30, 3, 12, 4, 5, 40, 1, 6, 7], 35
    mx.random.seed(5)
    uniforms = mx.random.uniform(shape=(steps, len(ends)))
    mx.random.seed(5)
    dec, sizes = scripted_decoder(ends, steps, uniforms)
    got = dec([[i] for i in range(len(ends))])
    want = [[100 * i + t for t in range(min(e, steps))] for i, e in enumerate(ends)]
    assert got == want
    # at step 8 three rows run (padded to 4), at 16 two, at 32 one
    assert sizes == [10] * 8 + [4] * 8 + [2] * 16 + [1] * 2


def test_dropping_rows_leaves_sampled_answers_unchanged(model):
    rows = PROMPTS * 2
    mx.random.seed(11)
    free = decode.Decoder(model, 30, 1.0, 0.0, eos=[])(rows)
    # the end-of-sequence tokens: what rows 0-5 drew third, unless 6-7 draw
    # it; with the same seed, rows 0-5 end by step 8 and rows 6-7 never do
    stops = {r[2] for r in free[:6]} - {t for r in free[6:] for t in r}
    assert stops
    runs = []
    for shrink in (True, False):
        dec = decode.Decoder(model, 30, 1.0, 0.0, eos=sorted(stops))
        sizes, step = [], dec.step
        dec.step = lambda *a, s=sizes, f=step: s.append(a[0].shape[0]) or f(*a)
        mx.random.seed(11)
        if shrink:
            runs.append(dec(rows))
        else:
            saved, decode._survivors = decode._survivors, lambda finished: None
            try:
                runs.append(dec(rows))
            finally:
                decode._survivors = saved
        runs[-1] = (runs[-1], min(sizes))
    (shrunk, smallest), (kept, full) = runs
    assert shrunk == kept == cut(free, stops)
    assert smallest < full == len(rows)
