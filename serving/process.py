"""A ``mixllm serve`` child process and waiting for its ``/ready``: shared by ``mixllm demo`` and
``make bench-serve`` and the real-process tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from mixllm.errors import MixLLMError


class ServerError(MixLLMError):
    """The server exited, failed to load, or was not ready in time (the message says which)."""


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path | None, lines: int = 30) -> str:
    if path is None:
        return "see its output above"
    try:
        return f"its log {path} ends:\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"no log at {path}"


@contextmanager
def running_server(args: list[str], log_path: Path | None = None) -> Iterator[subprocess.Popen]:
    """``python -m mixllm serve ARGS`` as a child, its output in ``log_path`` (or this terminal);
    interrupted (SIGINT, a clean uvicorn shutdown), then killed, when the block ends."""
    command = [sys.executable, "-m", "mixllm", "serve", *args]
    log_file = open(log_path, "w") if log_path is not None else None  # noqa: SIM115 - closed below
    try:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT if log_file else None,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            yield process
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
    finally:
        if log_file is not None:
            log_file.close()


def wait_ready(base_url: str, process: subprocess.Popen, timeout_s: float, log_path: Path | None = None,
               on_state: Callable[[str], None] | None = None) -> dict:
    """Poll ``/ready`` until it answers 200 (its JSON); ServerError if the server exits, fails to
    load or is not ready within ``timeout_s``. ``on_state`` hears each new loading state."""
    import httpx

    deadline, last = time.monotonic() + timeout_s, None
    with httpx.Client(base_url=base_url, timeout=5.0, trust_env=False) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ServerError(f"the server exited (code {process.returncode}) before it was ready; {_tail(log_path)}")
            try:
                response = client.get("/ready")
                error = response.json().get("error", {}) if response.status_code != 200 else {}
            except httpx.TransportError:
                response, error = None, {"message": "starting"}
            except ValueError:  # not JSON: something else answers on that port (ours will exit: port in use)
                error = {"message": f"HTTP {response.status_code} from something that is not mixllm"}
            if response is not None and response.status_code == 200:
                return response.json()
            state = error.get("message", "")
            if error.get("type") == "load_failed":
                raise ServerError(f"the server could not start: {state}")
            if on_state is not None and state != last:
                on_state(state)
            last = state
            time.sleep(0.5)
    raise ServerError(f"the server was not ready after {timeout_s:.0f} s; {_tail(log_path)}")
