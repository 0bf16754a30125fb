"""The optional fast BLAS on Linux (rsa_mlx.util.blas)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rsa_mlx.util import blas

LINUX = sys.platform.startswith("linux")
PROBE = (
    "import json, os, rsa_mlx; from rsa_mlx.util import blas; "
    "s = blas.STATUS; print(json.dumps({'loaded': s.loaded, 'reason': s.reason, "
    "'coretype': os.environ.get('OPENBLAS_CORETYPE'), "
    "'mapped': blas.loaded_blas_libraries()}))"
)


def probe(env_update: dict[str, str | None], prelude: str = "") -> dict:
    env = dict(os.environ)
    for key, value in env_update.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    out = subprocess.run(
        [sys.executable, "-c", prelude + PROBE],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


EXPECTED = os.environ.get("RSA_MLX_EXPECT_FAST_BLAS") == "1"  # set by .ci/run


def test_status_explains_itself():
    status = blas.STATUS
    assert status.attempted  # conftest imports rsa_mlx first
    assert status.reason not in ("", "not attempted")
    assert status.loaded == (status.reason == "loaded before mlx"), status
    assert status.loaded == (status.path is not None), status


@pytest.mark.skipif(not LINUX, reason="the fast-BLAS preload is Linux only")
def test_this_process_has_the_fast_blas_mapped():
    """Fails where the fast BLAS is expected (CI installed it) but MLX here
    does not have it; skips, saying why, where it is neither expected nor
    loaded."""
    mapped = blas.loaded_blas_libraries()
    if not EXPECTED and not blas.STATUS.loaded:
        pytest.skip(
            f"fast BLAS not expected (RSA_MLX_EXPECT_FAST_BLAS is not 1) and not "
            f"loaded: {blas.STATUS.reason}"
        )
    assert blas.STATUS.loaded, blas.STATUS.reason
    assert any("openblas" in os.path.basename(p) for p in mapped), mapped


@pytest.mark.skipif(not LINUX, reason="the fast-BLAS preload is Linux only")
def test_fast_path_active_when_library_installed():
    if blas._find_library() is None:
        if EXPECTED:
            pytest.fail("CI installed OpenBLAS but rsa_mlx cannot find it")
        pytest.skip("no OpenBLAS on this machine")
    status = probe({"RSA_MLX_OPENBLAS": None})
    assert status["loaded"], status["reason"]
    assert any("openblas" in path for path in status["mapped"]), status["mapped"]
    # In this process too (conftest imports rsa_mlx before mlx): MLX's matmul
    # must run far above the ~7 GFLOP/s of the bundled reference BLAS.
    assert blas.STATUS.loaded
    gflops = blas.measure_gflops(512, repeats=3)
    assert gflops > 30, f"{gflops:.1f} GFLOP/s: is MLX still on the reference BLAS?"


@pytest.mark.skipif(not LINUX, reason="the fast-BLAS preload is Linux only")
def test_switch_turns_it_off():
    if blas._find_library() is None:
        pytest.skip("no OpenBLAS on this machine: nothing to turn off")
    status = probe({"RSA_MLX_OPENBLAS": "0"})
    assert not status["loaded"]
    assert "disabled" in status["reason"]
    assert not any("openblas" in path for path in status["mapped"])


@pytest.mark.skipif(not LINUX, reason="the fast-BLAS preload is Linux only")
def test_user_openblas_variables_are_never_changed():
    if blas._find_library() is None:
        pytest.skip("no OpenBLAS on this machine")
    status = probe({"RSA_MLX_OPENBLAS": None, "OPENBLAS_CORETYPE": "Haswell"})
    assert status["loaded"]
    assert status["coretype"] == "Haswell"
    assert (
        probe({"RSA_MLX_OPENBLAS": None, "OPENBLAS_CORETYPE": None})["coretype"] is None
    )


@pytest.mark.skipif(not LINUX, reason="the fast-BLAS preload is Linux only")
def test_too_late_after_mlx_import_is_reported():
    if blas._find_library() is None:
        pytest.skip("no OpenBLAS on this machine: nothing to load too late")
    status = probe({"RSA_MLX_OPENBLAS": None}, prelude="import mlx.core; ")
    assert not status["loaded"]
    assert "imported before" in status["reason"]


@pytest.mark.skipif(not LINUX, reason="the fast-BLAS preload is Linux only")
def test_explicit_missing_path_is_not_loaded():
    status = probe({"RSA_MLX_OPENBLAS": "/nonexistent/libopenblas.so"})
    assert not status["loaded"]
    assert "no OpenBLAS" in status["reason"]
