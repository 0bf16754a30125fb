"""Preference data: formats, errors, tokenisation masks, truncation, batching."""

from __future__ import annotations

import gzip
import json
import lzma

import numpy as np
import pytest
from mlx_lm.utils import load_tokenizer

from rsa_mlx.tuner import data as D
from tests.tiny import pku_rows, preference_rows, write_jsonl, write_tokenizer


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat_tok")
    write_tokenizer(folder, chat=True)
    return load_tokenizer(folder)


@pytest.fixture(scope="module")
def plain_tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plain_tok")
    write_tokenizer(folder, chat=False)
    return load_tokenizer(folder)


# ------------------------------------------------------------------ reading


def test_preference_rows(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", preference_rows(7))
    pairs, report = D.load_pairs(path)
    assert len(pairs) == 7 and report.rows == 7
    assert pairs[0].system == "be brief" and pairs[1].system is None
    assert pairs[2].where == f"{path}:3"


def test_pku_rows_give_both_stages(tmp_path):
    rows = pku_rows(10)
    rows.append({**rows[0], "response_1": rows[0]["response_0"]})  # equal responses
    write_jsonl(tmp_path / "train.jsonl", rows)
    reward, r_report = D.load_pairs(tmp_path, "reward")
    safety, _ = D.load_pairs(tmp_path, "safety")
    assert len(reward) == len(safety) == 10
    assert r_report.skipped["equal responses"] == 1
    for row, r, s in zip(rows, reward, safety):
        assert r.chosen == row[f"response_{row['better_response_id']}"]
        assert s.chosen == row[f"response_{row['safer_response_id']}"]
        # the helpfulness and safety labels disagree in this data
        assert r.chosen == s.rejected


def test_chat_message_prompts_and_json_lists(tmp_path):
    rows = [
        {
            "prompt": [{"role": "user", "content": "hi"}],
            "chosen": "hello",
            "rejected": "go away",
        }
    ]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(rows))
    pairs, _ = D.load_pairs(path)
    assert pairs[0].prompt == ({"role": "user", "content": "hi"},)
    assert pairs[0].where == f"{path}[0]"


def test_folder_splits_stage_folders_and_compressed(tmp_path):
    write_jsonl(tmp_path / "a" / "reward" / "train.jsonl", preference_rows(4))
    write_jsonl(tmp_path / "a" / "reward" / "valid.jsonl", preference_rows(2, seed=1))
    (tmp_path / "a" / "safety").mkdir()
    with lzma.open(tmp_path / "a" / "safety" / "train.jsonl.xz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in preference_rows(3)))
    assert len(D.load_pairs(tmp_path / "a", "reward")[0]) == 4
    assert len(D.load_pairs(tmp_path / "a", "reward", "valid")[0]) == 2
    assert len(D.load_pairs(tmp_path / "a", "safety")[0]) == 3
    assert D.load_pairs(tmp_path / "a", "safety", "valid")[0] == []
    # HF snapshot layout: data/<subset>/train.jsonl[.gz], all subsets read
    for subset, n in (("one", 2), ("two", 3)):
        folder = tmp_path / "hf" / "data" / subset
        folder.mkdir(parents=True)
        with gzip.open(folder / "train.jsonl.gz", "wt") as f:
            f.write("\n".join(json.dumps(r) for r in pku_rows(n)))
    assert len(D.load_pairs(tmp_path / "hf", "safety")[0]) == 5


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"prompt": "p", "chosen": "a"\n', "train.jsonl:1: malformed JSON"),
        (
            '{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p"}\n',
            "train.jsonl:2: missing field 'chosen'",
        ),
        (
            '{"prompt": "p", "chosen": 3, "rejected": "b"}\n',
            "train.jsonl:1: field 'chosen' must be a string, got int",
        ),
        (
            '{"prompt": 7, "chosen": "a", "rejected": "b"}\n',
            "train.jsonl:1: field 'prompt' must be a string or a non-empty list",
        ),
        (
            '{"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}\n',
            "train.jsonl:1: message 'prompt'[0] has no 'content'",
        ),
        (
            '{"prompt": [{"role": "user", "content": "q"}, {"content": "x"}], '
            '"chosen": "a", "rejected": "b"}\n',
            "train.jsonl:1: message 'prompt'[1] has no 'role'",
        ),
        (
            '{"prompt": [{"role": "user", "content": 5}], "chosen": "a", '
            '"rejected": "b"}\n',
            "train.jsonl:1: message 'prompt'[0] field 'content' must be a string, "
            "got int",
        ),
        (
            '{"prompt": ["hi"], "chosen": "a", "rejected": "b"}\n',
            "train.jsonl:1: 'prompt'[0] must be a message",
        ),
        (
            '{"prompt": "p", "chosen": "a", "rejected": "b", '
            '"chosen_truncated": "yes"}\n',
            "train.jsonl:1: field 'chosen_truncated' must be true or false, got 'yes'",
        ),
        (
            '["not", "an", "object"]\n',
            "train.jsonl:1: expected a JSON object, got list",
        ),
        (
            '{"prompt": "p", "response_0": "a", "response_1": "b", '
            '"better_response_id": 2, "safer_response_id": 0}\n',
            "train.jsonl:1: field 'better_response_id' must be 0 or 1, got 2",
        ),
        (
            '{"prompt": "p", "chosen": "same", "rejected": "same"}\n',
            "no usable preference pairs (0 pairs from 1 rows (skipped: 1 equal responses))",
        ),
    ],
)
def test_bad_input_names_file_line_and_field(tmp_path, content, message):
    (tmp_path / "train.jsonl").write_text(content)
    with pytest.raises(D.DataError) as err:
        D.load_pairs(tmp_path, "reward")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_sources(tmp_path):
    with pytest.raises(D.DataError, match="no train split found"):
        D.load_pairs(tmp_path)
    (tmp_path / "reward").mkdir()
    with pytest.raises(D.DataError, match="no safety/ folder"):
        D.load_pairs(tmp_path, "safety")
    with pytest.raises(D.DataError, match="no such file or folder"):
        D.load_pairs(tmp_path / "nope")
    pku = write_jsonl(tmp_path / "pku.jsonl", pku_rows(2))
    with pytest.raises(D.DataError, match="say which stage"):
        D.load_pairs(pku, None)


