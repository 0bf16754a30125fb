"""MLX -> GGUF (rsa-mlx export --gguf): the aligned model out to llama.cpp.

Tiny llama, mistral and qwen2 models are converted, aligned (both stages,
merge ratio 0.5) and exported; the file is read back with the gguf package,
converted back with our importer (every tensor the float16 of the fused
weights, or within Q8_0's bound) and its logits compared with the MLX
model's. llama.cpp itself runs it where llama-cpp-python is installed.
"""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from rsa_mlx.cli import main
from rsa_mlx.export.gguf import export_gguf
from rsa_mlx.io.gguf import gguf_to_hf
from rsa_mlx.io.gguf_layout import llama3_factors
from rsa_mlx.tuner.model import load
from rsa_mlx.util.errors import InputError
from tests.gguf_tiny import load_all, write_hf
from tests.hf_tiny import read_safetensors, torch_or_skip
from tests.tiny import pku_rows, write_jsonl

TEXT = "The capital of France is Paris. 1234 Grüße 🙂\n<|im_start|>user"


def cli(*args, code: int = 0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, result.output + repr(result.exception)
    return result


def mlx_logits(ids, model=None, adapter_path=None, merge=None) -> np.ndarray:
    net, _ = load(
        None if model is None else str(model),
        adapter_path=None if adapter_path is None else str(adapter_path),
        merge=merge,
    )
    return np.array(net(mx.array([ids])).astype(mx.float32))


def rel_gap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2"])
def aligned(request, tmp_path_factory):
    """(root, run): an MLX model and a two-stage run on it (q = 0.5)."""
    torch_or_skip()
    root = tmp_path_factory.mktemp(request.param)
    write_hf(root / "hf", request.param, tied=request.param != "mistral")
    cli("convert", "--hf-path", root / "hf", "--mlx-path", root / "mlx")
    write_jsonl(root / "pku" / "train.jsonl", pku_rows(8))
    run = root / "run"
    cli(
        "align", "--model", root / "mlx", "--data", root / "pku", "--iters", 3,
        "--batch-size", 4, "--num-layers", -1, "--learning-rate", 3e-2,
        "--lora-rank", 4, "--merge", 0.5, "--adapter-path", run,
        "--steps-per-eval", 0, "--save-every", 0,
    )  # fmt: skip
    cli("export", "--adapter-path", run, "--save-path", root / "fused")
    return root, run


def same_logits_as_rounded(root, run, back, weights, tmp_path, kind) -> list[int]:
    """The re-imported model gives the logits of the aligned MLX model with
    its weights rounded to the file's type (the config, names, q/k order and
    tokenizer add nothing else); returns the token ids used."""
    from mlx_lm import load as mlx_load
    from safetensors.numpy import save_file

    rounded = tmp_path / "rounded"
    shutil.copytree(root / "fused", rounded)
    save_file(weights, str(rounded / "model.safetensors"), metadata={"format": "pt"})
    model, tokenizer = mlx_load(str(back))
    ids = tokenizer.encode(TEXT)
    reference, ref_tokenizer = mlx_load(str(rounded))
    assert ref_tokenizer.encode(TEXT) == ids
    mine = np.array(model(mx.array([ids])).astype(mx.float32))
    want = np.array(reference(mx.array([ids])).astype(mx.float32))
    assert rel_gap(mine, want) < 1e-5
    gap = rel_gap(mine, mlx_logits(ids, adapter_path=run))
    print(f"\n{root.name} {kind} export: logits vs the unrounded MLX model {gap:.1e}")
    return ids


def test_f16_export_reads_back_and_reimports_exactly(aligned, tmp_path):
    import gguf

    root, run = aligned
    path = tmp_path / "aligned.gguf"
    cli("export", "--adapter-path", run, "--gguf", path)
    reader = gguf.GGUFReader(str(path))  # llama.cpp's own reader
    arch = reader.fields["general.architecture"].contents()
    assert arch == ("qwen2" if "qwen2" in root.name else "llama")
    spec = json.loads((root / "mlx" / "tokenizer.json").read_text())
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert tokens[: len(spec["model"]["vocab"])] == sorted(
        spec["model"]["vocab"], key=spec["model"]["vocab"].get
    )
    assert reader.fields["tokenizer.ggml.pre"].contents() in ("smollm", "qwen2")
    assert "<|im_start|>" in reader.fields["tokenizer.chat_template"].contents()
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["token_embd.weight"] == "F16" and kinds["output_norm.weight"] == "F32"

    back = gguf_to_hf(path, tmp_path / "back")
    fused, got = read_safetensors(root / "fused"), load_all(back)
    assert sorted(fused) == sorted(got)
    for name, value in fused.items():
        want = value if value.ndim == 1 else value.astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(got[name], want, err_msg=name)

    ids = same_logits_as_rounded(root, run, back, got, tmp_path, "f16")
    assert (
        rel_gap(mlx_logits(ids, adapter_path=run), mlx_logits(ids, root / "mlx")) > 1e-2
    )


def test_q8_0_export_within_its_bound(aligned, tmp_path):
    root, run = aligned
    path = tmp_path / "q8.gguf"
    export_gguf(path, adapter_path=run, gguf_type="q8_0")
    back = gguf_to_hf(path, tmp_path / "back")
    fused, got = read_safetensors(root / "fused"), load_all(back)
    for name, value in fused.items():
        if value.ndim == 1:
            np.testing.assert_array_equal(got[name], value, err_msg=name)
            continue
        blocks = value.reshape(-1, 32)  # d = max|x| / 127, stored as float16
        d = np.abs(blocks).max(1, keepdims=True) / 127
        err = np.abs(got[name].reshape(-1, 32) - blocks)
        assert np.all(err <= d * (0.5 + 127 * 2**-11) + 1e-12), name
    same_logits_as_rounded(root, run, back, got, tmp_path, "q8_0")


def test_merge_ratio_is_exported(aligned, tmp_path):
    root, run = aligned
    export_gguf(tmp_path / "q0.gguf", adapter_path=run, merge=0.0)
    back = gguf_to_hf(tmp_path / "q0.gguf", tmp_path / "back")
    net, tokenizer = load(str(back))
    ids = tokenizer.encode(TEXT)
    mine = np.array(net(mx.array([ids])))
    stage1 = mlx_logits(ids, root / "mlx", adapter_path=run / "reward")
    gap = rel_gap(mine, stage1)
    assert gap < 1e-2  # float16's rounding only, as above
    assert rel_gap(mine, mlx_logits(ids, adapter_path=run)) > 3 * gap  # not q = 0.5


# --- bad input ------------------------------------------------------------------


def one_line_error(*args) -> str:
    result = cli(*args, code=2)
    assert result.output.startswith("error: ") and result.output.count("\n") == 1
    return result.output


def test_outputs_are_checked_before_the_work(aligned, tmp_path):
    root, run = aligned
    (tmp_path / "taken.gguf").write_text("mine")
    out = one_line_error(
        "export", "--adapter-path", run, "--gguf", tmp_path / "taken.gguf"
    )
    assert "already exists" in out and (tmp_path / "taken.gguf").read_text() == "mine"
    (tmp_path / "link.gguf").symlink_to(tmp_path / "nowhere")
    # a missing model too: the output is refused first
    out = one_line_error(
        "export", "--model", tmp_path / "none", "--gguf", tmp_path / "link.gguf"
    )
    assert "already exists" in out and not (tmp_path / "nowhere").exists()
    usage = cli(
        "export", "--adapter-path", run, "--peft", "--gguf", tmp_path / "x", code=2
    )
    assert "--peft writes a folder" in usage.output
    both = cli("export", "--model", root / "mlx", code=2)
    assert "give one of --save-path and --gguf" in both.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.gguf", "taken.gguf"]


def test_unsupported_architecture_and_tokenizer(aligned, tmp_path):
    root, _ = aligned
    other = tmp_path / "phi3"
    shutil.copytree(root / "mlx", other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "phi3"}))
    out = one_line_error("export", "--model", other, "--gguf", tmp_path / "p.gguf")
    assert "cannot export model_type 'phi3' to GGUF" in out
    config.pop("rms_norm_eps")
    (other / "config.json").write_text(json.dumps(config))
    out = one_line_error("export", "--model", other, "--gguf", tmp_path / "p.gguf")
    assert "no rms_norm_eps (GGUF's metadata needs them)" in out
    nomerge = tmp_path / "nomerge"
    shutil.copytree(root / "mlx", nomerge)
    spec = json.loads((nomerge / "tokenizer.json").read_text())
    spec["model"]["merges"] = []
    (nomerge / "tokenizer.json").write_text(json.dumps(spec))
    out = one_line_error("export", "--model", nomerge, "--gguf", tmp_path / "n.gguf")
    assert "a BPE without merges" in out
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    (nomerge / "tokenizer.json").write_text(json.dumps(spec))
    out = one_line_error("export", "--model", nomerge, "--gguf", tmp_path / "n.gguf")
    assert "pre-tokenizer is none that llama.cpp names" in out
    with pytest.raises(InputError, match="--gguf-type 'q4_k'"):
        export_gguf(tmp_path / "k.gguf", model=root / "mlx", gguf_type="q4_k")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*"))


