"""Where a result came from, and writing it safely: what every checkpoint, cache and report writer shares.

* :func:`git_revision`: the code's revision (``"8ece085"``, ``"8ece085+dirty"``), None outside git;
* :func:`machine_info`: the machine a number was measured on (CPU, cores, threads, GPU, versions);
* :func:`atomic_write`: write a file so that readers see the old content or the complete new one,
  never half a file (a temporary file in the same directory, ``os.replace``'d onto the target).
"""

from __future__ import annotations

import os
import platform
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

GIT_TIMEOUT_S = 5.0


def _git(*args: str) -> subprocess.CompletedProcess | None:
    """``git args`` run in this package's directory (so the revision is the code's, whatever the
    working directory); None if git is missing, hangs or cannot run."""
    try:
        return subprocess.run(
            ["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=GIT_TIMEOUT_S
        )
    except (OSError, subprocess.SubprocessError):
        return None


def git_revision() -> str | None:
    """The short commit hash of the code, with ``"+dirty"`` when the work tree has uncommitted
    changes; None outside a git checkout or without git. Never raises."""
    head = _git("rev-parse", "--short", "HEAD")
    if head is None or head.returncode != 0 or not head.stdout.strip():
        return None
    status = _git("status", "--porcelain")
    dirty = status is not None and status.returncode == 0 and bool(status.stdout.strip())
    return head.stdout.strip() + ("+dirty" if dirty else "")


def machine_info() -> dict:
    """The machine a measurement ran on: ``cpu`` (model name from /proc/cpuinfo, else the platform's
    processor), ``cpu_count``, ``torch_threads``, ``gpu`` (CUDA device 0's name, or None),
    ``platform``, ``python`` and ``torch`` (versions)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; on success it replaces ``path`` in one
    ``os.replace``, on an exception it is removed and ``path`` is left as it was.

    The temporary name keeps ``path``'s suffix (``.a.npz.<random>.tmp.npz``), so writers that add
    a missing suffix (``numpy.savez``) write exactly there. It is not created in advance: the
    writer creates it, with the usual permissions. The parent directory is created if needed.

    Example::

        with atomic_write(path) as tmp:
            torch.save(payload, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`); returns ``path``."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`); returns ``path``."""
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)
