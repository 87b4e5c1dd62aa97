"""Deploy the chat service with the newly registered champion: the DAG's final step.

    python -m tasks deploy_chat_service --run-id R --input registry_version=N

Local mode: start the service (gunicorn, detached, pid and log in the state folder) when it is not running, or ask
the running one to reload its champion (``POST /admin/reload``). Container modes: restart the compose service or
roll out the Kubernetes deployment (tasks/release/rollout.py). Then wait until ``/api/model`` serves the expected
version, send one smoke-test chat, and record the URL and version in the run's ``releases`` row. When the service does
not come up, the step fails with the reason and the row says ``deploy_failed``.
"""

from __future__ import annotations

import logging

from tasks.context import StepContext
from tasks.errors import StepError
from tasks.release import deploy
from tasks.release.registry import champion, serving_uri

log = logging.getLogger("tasks.steps.deploy_chat_service")
def record(ctx: StepContext, version: str, url: str, status: str, detail: str) -> None:
    """Mark the release row of this run (or, for a redeploy outside a training run, the row of the run that
    registered this version) with the service URL and the outcome; never a new row."""
    from sqlalchemy import select, update

    from tasks.io import db, schema

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
    cfg = ctx.config
    version = ctx.inputs.get("registry_version") or (champion(cfg.release.registered_model) or {}).get("version")
    if not version:
        raise StepError(f"nothing to deploy: no registry_version input and no champion for {serving_uri(cfg)}")
    mode = cfg.execution.mode  # the Airflow side passes the resolved mode (--set execution.mode=...)
    url = None
    try:
        if mode == "local":
            url = deploy.start_or_reload_local(cfg)
            alive = lambda: deploy.CHAT.pid() is not None or deploy.served_model(url) is not None  # noqa: E731
        else:
            from tasks.release import rollout

            url, alive = rollout.roll_out(cfg, mode), None
        info = deploy.wait_for_version(url, str(version), cfg.chat.deploy_timeout_s, alive)
        msg = deploy.smoke_test(url)
    except (StepError, OSError, ValueError) as exc:
        record(ctx, str(version), url or "", "deploy_failed", str(exc)[:2000])
        raise StepError(f"deploy_chat_service failed ({mode} mode): {exc}") from exc
    detail = (f"serving version {version} since {info.get('loaded_at')}; smoke test: {msg['completion_tokens']} "
              f"tokens in {msg['latency_ms']:.0f} ms")
    record(ctx, str(version), url, "deployed", detail)
    log.info("deployed: %s serves %s version %s; %s", url, info.get("name"), version, detail)
    return {"service_url": url, "version": str(version), "mode": mode, "smoke_latency_ms": msg["latency_ms"]}
