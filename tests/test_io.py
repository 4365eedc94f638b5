"""Atomic writes: the file appears whole or not at all, with ordinary permissions."""

from __future__ import annotations

import os

import pytest

from relreg.io import atomic_write


def test_atomic_write_has_umask_permissions_and_creates_the_folder(tmp_path):
    old = os.umask(0o022)
    try:
        out = atomic_write(tmp_path / "sub" / "a.txt", lambda tmp: open(tmp, "w").write("x"))
    finally:
        os.umask(old)
    assert out.read_text() == "x"
    assert out.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in out.parent.iterdir()) == ["a.txt"]


def test_an_error_while_writing_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")

    def fail(tmp: str) -> None:
        open(tmp, "w").write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_a_full_disk_names_the_path_and_keeps_the_previous_file(tmp_path):
    import errno

    out = tmp_path / "report.json"
    out.write_text("old")

    def fill_the_disk(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    message = r"No space left on device while writing .*report.json.* more than 100 bytes"
    with pytest.raises(OSError, match=message) as info:
        atomic_write(out, fill_the_disk)
    assert info.value.errno == errno.ENOSPC and "the previous file is intact" in str(info.value)
    assert out.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
