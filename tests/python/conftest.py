"""Fixtures shared by the Python client tests: a running `observer sim`.

The binary comes from $OBSERVER_BIN (default: target/debug/observer in the repository). The
simulator binds 127.0.0.1:0 and announces the real address on its first stdout line.
"""

import os
import signal
import subprocess
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
READY_PREFIX = "observer sim listening on "

# Tiny delays keep every test fast; four tokens per reply.
FAST_FLAGS = ["--load-ms", "5", "--first-token-ms", "5", "--token-ms", "1", "--tokens", "4", "--seed", "1"]


def observer_bin() -> str:
    path = Path(os.environ.get("OBSERVER_BIN", REPO / "target" / "debug" / "observer"))
    if not path.is_absolute():
        path = REPO / path
    if not path.exists():
        pytest.fail(f"{path} does not exist: build it with `cargo build -p observer` or set OBSERVER_BIN")
    return str(path)


class Sim:
    """One `observer sim` process; `host` is its base URL."""

    def __init__(self, *flags: str):
        # Requests sent at once run at once unless a test sets the slots (Ollama's default is 1).
        parallel = () if "--num-parallel" in flags else ("--num-parallel", "64")
        self.process = subprocess.Popen(
            [observer_bin(), "sim", "--listen", "127.0.0.1:0", *flags, *parallel],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self._ready_line(timeout=10)
        if not line.startswith(READY_PREFIX):
            self.stop()
            pytest.fail(f"observer sim did not start: {line!r} {self.process.stderr.read()!r}")
        self.addr = line[len(READY_PREFIX):].strip()
        self.host = f"http://{self.addr}"

    def _ready_line(self, timeout: float) -> str:
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(self.process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        return result[0] if result else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def sim():
    """A simulator with tiny delays, stopped after the test."""
    running = Sim(*FAST_FLAGS)
    yield running
    running.stop()
    assert running.process.returncode == 0, running.process.stderr.read()
