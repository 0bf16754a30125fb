"""The rsa-mlx command line."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from rsa_mlx.cli import main


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
