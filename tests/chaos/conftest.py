"""Fixtures that stop and restart the real servers of the test stack (never a patched function).

    def test_x(seaweedfs, postgres):
        seaweedfs.kill(); ...; seaweedfs.start()     # SIGKILL the SeaweedFS process group; restart on the same ports
        postgres.restart(down_s=5)                   # pg_ctl stop -m fast, wait, pg_ctl start (same data dir)
        step = BackgroundStep("sync_raw_data", run_id, args)
        step.on_line("copied ", lambda: seaweedfs.outage(10))   # fault injected the moment the step logs that line
        result = step.wait()
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest

from tasks.devstack import stack
from tests.conftest import REPO, SETTINGS


def _alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (a killed child we have not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


class SeaweedFS:
    """The stack's SeaweedFS (master, volume, filer and S3 in one `weed server` process group)."""

    def __init__(self):
        self.kills = 0
        self.outage_s: list[float] = []

    @property
    def port(self) -> int:
        return SETTINGS["s3_port"]

    def kill(self) -> None:
        """SIGKILL, not SIGTERM: SeaweedFS takes ~20 s to exit gracefully, a crash is what we want to survive."""
        pid = stack.WEED.pid()
        assert pid, "SeaweedFS is not running"
        os.killpg(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _alive(pid):
            try:
                os.waitpid(pid, os.WNOHANG)  # our child when this session started it: reap it
            except ChildProcessError:
                pass
            assert time.monotonic() < deadline, f"SeaweedFS pid {pid} survived SIGKILL"
            time.sleep(0.1)
        stack.WEED.pidfile.unlink(missing_ok=True)
        while _listening(self.port):  # (a bind test would fail on the killed connections' TIME_WAIT)
            assert time.monotonic() < deadline, f"S3 port {self.port} still answers after the kill"
            time.sleep(0.1)
        self.kills += 1

    def start(self) -> None:
        """Start it again with the same settings: same ports, same data folder."""
        stack.s3_up(SETTINGS)

    def outage(self, seconds: float) -> float:
        """Kill, stay down ``seconds``, restart; returns how long S3 was unreachable in all."""
        t0 = time.monotonic()
        self.kill()
        time.sleep(seconds)
        self.start()
        took = time.monotonic() - t0
        self.outage_s.append(took)
        return took


class Postgres:
    """The stack's embedded PostgreSQL (pgserver binaries, data folder in the state dir)."""

    def __init__(self):
        self.restarts = 0

    def stop(self) -> None:
        assert stack.postgres_down(), "PostgreSQL was not running"

    def start(self) -> None:
        stack.postgres_up(SETTINGS)

    def restart(self, down_s: float = 5) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()
        self.restarts += 1


@pytest.fixture
def seaweedfs(services):
    sw = SeaweedFS()
    yield sw
    if not stack.WEED.pid():  # never leave the stack without S3 for the tests that follow
        sw.start()


@pytest.fixture
def postgres(services):
    if SETTINGS.get("external_pg"):
        pytest.skip("PostgreSQL is external (ECB_POSTGRES_URL): the test cannot restart it")
    pg = Postgres()
    yield pg
    stack.postgres_up(SETTINGS)


class BackgroundStep:
    """``python -m tasks <step>`` running in the background with the stack's environment; stderr is read as it comes,
    and ``on_line(text, action)`` runs ``action`` in a thread the first time a line containing ``text`` is logged."""

    def __init__(self, step: str, run_id: str, *args: str, env: dict | None = None):
        self.step = step
        self.lines: list[str] = []
        self._hooks: list[tuple[str, Callable[[], object]]] = []
        self._threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []
        self.fired: dict[str, float] = {}
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "tasks", step, "--run-id", run_id, *args], cwd=REPO,
                                     env=env or dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, bufsize=1)
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def on_line(self, text: str, action: Callable[[], object]) -> BackgroundStep:
        with self._lock:
            self._hooks.append((text, action))
            seen = any(text in line for line in self.lines)
        if seen:
            self._fire(text, action)
        return self

    def _fire(self, text: str, action: Callable[[], object]) -> None:
        def run():
            try:
                action()
            except BaseException as exc:  # noqa: BLE001 - reported by wait()
                self.errors.append(exc)

        with self._lock:
            if text in self.fired:
                return
            self.fired[text] = time.monotonic() - self.t0
        t = threading.Thread(target=run, daemon=True)
        t.start()
        self._threads.append(t)

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self._lock:
                self.lines.append(line)
                due = [(t, a) for t, a in self._hooks if t in line and t not in self.fired]
            for text, action in due:
                self._fire(text, action)

    def wait(self, timeout: float = 300) -> subprocess.CompletedProcess:
        out = self.proc.stdout.read()
        self.proc.wait(timeout)
        self._reader.join(10)
        for t in self._threads:
            t.join(timeout)
        if self.errors:
            raise self.errors[0]
        missing = [t for t, _ in self._hooks if t not in self.fired]
        assert not missing, f"{self.step} never logged {missing}:\n{self.stderr[-3000:]}"
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, self.stderr)

    @property
    def stderr(self) -> str:
        return "".join(self.lines)


@pytest.fixture
def background_step():
    started: list[BackgroundStep] = []

    def start(step: str, run_id: str, *args: str, env: dict | None = None) -> BackgroundStep:
        started.append(BackgroundStep(step, run_id, *args, env=env))
        return started[-1]

    yield start
    for s in started:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait(10)
