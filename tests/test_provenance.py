"""mixllm.provenance: git revision, machine description, atomic writes."""

from __future__ import annotations

import re
import subprocess

import numpy as np
import pytest

from mixllm import provenance
from mixllm.provenance import atomic_write, atomic_write_bytes, atomic_write_text, git_revision, machine_info


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "report.json"  # the parent is created
    assert atomic_write_text(path, "new") == path
    assert path.read_text() == "new"
    atomic_write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.json"]


def test_a_failing_writer_leaves_the_old_file_intact_and_no_temporary(tmp_path):
    path = tmp_path / "scores.pt"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_write(path) as tmp:
            assert tmp.parent == path.parent and tmp != path
            tmp.write_text("half a fi")
            raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["scores.pt"]
    with pytest.raises(KeyboardInterrupt):  # an interrupt before the writer created the file
        with atomic_write(tmp_path / "never.txt"):
            raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["scores.pt"]


def test_the_temporary_keeps_the_suffix_so_numpy_writes_exactly_there(tmp_path):
    path = tmp_path / "lists.npz"
    with atomic_write(path) as tmp:
        assert tmp.suffix == ".npz"
        np.savez_compressed(tmp, a=np.arange(3))  # savez appends ".npz" to a name without it
    with np.load(path) as stored:
        assert stored["a"].tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["lists.npz"]


def test_git_revision_is_a_short_hash_with_dirty_flag_or_none():
    revision = git_revision()
    inside_git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=provenance.__file__.rsplit("/", 1)[0],
                                capture_output=True, text=True).returncode == 0  # fmt: skip
    if not inside_git:
        assert revision is None
        return
    assert re.fullmatch(r"[0-9a-f]{4,40}(\+dirty)?", revision), revision


def test_git_revision_never_raises(monkeypatch):
    def missing(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", missing)
    assert git_revision() is None

    def hangs(*args, **kwargs):
        raise subprocess.TimeoutExpired("git", 5)

    monkeypatch.setattr(subprocess, "run", hangs)
    assert git_revision() is None


@pytest.mark.parametrize("status, expected", [("", "abc1234"), (" M mixllm/ranking.py\n", "abc1234+dirty")])
def test_git_revision_marks_uncommitted_changes(monkeypatch, status, expected):
    seen = []

    def fake(args, **kwargs):
        seen.append(kwargs["cwd"])
        out = "abc1234\n" if args[1] == "rev-parse" else status
        return subprocess.CompletedProcess(args, 0, out, "")

    monkeypatch.setattr(subprocess, "run", fake)
    assert git_revision() == expected
    assert all(cwd.name == "mixllm" for cwd in seen)  # the code's checkout, not the working directory's


def test_git_revision_outside_a_checkout_is_none(monkeypatch):
    def not_a_repo(args, **kwargs):
        return subprocess.CompletedProcess(args, 128, "", "fatal: not a git repository")

    monkeypatch.setattr(subprocess, "run", not_a_repo)
    assert git_revision() is None


def test_machine_info_keys():
    info = machine_info()
    assert set(info) == {"cpu", "cpu_count", "torch_threads", "gpu", "platform", "python", "torch"}
    assert isinstance(info["cpu"], str) and info["cpu"]
    assert info["cpu_count"] >= 1 and info["torch_threads"] >= 1
    assert info["gpu"] is None or isinstance(info["gpu"], str)
