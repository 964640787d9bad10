"""Atomic writes: all or nothing, no temporary files left, the umask's permissions."""

from __future__ import annotations

import os
import stat

import pytest

from harmonica._io import atomic_path, atomic_write, write_text


def test_write_text_follows_the_umask_and_leaves_no_temporary_file(tmp_path):
    previous = os.umask(0o022)
    try:
        write_text(tmp_path / "sub" / "report.md", "hello\n")
    finally:
        os.umask(previous)
    path = tmp_path / "sub" / "report.md"
    assert path.read_text() == "hello\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert os.listdir(path.parent) == ["report.md"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "model.bin"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["model.bin"]


def test_atomic_write_follows_the_umask_and_replaces_whole(tmp_path):
    from harmonica import Router

    previous = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.bin", lambda f: f.write(b"old"))
        atomic_write(tmp_path / "a.bin", lambda f: f.write(b"new"))
        Router(3, 4).save(tmp_path / "r.safetensors")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.bin").read_bytes() == b"new"
    for name in ("a.bin", "r.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "r.safetensors"]
    with pytest.raises(RuntimeError, match="interrupted"):
        atomic_write(tmp_path / "a.bin", _fail)
    assert (tmp_path / "a.bin").read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "r.safetensors"]


def _fail(file):
    file.write(b"half")
    raise RuntimeError("interrupted")
