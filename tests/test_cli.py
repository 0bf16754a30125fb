"""The rsa-mlx command line."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from rsa_mlx.cli import evaluate as cli_evaluate
from rsa_mlx.cli import main
from rsa_mlx.io import hf
from rsa_mlx.util.errors import InputError
from tests.tiny import write_model


def test_info_runs():
    result = CliRunner().invoke(main, ["info", "--no-bench"])
    assert result.exit_code == 0, result.output
    assert "mlx" in result.output and "openblas" in result.output


def test_info_as_subprocess_measures_matmul():
    out = subprocess.run(
        [sys.executable, "-m", "rsa_mlx.cli", "info"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "GFLOP/s" in out.stdout


def test_help_and_version():
    runner = CliRunner()
    assert runner.invoke(main, ["--help"]).exit_code == 0
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0 and "rsa-mlx" in result.output


# ---------------------------------------------------------------- bad input


def fails(result) -> str:
    """The command failed as bad input: exit 2 and one ``error:`` line."""
    assert result.exit_code == 2, result.output + repr(result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("cli") / "model")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--merge", "2"], "--merge is a ratio q in [0, 1], not 2"),
        (["--temp", "-1"], "temperature must be 0 or more"),
        (["-m", "0"], "--max-tokens must be at least 1"),
        (["-n", "0"], "-n/--num-samples must be at least 1, not 0"),
        (["--top-p", "1.5"], "--top-p must be in [0, 1]"),
    ],
)
def test_generate_rejects_bad_settings(tiny, args, message):
    result = CliRunner().invoke(
        main, ["generate", "--model", str(tiny), "-p", "hi", *args]
    )
    assert message in fails(result)


def test_export_rejects_a_bad_merge_ratio(tiny, tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "export",
            "--model",
            str(tiny),
            "--merge",
            "-1",
            "--save-path",
            str(tmp_path / "o"),
        ],
    )
    assert "--merge is a ratio q in [0, 1]" in fails(result)
    assert not (tmp_path / "o").exists()


def test_generate_says_it_reads_stdin_on_a_terminal(tiny, monkeypatch):
    args = ["generate", "--model", str(tiny), "-m", "2"]
    monkeypatch.setattr(cli_evaluate, "stdin_is_terminal", lambda: True)
    result = CliRunner().invoke(main, args, input="hello")
    assert result.exit_code == 0, result.output
    hint = result.stderr.strip().splitlines()
    assert len(hint) == 1 and "reading the prompt from stdin" in hint[0]
    monkeypatch.setattr(cli_evaluate, "stdin_is_terminal", lambda: False)
    assert CliRunner().invoke(main, args, input="hello").stderr == ""


def test_missing_local_models_are_not_reported_as_hub_failures(tmp_path, monkeypatch):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("asked the Hub for a local path")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for name in ("./x", "x", "runs/x", "a/b/c", str(tmp_path / "x")):
        line = fails(
            CliRunner().invoke(main, ["generate", "--model", name, "-p", "hi"])
        )
        assert line == f"error: no such folder {name!r}", line
    with pytest.raises(InputError, match=r"no such folder '\./x'"):
        hf.snapshot("./x")

    def offline(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    line = fails(
        CliRunner().invoke(main, ["generate", "--model", "org/name", "-p", "hi"])
    )
    assert "no such folder 'org/name', and no Hugging Face model 'org/name'" in line


def test_model_folder_messages_quote_paths(tmp_path):
    folder = tmp_path / "my model"
    folder.mkdir()
    line = fails(
        CliRunner().invoke(main, ["generate", "--model", str(folder), "-p", "hi"])
    )
    assert f"'{folder / 'config.json'}': missing" in line
    line = fails(
        CliRunner().invoke(
            main,
            [
                "generate",
                "--model",
                str(folder),
                "--adapter-path",
                str(folder),
                "-p",
                "hi",
            ],
        )
    )
    assert f"'{folder}': neither a run folder" in line


# ------------------------------------------- issue 22: faults and bad input


def test_info_columns_and_the_fast_exp(monkeypatch):
    result = CliRunner().invoke(main, ["info", "--no-bench"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for line in lines:
        if line.startswith("  ") and not line.startswith("   "):
            _, _, value = line.strip().partition(" ")
            assert value.strip(), line  # "architecturex86_64" has no gap
    assert any(line.startswith("fast exp    on") for line in lines), result.output
    from rsa_mlx.ops import fastmath

    monkeypatch.setenv("RSA_MLX_FAST_EXP", "0")
    fastmath.enabled.cache_clear()
    try:
        result = CliRunner().invoke(main, ["info", "--no-bench"])
    finally:
        monkeypatch.undo()
        fastmath.enabled.cache_clear()
    assert "fast exp    off (RSA_MLX_FAST_EXP=0" in result.output


def test_a_dangling_symlink_output_is_refused_before_converting(
    tiny, tmp_path, monkeypatch
):
    from rsa_mlx.io import convert as io_convert

    def converting(*args, **kwargs):
        raise AssertionError("converted before checking the output")

    monkeypatch.setattr(io_convert, "mlx_convert", converting)
    out = tmp_path / "out"
    out.symlink_to(tmp_path / "nowhere")
    for args in (
        ["convert", "--hf-path", str(tiny), "--mlx-path", str(out)],
        ["export", "--model", str(tiny), "--save-path", str(out)],
    ):
        line = fails(CliRunner().invoke(main, args))
        assert "already exists as a link to" in line and "does not exist" in line
    assert out.is_symlink() and not (tmp_path / "nowhere").exists()


def test_a_custom_model_file_is_one_line(tiny, tmp_path):
    import json
    import shutil

    folder = tmp_path / "custom"
    shutil.copytree(tiny, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_file": "m.py"}))
    (folder / "m.py").write_text("raise SystemExit('ran the model code')\n")
    line = fails(CliRunner().invoke(main, ["generate", "--model", str(folder)]))
    assert "model_file 'm.py' asks to run the model's own Python code" in line
    line = fails(
        CliRunner().invoke(
            main,
            ["convert", "--hf-path", str(folder), "--mlx-path", str(tmp_path / "o")],
        )
    )
    assert "--trust-remote-code" in line and not (tmp_path / "o").exists()


def test_evaluate_refuses_a_prompt_longer_than_the_context(tiny, tmp_path):
    import json
    import shutil

    folder = tmp_path / "short"
    shutil.copytree(tiny, folder)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 64
    (folder / "config.json").write_text(json.dumps(config))
    prompts = tmp_path / "p.jsonl"
    rows = [{"prompt": "hi", "harmful": False}, {"prompt": "x" * 500, "harmful": True}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["evaluate", "--model", str(folder), "--prompts", str(prompts),
            "--scorer", "refusal", "-k", "1", "--max-tokens", "4"]  # fmt: skip
    line = fails(CliRunner().invoke(main, args))
    assert "p.jsonl:2" in line and "more than the model's context of 64" in line
    # the short prompt alone fits, but not with a long answer
    prompts.write_text(json.dumps(rows[0]) + "\n")
    assert CliRunner().invoke(main, args).exit_code == 0
    args[-1] = "80"
    assert "--max-tokens" in fails(CliRunner().invoke(main, args))
