"""HF <-> MLX: convert, align, export; checked by loading in transformers + torch.

Tiny random llama and qwen2 models written with ``save_pretrained`` go
through the whole user path (``rsa-mlx convert`` -> ``rsa-mlx align`` ->
``rsa-mlx export``), and PyTorch's logits of the exported folder (and of the
PEFT adapter on the original model) are compared with MLX's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from rsa_mlx.cli import main
from rsa_mlx.io import hf
from rsa_mlx.tuner.model import load
from tests.hang import HANG_S
from tests.hf_tiny import (
    ARCHS,
    peft_or_skip,
    read_safetensors,
    torch_logits,
    torch_or_skip,
    write_hf_model,
    write_sentencepiece_model,
)
from tests.tiny import pku_rows, write_jsonl

TOKENS = np.array(
    [[5, 17, 33, 90, 101, 200, 12, 7, 64, 250], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
)


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def mlx_logits(model=None, adapter_path=None, merge=None) -> np.ndarray:
    net, _ = load(
        None if model is None else str(model),
        adapter_path=None if adapter_path is None else str(adapter_path),
        merge=merge,
    )
    return np.array(net(mx.array(TOKENS)).astype(mx.float32))


def rel_gap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / (1.0 + np.abs(b).max()))


@pytest.fixture(scope="module", params=ARCHS)
def converted(request, tmp_path_factory):
    """(root, arch): an HF folder and its float32 MLX conversion."""
    torch_or_skip()
    root = tmp_path_factory.mktemp(request.param)
    write_hf_model(root / "hf", request.param)
    cli("convert", "--hf-path", root / "hf", "--mlx-path", root / "mlx")
    return root, request.param


def test_hf_to_mlx_to_hf_reproduces_every_tensor_exactly(converted, tmp_path):
    root, _ = converted
    cli("export", "--model", root / "mlx", "--save-path", tmp_path / "back")
    original, back = read_safetensors(root / "hf"), read_safetensors(tmp_path / "back")
    assert set(original) == set(back)
    for key, value in original.items():
        assert back[key].dtype == value.dtype, key
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "back" / "model.safetensors"), "np") as f:
        assert f.metadata() == {"format": "pt"}
    # the model itself agrees in all three: torch original, MLX, torch export
    reference = torch_logits(root / "hf", TOKENS)
    assert rel_gap(mlx_logits(root / "mlx"), reference) < 1e-5
    np.testing.assert_array_equal(torch_logits(tmp_path / "back", TOKENS), reference)
    assert (tmp_path / "back" / "tokenizer.json").exists()


@pytest.fixture(scope="module")
def aligned(converted):
    """Both stages trained (a few big steps, so the adapters matter), q = 0.5."""
    root, _ = converted
    write_jsonl(root / "pku" / "train.jsonl", pku_rows(8))
    run = root / "run"
    cli(
        "align", "--model", root / "mlx", "--data", root / "pku", "--iters", 3,
        "--batch-size", 4, "--num-layers", -1, "--learning-rate", 3e-2,
        "--lora-rank", 4, "--merge", 0.5, "--adapter-path", run,
        "--steps-per-eval", 0, "--save-every", 0,
    )  # fmt: skip
    return root, run


def test_exported_model_gives_the_aligned_logits_in_transformers(aligned, tmp_path):
    root, run = aligned
    cli("export", "--adapter-path", run, "--save-path", tmp_path / "out")
    mine = mlx_logits(adapter_path=run)
    base = mlx_logits(root / "mlx")
    assert rel_gap(mine, base) > 1e-2  # the adapters change the model ...
    theirs = torch_logits(tmp_path / "out", TOKENS)
    assert rel_gap(theirs, mine) < 1e-5  # ... and the export carries them
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    card = (tmp_path / "out" / "README.md").read_text()
    assert "variant2" in card and "cvar (mu = 0.95)" in card
    assert "merge ratio q | 0.5" in card


def test_merge_ratio_is_exported(aligned, tmp_path):
    root, run = aligned
    cli("export", "--adapter-path", run, "--merge", 0, "--save-path", tmp_path / "q0")
    stage1 = mlx_logits(root / "mlx", adapter_path=run / "reward")
    assert rel_gap(torch_logits(tmp_path / "q0", TOKENS), stage1) < 1e-5
    assert rel_gap(mlx_logits(adapter_path=run), stage1) > 1e-3  # stage 2 matters


def test_peft_adapter_on_the_original_hf_model_gives_the_same_logits(aligned, tmp_path):
    peft_or_skip()
    root, run = aligned
    cli("export", "--adapter-path", run, "--peft", "--save-path", tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"]
    mine = mlx_logits(adapter_path=run)
    theirs = torch_logits(root / "hf", TOKENS, adapter=tmp_path / "peft")
    assert rel_gap(theirs, mine) < 1e-5
    assert rel_gap(torch_logits(root / "hf", TOKENS), mine) > 1e-2


def test_quantized_model_trains_and_exports_dequantized(tmp_path):
    torch_or_skip()
    write_hf_model(tmp_path / "hf", "llama")
    cli(
        "convert", "--hf-path", tmp_path / "hf", "--mlx-path", tmp_path / "q",
        "-q", "--q-bits", 4, "--q-group-size", 32,
    )  # fmt: skip
    assert "quantization" in json.loads((tmp_path / "q" / "config.json").read_text())
    write_jsonl(tmp_path / "pku" / "train.jsonl", pku_rows(4))
    cli(
        "align", "--model", tmp_path / "q", "--data", tmp_path / "pku",
        "--iters", 1, "--batch-size", 4, "--num-layers", -1,
        "--learning-rate", 3e-2, "--adapter-path", tmp_path / "run",
        "--steps-per-eval", 0, "--save-every", 0,
    )  # fmt: skip
    cli("export", "--adapter-path", tmp_path / "run", "--save-path", tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert not {"quantization", "quantization_config"} & set(config)
    weights = read_safetensors(tmp_path / "out")
    assert all(v.dtype == np.float32 for v in weights.values())
    assert not any(k.endswith((".scales", ".biases")) for k in weights)
    mine = mlx_logits(adapter_path=tmp_path / "run")
    assert rel_gap(torch_logits(tmp_path / "out", TOKENS), mine) < 1e-4


def test_sentencepiece_only_tokenizer_converts_and_loads(tmp_path):
    import sentencepiece as spm

    write_sentencepiece_model(tmp_path / "hf")
    cli("convert", "--hf-path", tmp_path / "hf", "--mlx-path", tmp_path / "mlx")
    assert (tmp_path / "mlx" / "tokenizer.model").exists()
    _, tokenizer = load(str(tmp_path / "mlx"))
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "hf" / "tokenizer.model"))
    text = "hello world, the quick fox"
    ids = [i for i in tokenizer.encode(text) if i != sp.bos_id()]
    assert ids == sp.encode(text)
    assert tokenizer.decode(ids) == text


def test_config_fixes_restore_transformers5_rope_keys():
    assert hf.config_fixes({"rope_theta": 5.0}) == {}
    nested = {"rope_parameters": {"rope_theta": 1e4, "rope_type": "default"}}
    assert hf.config_fixes(nested) == {"rope_theta": 1e4}
    scaled = {
        "rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8}
    }
    assert hf.config_fixes(scaled) == {
        "rope_theta": 5e5,
        "rope_scaling": {"rope_type": "llama3", "factor": 8},
    }


def rsa_mlx_command(*args, stdin=None):
    """``rsa-mlx ARGS`` as a user runs it: the installed console script."""
    script = Path(sys.executable).parent / "rsa-mlx"
    command = (
        [str(script)] if script.exists() else [sys.executable, "-m", "rsa_mlx.cli"]
    )
    return subprocess.run(
        [*command, *map(str, args)],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=HANG_S,
    )


@pytest.mark.slow
@pytest.mark.parametrize("converted", ["llama"], indirect=True)
def test_every_command_as_a_subprocess(aligned, tmp_path):
    root, run = aligned
    steps = [
        ["convert", "--hf-path", root / "hf", "--mlx-path", tmp_path / "mlx"],
        [
            "align", "--model", tmp_path / "mlx", "--data", root / "pku",
            "--stages", "reward", "--iters", 1, "--adapter-path", tmp_path / "run",
        ],
        [
            "evaluate", "--adapter-path", run, "--prompts",
            write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi", "harmful_request": False}]),
            "-k", 2, "--max-tokens", 3, "--output", tmp_path / "e.json",
        ],
        ["compare", tmp_path / "e.json"],
        ["export", "--adapter-path", tmp_path / "run", "--save-path", tmp_path / "hf"],
        ["generate", "--adapter-path", run, "--merge", 0.5, "-p", "hi", "-m", 4],
        ["info", "--no-bench"],
        ["completion", "bash"],
    ]  # fmt: skip
    for args in steps:
        out = rsa_mlx_command(*args)
        assert out.returncode == 0, (args, out.stdout, out.stderr)
    assert (tmp_path / "hf" / "model.safetensors").exists()
    assert "_RSA_MLX_COMPLETE" in out.stdout  # the completion script
    bad = rsa_mlx_command(
        "convert", "--hf-path", tmp_path / "no", "--mlx-path", tmp_path / "x"
    )
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert bad.stderr.startswith("error: ") and "no such" in bad.stderr


@pytest.mark.parametrize("converted", ["llama"], indirect=True)
def test_generate_reads_stdin_and_is_seeded(aligned):
    _, run = aligned
    args = ["generate", "--adapter-path", run, "-m", 6, "--temp", 1.0, "-n", 2]
    first = CliRunner().invoke(main, [str(a) for a in args], input="hello")
    again = CliRunner().invoke(main, [str(a) for a in args], input="hello")
    assert first.exit_code == 0, first.output
    assert first.output == again.output and first.output.count("--- sample") == 2


def test_shell_completion_completes_commands_and_flags():
    env = {
        "_RSA_MLX_COMPLETE": "bash_complete",
        "COMP_WORDS": "rsa-mlx ex",
        "COMP_CWORD": "1",
    }
    result = CliRunner().invoke(main, [], env=env, prog_name="rsa-mlx")
    assert "export" in result.output
    env = {**env, "COMP_WORDS": "rsa-mlx export --sa", "COMP_CWORD": "2"}
    assert (
        "--save-path"
        in CliRunner().invoke(main, [], env=env, prog_name="rsa-mlx").output
    )


# ---------------------------------------------------------------- bad input


def fails(*args) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 2, result.output + repr(result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_missing_folders(tmp_path):
    assert "no such" in fails(
        "convert", "--hf-path", tmp_path / "nope", "--mlx-path", tmp_path / "o"
    )
    assert "no such" in fails(
        "export", "--model", tmp_path / "nope", "--save-path", tmp_path / "o"
    )
    assert "no such" in fails(
        "export", "--adapter-path", tmp_path / "nope", "--save-path", tmp_path / "o"
    )
    assert "no such" in fails("generate", "--model", tmp_path / "nope", "-p", "hi")
    assert not (tmp_path / "o").exists()


def test_unknown_and_rearranged_architectures_are_refused(converted, tmp_path):
    root, _ = converted
    for model_type, message in [
        ("foo", "not an architecture"),
        ("mixtral", "rearranges"),
    ]:
        folder = tmp_path / model_type
        folder.mkdir()
        for f in (root / "mlx").iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(
            json.dumps({**config, "model_type": model_type})
        )
        command = "convert" if model_type == "foo" else "export"
        flag = "--hf-path" if command == "convert" else "--model"
        dest = "--mlx-path" if command == "convert" else "--save-path"
        line = fails(command, flag, folder, dest, tmp_path / "out")
        assert message in line and repr(model_type) in line
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_corrupt_safetensors(converted, tmp_path):
    root, _ = converted
    folder = tmp_path / "bad"
    folder.mkdir()
    for f in (root / "hf").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    line = fails("convert", "--hf-path", folder, "--mlx-path", tmp_path / "out")
    assert "model.safetensors': corrupt safetensors file" in line
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_adapter_model_mismatch(aligned, tmp_path):
    _, run = aligned
    other = tmp_path / "other"
    write_hf_model(other / "hf", "llama", hidden=32)
    cli("convert", "--hf-path", other / "hf", "--mlx-path", other / "mlx")
    for args in (["export", "--save-path", tmp_path / "out"], ["generate", "-p", "hi"]):
        line = fails(*args, "--model", other / "mlx", "--adapter-path", run)
        assert "adapter does not match the model" in line
    assert not (tmp_path / "out").exists()


def test_existing_output_is_never_overwritten(converted, tmp_path):
    root, _ = converted
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert "already exists" in fails(
        "convert", "--hf-path", root / "hf", "--mlx-path", tmp_path / "out"
    )
    assert "already exists" in fails(
        "export", "--model", root / "mlx", "--save-path", tmp_path / "out"
    )
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_peft_needs_an_adapter(converted, tmp_path):
    root, _ = converted
    assert "--adapter-path" in fails(
        "export", "--model", root / "mlx", "--peft", "--save-path", tmp_path / "o"
    )