def one_line_error(source, *args) -> str:
    with pytest.raises(D.DataError) as err:
        D.load_pairs(source, *args)
    message = str(err.value)
    assert "\n" not in message
    return message


GOOD_ROW = '{"prompt": "p", "chosen": "a", "rejected": "b"}\n'


@pytest.mark.parametrize("name", ["train.jsonl", "train.json"])
def test_non_utf8_data_names_file_and_line(tmp_path, name):
    path = tmp_path / name
    body = GOOD_ROW * 2 + '{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'
    if name.endswith(".json"):
        body = "[\n" + ",\n".join(body.splitlines()) + "\n]\n"
    path.write_bytes(body.encode("latin-1"))
    line = 3 if name.endswith(".jsonl") else 4
    assert f"{path}:{line}: not UTF-8 text" in one_line_error(path)


def test_utf8_with_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD_ROW.encode())
    assert len(D.load_pairs(path)[0]) == 1


@pytest.mark.parametrize("suffix", [".gz", ".xz"])
@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_damaged_compressed_data_names_the_file(tmp_path, suffix, damage):
    body = "".join(json.dumps(r) + "\n" for r in preference_rows(200)).encode()
    packed = gzip.compress(body) if suffix == ".gz" else lzma.compress(body)
    if damage == "truncated":
        packed = packed[: len(packed) // 2]
    else:
        packed = packed[:12] + bytes(b ^ 0x5A for b in packed[12:40]) + packed[40:]
    path = tmp_path / f"train.jsonl{suffix}"
    path.write_bytes(packed)
    message = one_line_error(path)
    assert message.startswith(f"{str(path)!r}: corrupt or truncated compressed file")


def test_not_compressed_at_all(tmp_path):
    path = tmp_path / "train.jsonl.gz"
    path.write_text(GOOD_ROW)
    assert "corrupt or truncated compressed file" in one_line_error(path)


@pytest.mark.parametrize(
    "name", ["data/typo.jsonl", "./x", "x", "org/name.jsonl", "~/nowhere/at/all"]
)
def test_missing_local_path_is_not_a_hub_fetch(tmp_path, monkeypatch, name):
    def no_hub(*args, **kwargs):
        raise AssertionError("asked the Hub")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("rsa_mlx.io.hf.snapshot", no_hub)
    monkeypatch.setattr("huggingface_hub.snapshot_download", no_hub)
    assert one_line_error(name) == f"no such file or folder {name!r}"


def test_hub_id_that_cannot_be_fetched_mentions_both(tmp_path, monkeypatch):
    def offline(repo_id, **kwargs):
        raise OSError("no network")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("huggingface_hub.snapshot_download", offline)
    message = one_line_error("org/name/data", "reward")
    assert "no such file or folder 'org/name/data'" in message
    assert "Hugging Face dataset 'org/name'" in message


def test_hub_dataset_id_offline_from_cache(tmp_path, monkeypatch):
    """An HF id resolves through huggingface-hub's cache when offline."""
    from huggingface_hub import snapshot_download  # noqa: F401

    snapshot = tmp_path / "snap"
    write_jsonl(snapshot / "data" / "x" / "train.jsonl", pku_rows(3))
    calls = []

    def fake_download(repo_id, local_files_only=False, **kwargs):
        calls.append((repo_id, local_files_only))
        if not local_files_only:
            raise OSError("no network")
        return str(snapshot)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_download)
    pairs, _ = D.load_pairs("org/name/data/x", "reward")
    assert len(pairs) == 3
    assert calls == [("org/name", False), ("org/name", True)]


