"""Putting a model version in front of users: the local chat service (gunicorn, detached) started or hot-reloaded,
then waiting until it serves the version and sending one smoke-test chat. Container modes roll out through
tasks/release/rollout.py and share the waiting and the smoke test."""

from __future__ import annotations

import json
import logging
import sys
import time
import urllib.request

from tasks import env
from tasks.errors import StepError
from tasks.io.procs import Proc, state_dir
from tasks.release.registry import serving_uri

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


def start_or_reload_local(cfg) -> str:
    """Start gunicorn when nothing serves on the port, otherwise ask the service to reload; returns its URL.

    The service gets this run's resolved config (a file in the state folder), so per-run overrides such as the
    registered model name reach it; a running service is told the model to load in the reload request."""
    import yaml

    port = cfg.chat.port
    url = f"http://{cfg.chat.host}:{port}"
    token = admin_token()
    if served_model(url) is not None:
        status, body = _http("POST", f"{url}/admin/reload", {"model_uri": serving_uri(cfg)},
                             {"Authorization": f"Bearer {token}"})
        log.info("chat service at %s is running version %s: reload requested (HTTP %d)", url,
                 body.get("serving_version"), status)
        return url
    argv = gunicorn_argv(cfg.chat.host, port, cfg.chat.threads)
    config_file = state_dir() / "chat" / "config.yaml"
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    # The config file alone (not the step's layered ECB_CONFIG): the service runs exactly this run's settings.
    pid = CHAT.start(argv, env.child({"ECB_CHAT_ADMIN_TOKEN": token, "ECB_CONFIG": str(config_file)}))
    log.info("started the chat service (gunicorn pid %d) on %s; log: %s", pid, url, CHAT.log)
    return url


def wait_for_version(url: str, version: str, timeout_s: float, alive=None) -> dict:
    """Poll /api/model until it serves ``version``; raise with the last state seen otherwise."""
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        last = served_model(url)
        if last and last.get("version") == version:
            return last
        if last and last.get("reload", {}).get("state") == "failed":
            raise StepError(f"the chat service at {url} could not load version {version}: {last['reload']['error']}")
        if alive is not None and not alive():
            raise StepError(f"the chat service process exited before serving version {version}; see its log")
        time.sleep(1)
    seen = f"it serves {last.get('version')!r} (reload: {last.get('reload')})" if last else "it never answered"
    raise StepError(f"the chat service at {url} did not serve version {version} within {timeout_s:.0f}s: {seen}")


def smoke_test(url: str) -> dict:
    _, conv = _http("POST", f"{url}/api/conversations", {})
    status, reply = _http("POST", f"{url}/api/conversations/{conv['conversation_id']}/messages",
                          {"content": SMOKE_QUESTION, "stream": False},
                          {"X-Client-Token": conv["client_token"]}, timeout=120)
    msg = reply["message"]
    if status != 200 or msg["completion_tokens"] < 1:
        raise StepError(f"smoke-test chat failed: HTTP {status}, {msg.get('completion_tokens')} tokens")
    return msg
