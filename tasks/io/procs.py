"""Local background processes (the embedded stack's servers, the local chat service): detached, with a pid file and
a log file in the state folder ($ECB_STATE_DIR, default <repo>/.ecb), so they outlive the command that started them."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tasks import env

REPO = Path(__file__).resolve().parents[2]


def state_dir() -> Path:
    return Path(env.get("ECB_STATE_DIR") or REPO / ".ecb").resolve()


@dataclass
class Proc:
    """A detached background process with a pid file and a log file in the state folder."""

    name: str

    @property
    def pidfile(self) -> Path:
        return state_dir() / "run" / f"{self.name}.pid"

    @property
    def log(self) -> Path:
        return state_dir() / "logs" / f"{self.name}.log"

    def pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return None if _reaped(pid) else pid

    def start(self, argv: list[str], env: dict, cwd: Path | None = None) -> int:
        if pid := self.pid():
            return pid
        self.pidfile.parent.mkdir(parents=True, exist_ok=True)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {self.name}\n".encode())
            p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                 cwd=cwd or REPO, start_new_session=True)
        self.pidfile.write_text(str(p.pid))
        return p.pid

    def stop(self, timeout: float = 30) -> bool:
        pid = self.pid()
        if not pid:
            self.pidfile.unlink(missing_ok=True)
            return False
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.pid():
            time.sleep(0.3)
        if self.pid():
            os.killpg(pid, signal.SIGKILL)
        self.pidfile.unlink(missing_ok=True)
        return True


def _reaped(pid: int) -> bool:
    """True for a child of this process that has exited (a zombie until waited for: kill(pid, 0) still succeeds on
    it, and a stop would wait its whole time-out for a process that is gone). Reaps it."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not our child: its own parent reaps it
        return False
    return done == pid


def stop_all(procs, timeout: float = 30) -> list[str]:
    """Stop several processes at once: SIGTERM to all, then one shared wait (each of Airflow's processes takes
    seconds to shut down gracefully; one after the other they add up). Returns the names of those that ran."""
    from concurrent.futures import ThreadPoolExecutor

    procs = list(procs)
    with ThreadPoolExecutor(max(len(procs), 1)) as pool:
        stopped = list(pool.map(lambda p: p.stop(timeout), procs))
    return [p.name for p, ran in zip(procs, stopped, strict=True) if ran]