# --------------------------------------------------------------- tokenising


@pytest.mark.parametrize("chat", [True, False])
def test_a_truncated_response_has_no_end_of_turn_token(
    chat, chat_tok, plain_tok, tmp_path
):
    tok = chat_tok if chat else plain_tok
    rows = [
        {"prompt": "Hi", "chosen": "Hello there. I can help", "rejected": "No.",
         "chosen_truncated": True},
        {"prompt": "Yo", "chosen": "Sure.", "rejected": "Never, because it",
         "rejected_truncated": True, "chosen_truncated": False},
        {"prompt": "Hey", "chosen": "Fine.", "rejected": "Go."},
    ]  # fmt: skip
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, _ = D.load_pairs(tmp_path)
    assert [(p.chosen_truncated, p.rejected_truncated) for p in pairs] == [
        (True, False), (False, True), (False, False),
    ]  # fmt: skip
    enc = D.encode_pairs(pairs, tok, max_length=512)
    eot = D.end_of_turn_id(tok)
    for i, row in enumerate(rows):
        for side in ("chosen", "rejected"):
            ids = tok.encode(row[side], add_special_tokens=False)
            cut = row.get(f"{side}_truncated", False)
            want = ids if cut else [*ids, eot]
            assert getattr(enc, side)[i].tolist() == want, (i, side)


def decode(tok, ids):
    return tok._tokenizer.decode(list(ids))


