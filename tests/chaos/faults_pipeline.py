"""Helpers for the pipeline fault tests (tests/chaos/test_faults_*.py): background step processes that are killed
from their own log lines, a prepared snapshot, and a secret scanner other chaos tests can reuse.

    hits = scan_for(["hf_CANARY..."], [log_dir, card_path])   # [] when no file holds any of the values
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tasks.demo import datagen
from tasks.io import s3
from tests.conftest import REPO, step_manifest


def make_snapshot(run_id: str, rows: int = 240, seed: int = 21) -> dict:
    """Generated demo conversations synced and prepared by the real steps; returns prepare_chatml's manifest."""
    source = f"s3://ecb-landing/chaos-{run_id}/"
    s3.put_bytes(source + "demo.csv", datagen.to_csv_bytes(datagen.generate_rows(rows, seed=seed)))
    sync = step_manifest("sync_raw_data", run_id, "--set", f"data.source={source}")
    return step_manifest("prepare_chatml", run_id, "--set", f"data.source={source}",
                         "--input", f"raw_manifest={sync['manifest_uri']}")


@dataclass
class StepProcess:
    """``python -m tasks <step>`` in the background; its stderr is read line by line as it comes, and
    ``kill_when(pattern)`` delivers SIGKILL from the reader thread the moment a matching line is logged."""

    step: str
    run_id: str
    args: list[str]
    env: dict | None = None
    lines: list[str] = field(default_factory=list)
    killed_on: str | None = None

    def __post_init__(self):
        self._pattern: str | None = None
        self._matched = threading.Event()
        self.proc = subprocess.Popen([sys.executable, "-m", "tasks", self.step, "--run-id", self.run_id, *self.args],
                                     cwd=REPO, env=self.env or dict(os.environ), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            if self._pattern and self._pattern in line and not self._matched.is_set():
                self.proc.send_signal(signal.SIGKILL)
                self.killed_on = line.strip()
                self._matched.set()

    def kill_when(self, pattern: str, timeout: float = 300) -> str:
        """SIGKILL the step as soon as it logs a line containing ``pattern``; returns that line."""
        self._pattern = pattern
        if any(pattern in line for line in list(self.lines)) and not self._matched.is_set():
            self.proc.send_signal(signal.SIGKILL)
            self.killed_on = next(line.strip() for line in self.lines if pattern in line)
            self._matched.set()
        deadline = time.monotonic() + timeout
        while not self._matched.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"{self.step} never logged {pattern!r} (exit {self.proc.poll()}):\n"
                                     + "".join(self.lines[-40:]))
        self.proc.wait(30)
        self._reader.join(10)
        assert self.proc.returncode == -signal.SIGKILL, self.proc.returncode
        return self.killed_on

    def wait(self, timeout: float = 600) -> subprocess.CompletedProcess:
        out = self.proc.stdout.read()
        self.proc.wait(timeout)
        self._reader.join(10)
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, "".join(self.lines))

    @property
    def stderr(self) -> str:
        return "".join(self.lines)


def kill_group(proc) -> int:
    """SIGKILL a stack service (a tasks.devstack.stack.Proc) and everything in its process group; returns the pid."""
    pid = proc.pid()
    assert pid, f"{proc.name} is not running"
    os.killpg(pid, signal.SIGKILL)
    try:  # a child of this test process when the session started it: reap it, a zombie still answers kill(pid, 0)
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
    wait_until(lambda: proc.pid() is None, f"{proc.name} to die", 20, every=0.1)
    return pid


def wait_until(check: Callable[[], object], what: str, timeout: float, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


# --- secrets canary ---------------------------------------------------------------------------------------------


def encodings(secret: str) -> dict[str, bytes]:
    """The forms a leaked secret could take in a file: as is, URL-encoded, base64 (as in a Basic auth header or
    an NDJSON commit payload) and as UTF-16 (a Windows-made file)."""
    raw = secret.encode()
    forms = {"plain": raw, "url": urllib.parse.quote(secret, safe="").encode(),
             "utf16": secret.encode("utf-16-le")}
    for shift in range(3):  # base64 of the secret at any byte offset inside a longer encoded string
        b64 = base64.b64encode(b"\0" * shift + raw)[4 if shift else 0:]
        forms[f"base64+{shift}"] = b64[:len(b64) - 4]  # the tail depends on what follows the secret
    return {k: v for k, v in forms.items() if len(v) >= 8}


def iter_files(paths: Iterable[Path | str]) -> Iterable[Path]:
    for p in map(Path, paths):
        if p.is_dir():
            yield from (f for f in sorted(p.rglob("*")) if f.is_file())
        elif p.is_file():
            yield p


def scan_for(canaries: Iterable[str], paths: Iterable[Path | str]) -> list[tuple[str, str, str]]:
    """Every (file, canary, encoding) where a canary value occurs in one of the files under ``paths``
    (folders are walked recursively). Chaos tests for other components (e.g. the chat service's logs) call this
    with their own paths; an empty list means the secrets were found nowhere."""
    needles = [(c, name, form) for c in canaries for name, form in encodings(c).items()]
    hits = []
    for f in iter_files(paths):
        data = f.read_bytes()
        hits += [(str(f), c, name) for c, name, form in needles if form in data]
    return hits


def scan_texts(canaries: Iterable[str], texts: dict[str, str | bytes]) -> list[tuple[str, str, str]]:
    """scan_for for values that are not files (API responses, database rows, object bodies): name -> content."""
    needles = [(c, name, form) for c in canaries for name, form in encodings(c).items()]
    hits = []
    for where, text in texts.items():
        data = text.encode() if isinstance(text, str) else text
        hits += [(where, c, name) for c, name, form in needles if form in data]
    return hits
