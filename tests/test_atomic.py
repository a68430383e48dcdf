"""interop._atomic: a reader never sees a half-written file, and files get ordinary permissions."""

import os
import stat

import pytest

from interop._atomic import atomic_open, atomic_write_text


def test_failed_write_leaves_the_old_file_and_no_temp_files(tmp_path):
    target = tmp_path / "a.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_open(target) as f:
            f.write("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_written_files_follow_the_umask_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "b.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o644
