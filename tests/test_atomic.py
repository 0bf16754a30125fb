"""Files written whole or not at all, with the user's normal file mode."""

from __future__ import annotations

import os
import stat

import mlx.core as mx
import pytest

from rsa_mlx.util import atomic


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_have_the_mode_open_would_give(tmp_path, umask):
    old = os.umask(umask)
    try:
        paths = [
            atomic.save_json(tmp_path / "a.json", {"x": 1}),
            atomic.save_text(tmp_path / "b.txt", "hi"),
            atomic.save_safetensors(tmp_path / "c.safetensors", {"w": mx.zeros(2)}),
        ]
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("reference")
    finally:
        os.umask(old)
    want = stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    assert want == 0o666 & ~umask
    for path in paths:
        assert stat.S_IMODE(path.stat().st_mode) == want, path


def test_a_failed_write_leaves_nothing(tmp_path):
    (tmp_path / "keep.json").write_text('{"old": true}')

    def broken(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic.write_atomic(tmp_path / "keep.json", broken)
    assert (tmp_path / "keep.json").read_text() == '{"old": true}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.json"]