# --- sentencepiece vocabularies and RoPE scaling out ----------------------------


def test_sentencepiece_vocabulary_round_trip(tmp_path):
    """GGUF (sentencepiece) -> MLX -> GGUF: the same tokens, types and merge
    order, so llama.cpp tokenises as before; scores from merge ranks."""
    import gguf
    import sentencepiece

    from tests.gguf_tiny import sentencepiece_meta, train_sentencepiece
    from tests.test_gguf_spm import TEXTS, convert, llama_cpp_ids

    model = train_sentencepiece()
    sp = sentencepiece.SentencePieceProcessor(model_proto=model)
    meta = sentencepiece_meta(model, **{"tokenizer.chat_template": "{{ x }}"})
    hf = convert(tmp_path, meta, sp.get_piece_size(), "hf")
    cli("convert", "--hf-path", hf, "--mlx-path", tmp_path / "mlx")
    export_gguf(tmp_path / "out.gguf", model=tmp_path / "mlx")
    fields = gguf.GGUFReader(str(tmp_path / "out.gguf")).fields
    out = {k: fields[k].contents() for k in fields if k.startswith("tokenizer.")}
    assert out["tokenizer.ggml.model"] == "llama"
    assert out["tokenizer.ggml.tokens"] == meta["tokenizer.ggml.tokens"]
    assert (
        out["tokenizer.ggml.token_type"] == meta["tokenizer.ggml.token_type"].tolist()
    )
    assert out["tokenizer.ggml.add_space_prefix"] is True
    assert out["tokenizer.ggml.add_bos_token"] is True
    assert out["tokenizer.chat_template"] == "{{ x }}"
    scores = np.array(out["tokenizer.ggml.scores"], np.float32)
    for text in TEXTS:  # llama.cpp's algorithm, on the new scores
        want = [1, *sp.encode(text)]
        assert llama_cpp_ids(text, {**meta, "tokenizer.ggml.scores": scores}) == want
    # what the gguf package's LlamaHfVocab would give: -1000 for every token
    flat = {**meta, "tokenizer.ggml.scores": np.full(len(scores), -1000.0)}
    text = "Wow, help for now."
    assert llama_cpp_ids(text, flat) != [1, *sp.encode(text)]  # fo|r, not f|or


