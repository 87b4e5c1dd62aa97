"""Deploy the chat service with the newly registered champion: the DAG's final step.

    python -m tasks deploy_chat_service --run-id R --input registry_version=N

Local mode: start the service (gunicorn, detached, pid and log in the state folder) when it is not running, or ask
the running one to reload its champion (``POST /admin/reload``). Container modes: restart the compose service or
roll out the Kubernetes deployment (``tasks.rollout``). Then wait until ``/api/model`` serves the expected version,
send one smoke-test chat, and record the URL and version in the run's ``releases`` row. When the service does not
come up, the step fails with the reason and the row says ``deploy_failed``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import urllib.error
import urllib.request

from tasks.runner import StepContext, StepError

log = logging.getLogger("tasks.deploy_chat")
SMOKE_QUESTION = "Hello, can you help me track my order?"


def _http(method: str, url: str, body: dict | None = None, headers: dict | None = None, timeout: float = 10):
    data = json.dumps(body).encode() if body is not None else None
    if not url.startswith(("http://", "https://")):
        raise StepError(f"chat service URL {url!r} is not http(s)")
    req = urllib.request.Request(url, data=data, method=method,  # noqa: S310 - scheme checked above
                                 headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - scheme checked above
        return r.status, json.loads(r.read() or b"{}")


def _model(url: str) -> dict | None:
    try:
        return _http("GET", f"{url}/api/model", timeout=5)[1]
    except (OSError, ValueError):
        return None


def admin_token() -> str:
    token = os.environ.get("ECB_CHAT_ADMIN_TOKEN", "")
    if not token:
        raise StepError("ECB_CHAT_ADMIN_TOKEN is not set: the deploy step needs the chat service's admin token "
                        "(the local stack writes one to .ecb/stack.env; set it as an environment variable otherwise)")
    return token


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

    from tasks import stack
    from tasks.chat.models import default_uri

    port = int(os.environ.get("ECB_CHAT_PORT") or cfg.chat.port)
    url = f"http://{cfg.chat.host}:{port}"
    token = admin_token()
    if _model(url) is not None:
        status, body = _http("POST", f"{url}/admin/reload", {"model_uri": default_uri(cfg)},
                             {"Authorization": f"Bearer {token}"})
        log.info("chat service at %s is running version %s: reload requested (HTTP %d)", url,
                 body.get("serving_version"), status)
        return url
    argv = gunicorn_argv(cfg.chat.host, port, cfg.chat.threads)
    config_file = stack.state_dir() / "chat" / "config.yaml"
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    # Steps need 2 database connections; the service's request threads share more.
    env = {**os.environ, "ECB_CHAT_ADMIN_TOKEN": token, "ECB_LOG_TIMESTAMPS": "1", "ECB_CONFIG": str(config_file),
           "ECB_DB_POOL_SIZE": os.environ.get("ECB_DB_POOL_SIZE", "8")}
    pid = stack.CHAT.start(argv, env)
    log.info("started the chat service (gunicorn pid %d) on %s; log: %s", pid, url, stack.CHAT.log)
    return url


def wait_for_version(url: str, version: str, timeout_s: float, alive=None) -> dict:
    """Poll /api/model until it serves ``version``; raise with the last state seen otherwise."""
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        last = _model(url)
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


def record(ctx: StepContext, version: str, url: str, status: str, detail: str) -> None:
    """Mark the release row of this run (or, for a redeploy outside a training run, the row of the run that
    registered this version) with the service URL and the outcome; never a new row."""
    from sqlalchemy import select, update

    from tasks import db, schema

    r = schema.releases
    with db.engine().begin() as conn:
        row = conn.execute(select(r.c.id, r.c.detail).where(r.c.run_id == ctx.run_id)).first() or conn.execute(
            select(r.c.id, r.c.detail).where(r.c.registry_version == version).order_by(r.c.id.desc()).limit(1)).first()
        if row is None:
            log.warning("no release row for run %s or version %s: the deployment is not recorded", ctx.run_id, version)
            return
        # keep what earlier steps said (e.g. why the Hub push was skipped); a retry replaces its own part only
        earlier = (row.detail or "").split(" | deploy: ")[0]
        detail = f"{earlier} | deploy: {detail}" if earlier else f"deploy: {detail}"
        conn.execute(update(r).where(r.c.id == row.id).values(service_url=url, status=status, detail=detail))


def run(ctx: StepContext) -> dict:
    from tasks.chat.models import default_uri
    from tasks.registry import champion

    cfg = ctx.config
    version = ctx.inputs.get("registry_version") or (champion(cfg.release.registered_model) or {}).get("version")
    if not version:
        raise StepError(f"nothing to deploy: no registry_version input and no champion for {default_uri(cfg)}")
    mode = os.environ.get("ECB_EXECUTION_MODE") or cfg.execution.mode
    url = None
    try:
        if mode == "local":
            from tasks import stack

            url = start_or_reload_local(cfg)
            alive = lambda: stack.CHAT.pid() is not None or _model(url) is not None  # noqa: E731
        else:
            from tasks import rollout

            url, alive = rollout.roll_out(cfg, mode), None
        info = wait_for_version(url, str(version), cfg.chat.deploy_timeout_s, alive)
        msg = smoke_test(url)
    except (StepError, OSError, ValueError) as exc:
        record(ctx, str(version), url or "", "deploy_failed", str(exc)[:2000])
        raise StepError(f"deploy_chat_service failed ({mode} mode): {exc}") from exc
    detail = (f"serving version {version} since {info.get('loaded_at')}; smoke test: {msg['completion_tokens']} "
              f"tokens in {msg['latency_ms']:.0f} ms")
    record(ctx, str(version), url, "deployed", detail)
    log.info("deployed: %s serves %s version %s; %s", url, info.get("name"), version, detail)
    return {"service_url": url, "version": str(version), "mode": mode, "smoke_latency_ms": msg["latency_ms"]}
