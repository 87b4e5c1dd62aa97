"""Putting a model version in front of users: the local chat service (gunicorn, detached) started or hot-reloaded,
then waiting until it serves the version and sending one smoke-test chat. Container modes roll out through
tasks/release/rollout.py and share the waiting and the smoke test.

The service serves what the registry's aliases say (champion, and candidate for a canary); a reload, like a restart,
reads them again, so nothing here tells the service a model: it moves the aliases, then asks it to look."""

from __future__ import annotations

import json
import logging
import sys
import time
import urllib.request

from tasks import env
from tasks.errors import StepError
from tasks.io.procs import Proc, state_dir

log = logging.getLogger("tasks.release.deploy")
CHAT = Proc("chat")  # the local chat service: started by deploy_chat_service, stopped with the stack
SMOKE_QUESTION = "Hello, can you help me track my order?"


def _http(method: str, url: str, body: dict | None = None, headers: dict | None = None, timeout: float = 10):
    data = json.dumps(body).encode() if body is not None else None
    if not url.startswith(("http://", "https://")):
        raise StepError(f"chat service URL {url!r} is not http(s)")
    req = urllib.request.Request(url, data=data, method=method,  # noqa: S310 - scheme checked above
                                 headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - scheme checked above
        return r.status, json.loads(r.read() or b"{}")


def served_model(url: str) -> dict | None:
    try:
        return _http("GET", f"{url}/api/model", timeout=5)[1]
    except (OSError, ValueError):
        return None


def admin_token() -> str:
    return env.require("ECB_CHAT_ADMIN_TOKEN", "the deploy step needs the chat service's admin token (the local "
                       "stack writes one to .ecb/stack.env; set it as an environment variable otherwise)")


def gunicorn_argv(host: str, port: int, threads: int) -> list[str]:
    """One worker process (one model per device), threads for the open streams. No worker timeout: a long reply
    is not a hung worker. A long keep-alive, so clients do not race the server closing an idle connection."""
    return [sys.executable, "-m", "gunicorn", "--worker-class", "gthread", "--workers", "1", "--threads", str(threads),
            "--bind", f"{host}:{port}", "--timeout", "0", "--graceful-timeout", "30", "--keep-alive", "75",
            "--access-logfile", "-", "tasks.chat:create_app()"]


def config_file():
    return state_dir() / "chat" / "config.yaml"


def start_or_reload_local(cfg) -> str:
    """Start gunicorn when nothing serves on the port, otherwise ask the service to reload; returns its URL.

    The service runs this run's resolved config (a file in the state folder, rewritten here every time), so per-run
    overrides such as the registered model name reach it; it reads that file again on reload, as a restart would."""
    import yaml

    port = cfg.chat.port
    url = f"http://{cfg.chat.host}:{port}"
    token = admin_token()
    path = config_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if served_model(url) is not None:
        request_reload(url, token, cfg.chat.deploy_timeout_s)
        return url
    argv = gunicorn_argv(cfg.chat.host, port, cfg.chat.threads)
    # The config file alone (not the step's layered ECB_CONFIG): the service runs exactly this run's settings.
    pid = CHAT.start(argv, env.child({"ECB_CHAT_ADMIN_TOKEN": token, "ECB_CONFIG": str(path)}))
    log.info("started the chat service (gunicorn pid %d) on %s; log: %s", pid, url, CHAT.log)
    return url


def request_reload(url: str, token: str, timeout_s: float) -> None:
    """POST /admin/reload until the service starts a reload of its own (one already running may have read the
    aliases before they moved, so it does not count)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status, body = _http("POST", f"{url}/admin/reload", {}, {"Authorization": f"Bearer {token}"})
        if body.get("started") or time.monotonic() > deadline:
            break
        time.sleep(1)
    log.info("chat service at %s serves version %s: reload %s (HTTP %d)", url, body.get("serving_version"),
             "requested" if body.get("started") else "still busy with an earlier one", status)


def redeploy(cfg, champion: str, candidate=None, restart: bool = False) -> tuple[str, dict]:
    """After the aliases moved: make the service read them and wait until it serves ``champion`` and ``candidate``
    (None: no canary; ANY: whatever it takes up). Returns (url, /api/model).

    Local: reload it, or start it. Kubernetes: a rolling restart (every replica must read the aliases). Docker: a
    restart when ``restart`` (the deploy step, which gets the Docker socket), else a reload over HTTP (the one compose
    container keeps serving while it swaps)."""
    from tasks.release import rollout

    mode, alive = cfg.execution.mode, None
    if mode == "local":
        url = start_or_reload_local(cfg)
        alive = lambda: CHAT.pid() is not None or served_model(url) is not None  # noqa: E731
    elif mode == "docker" and not restart:
        url = rollout.chat_url(cfg.execution, mode)
        request_reload(url, admin_token(), cfg.chat.deploy_timeout_s)
    else:
        url = rollout.roll_out(cfg, mode)
    return url, wait_for_version(url, champion, cfg.chat.deploy_timeout_s, alive, candidate=candidate)


def follow_aliases(cfg, champion: str, step: str) -> tuple[str, dict]:
    """After a step moved the aliases (canary verdict, rollback): reload the service until it serves ``champion``
    only. A failure says what the registry already says, so the person reading the task log knows a retry (or a
    restart, which reads the aliases) completes the move."""
    try:
        return redeploy(cfg, champion, None)
    except (StepError, OSError, ValueError) as exc:
        raise StepError(f"{step}: the aliases say champion {champion}, but the chat service did not follow (a retry "
                        f"reloads it again; a restart serves the aliases too): {exc}") from exc


ANY = object()  # wait_for_version: whatever candidate is served


def _candidate(info: dict) -> str | None:
    return (info.get("candidate") or {}).get("version")


def wait_for_version(url: str, version: str, timeout_s: float, alive=None, candidate=ANY) -> dict:
    """Poll /api/model until its champion is ``version`` (and its canary ``candidate``, None = no canary, when
    given); raise with the last state seen otherwise."""
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        last = served_model(url)
        if last and last.get("version") == version and (candidate is ANY or _candidate(last) == candidate):
            return last
        if last and last.get("reload", {}).get("state") == "failed":
            raise StepError(f"the chat service at {url} could not load version {version}: {last['reload']['error']}")
        if alive is not None and not alive():
            raise StepError(f"the chat service process exited before serving version {version}; see its log")
        time.sleep(1)
    seen = (f"it serves {last.get('version')!r} with canary {_candidate(last)!r} (reload: {last.get('reload')})"
            if last else "it never answered")
    want = f"version {version}" + ("" if candidate is ANY else f" with canary {candidate!r}")
    raise StepError(f"the chat service at {url} did not serve {want} within {timeout_s:.0f}s: {seen}")


def smoke_test(url: str, arm: str | None = None) -> dict:
    """One chat; ``arm`` ("candidate") pins it to that model through the admin API, else the public API chooses."""
    if arm:
        _, conv = _http("POST", f"{url}/admin/conversations", {"arm": arm},
                        {"Authorization": f"Bearer {admin_token()}"})
    else:
        _, conv = _http("POST", f"{url}/api/conversations", {})
    status, reply = _http("POST", f"{url}/api/conversations/{conv['conversation_id']}/messages",
                          {"content": SMOKE_QUESTION, "stream": False},
                          {"X-Client-Token": conv["client_token"]}, timeout=120)
    msg = reply["message"]
    # No text is a failure too: a model whose weights went bad (NaN) decodes special tokens only, so it has tokens
    # but says nothing.
    if status != 200 or msg["completion_tokens"] < 1 or not (msg.get("content") or "").strip():
        raise StepError(f"smoke-test chat failed: HTTP {status}, {msg.get('completion_tokens')} tokens, "
                        f"{len((msg.get('content') or '').strip())} characters of text")
    return msg