def test_llama3_rope_scaling_is_written_as_rope_freqs(tmp_path):
    import gguf

    rope = {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
    }  # fmt: skip
    write_hf(
        tmp_path / "hf", "llama", tied=True, rope_scaling=dict(rope), rope_theta=1e6
    )
    cli("convert", "--hf-path", tmp_path / "hf", "--mlx-path", tmp_path / "mlx")
    export_gguf(tmp_path / "r.gguf", model=tmp_path / "mlx")
    tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "r.gguf")).tensors}
    want = llama3_factors(rope, 1e6, 16)
    np.testing.assert_array_equal(np.array(tensors["rope_freqs.weight"].data), want)
    back = gguf_to_hf(tmp_path / "r.gguf", tmp_path / "back")
    config = json.loads((back / "config.json").read_text())
    assert config["rope_scaling"] == rope, config["rope_scaling"]
    assert config["rope_theta"] == 1e6


# --- llama.cpp itself, where llama-cpp-python is installed ------------------


@pytest.mark.slow
def test_llama_cpp_runs_the_export_like_mlx(aligned, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    root, run = aligned
    path = tmp_path / "a.gguf"
    export_gguf(path, adapter_path=run)
    llm = llama_cpp.Llama(str(path), n_ctx=128, logits_all=True, verbose=False)
    back = gguf_to_hf(path, tmp_path / "back")
    net, tokenizer = load(str(back))
    text = "The capital of France is Paris. 1234 Grüße 🙂"
    ids = tokenizer.encode(text)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)], np.float32)
    mine = np.array(net(mx.array([ids]))[0].astype(mx.float32))
    gap = rel_gap(theirs, mine)
    print(f"\n{root.name}: llama.cpp vs MLX logits of the f16 export {gap:.1e}")
    assert gap < 1e-2