@pytest.mark.parametrize("chat", [True, False])
def test_mask_covers_exactly_response_and_end_of_turn(chat, chat_tok, plain_tok):
    tok = chat_tok if chat else plain_tok
    pairs = [
        D.Pair("What is 2+2?", "Four.", "Five, obviously.", "Be exact.", "x:1"),
        D.Pair("Hi", "Hello there", "Go away", None, "x:2"),
    ]
    enc = D.encode_pairs(pairs, tok, max_length=512)
    eot = "<|im_end|>" if chat else "<|endoftext|>"
    assert D.end_of_turn_id(tok) == tok._tokenizer.convert_tokens_to_ids(eot)
    batch = D.collate(enc, [0, 1])
    width = batch.tokens.shape[1]
    for row, (pair, side) in enumerate(
        [
            (pairs[0], "chosen"),
            (pairs[1], "chosen"),
            (pairs[0], "rejected"),
            (pairs[1], "rejected"),
        ]
    ):
        text = getattr(pair, side)
        mine = batch.mask & (batch.segments == row)
        masked = batch.targets[mine]
        assert decode(tok, masked) == text + eot
        assert mine.sum() == len(tok.encode(text, add_special_tokens=False)) + 1
        # each target is the token right after its hidden state's position
        flat = batch.index[mine]
        assert np.all(flat // width == row)
        pos = flat % width
        assert np.array_equal(batch.tokens[row][pos + 1], masked)
        prompt_part = decode(tok, batch.tokens[row][: pos[0] + 1])
        if chat:
            assert prompt_part.endswith("<|im_start|>assistant\n")
            assert prompt_part.count("<|im_start|>assistant") == 1
            assert (pair.system is None) == ("system" not in prompt_part)
        else:
            assert prompt_part.endswith(pair.prompt)
    # nothing is scored after the response: no generation prompt, no padding
    assert batch.mask.sum() == sum(len(r) for r in enc.chosen + enc.rejected)
    assert len(batch.mask) == D.bucket(int(batch.mask.sum()))  # packed, bucketed


def test_truncation_policy_and_counts(chat_tok):
    prompt, chosen, rejected = list(range(100, 160)), list(range(40)), list(range(30))
    p, c, r = D.truncate(prompt, chosen, rejected, 64)
    assert p == prompt[-32:]  # keeps its end: max(64 - 40, 64 // 2) tokens
    assert c == chosen[:32] and r == rejected[:32]  # keep their start
    p, c, r = D.truncate(prompt[:10], chosen, rejected, 64)
    assert (p, c, r) == (prompt[:10], chosen, rejected)
    # a prompt within half the window stays whole; the responses give way
    p, c, r = D.truncate(prompt[:30], chosen, rejected, 64)
    assert p == prompt[:30] and c == chosen[:34] and r == rejected

    pairs = [D.Pair("x" * 80, "a" * 50, "b" * 50, None, "x:1"), D.Pair("q", "a", "b")]
    enc = D.encode_pairs(pairs, chat_tok, max_length=64)
    assert enc.report["prompt truncated"] == 1
    assert enc.report["responses truncated"] == 1
    assert all(enc.length(i) <= 64 for i in range(len(enc)))
    same = [D.Pair("x" * 80, "a" * 50 + "1", "a" * 50 + "2", None, "x:1")]
    with pytest.raises(D.DataError, match="no pairs left"):
        D.encode_pairs(same, chat_tok, max_length=64)


def test_chat_prompt_needs_template(plain_tok):
    pair = D.Pair(({"role": "user", "content": "hi"},), "a", "b", None, "f:3")
    with pytest.raises(D.DataError, match="f:3: chat-message prompts need"):
        D.encode_pairs([pair], plain_tok, 64)


def test_chat_template_failure_names_the_row(chat_tok):
    class Strict:
        has_chat_template = True

        def apply_chat_template(self, messages, **kwargs):
            from jinja2.exceptions import TemplateError

            raise TemplateError("Conversation roles must alternate user/assistant")

    pair = D.Pair(({"role": "assistant", "content": "hi"},), "a", "b", None, "f:7")
    with pytest.raises(D.DataError) as err:
        D.encode_prompt(Strict(), pair)
    assert str(err.value) == (
        "f:7: the tokenizer's chat template rejects this prompt "
        "(Conversation roles must alternate user/assistant)"
    )


# ----------------------------------------------------------------- batching


def test_bucket_sizes_are_few_and_tight():
    sizes = {D.bucket(n) for n in range(1, 2049)}
    assert len(sizes) <= 4 * 8 + 1
    for n in range(1, 2049):
        assert n <= D.bucket(n) <= max(n + 15, 1.25 * n)


def batch_pairs(batch):
    """The (prompt, chosen, rejected) token sequences in a batch, exactly."""
    width, out = batch.tokens.shape[1], []

    def row(s):
        mine = batch.mask & (batch.segments == s)
        start = batch.index[mine][0] % width + 1  # first response position
        return batch.tokens[s, :start], batch.targets[mine]

    for i in range(batch.pairs):
        (prompt, chosen), (prompt2, rejected) = row(i), row(i + batch.pairs)
        assert np.array_equal(prompt, prompt2)
        out.append((prompt.tobytes(), chosen.tobytes(), rejected.tobytes()))
    return out


def test_sampler_covers_every_pair_once_per_epoch_and_resumes(chat_tok):
    pairs = [
        D.Pair(f"q{i}" * (i % 5 + 1), "yes" * (i % 3 + 1), "no") for i in range(23)
    ]
    enc = D.encode_pairs(pairs, chat_tok, 256)
    sampler = D.BatchSampler(enc, batch_size=4, seed=3)
    assert len(sampler) == 6  # 5 full batches and one of 3
    stream = iter(sampler)
    seen = [next(stream) for _ in range(len(sampler))]
    got = sorted(pair for b in seen for pair in batch_pairs(b))
    expected = sorted(
        (p.tobytes(), c.tobytes(), r.tobytes())
        for p, c, r in zip(enc.prompts, enc.chosen, enc.rejected)
    )
    assert len(set(expected)) == 23  # the pairs are told apart exactly
    assert got == expected and sum(b.pairs for b in seen) == 23
    assert sampler.state == D.SamplerState(0, 6)
    # a new sampler restored to the same state yields the same next batches
    nxt = [next(stream).tokens for _ in range(3)]
    other = D.BatchSampler(enc, batch_size=4, seed=3)
    other.state = D.SamplerState(1, 0)
    again = iter(other)
    assert all(np.array_equal(a, next(again).tokens) for a in nxt)
    # epochs are shuffled differently, but deterministically from the seed
    assert list(sampler._order(0)) != list(sampler._order(1))
    assert list(sampler._order(1)) == list(D.BatchSampler(enc, 4, seed=3)._order(1))


def test_batch_rows_are_chosen_then_rejected(chat_tok):
    pairs = [D.Pair("q", "good", "bad"), D.Pair("r", "fine", "poor")]
    batch = D.collate(D.encode_pairs(pairs, chat_tok, 64), [0, 1])
    texts = [
        decode(chat_tok, batch.targets[batch.mask & (batch.segments == i)])
        for i in range(4)
    ]
    assert texts == [
        "good<|im_end|>",
        "fine<|im_end|>",
        "bad<|im_end|>",
        "poor<|im_end|>",
    ]
    assert batch.tokens.shape[1] == D.bucket(batch.tokens.shape[1])
