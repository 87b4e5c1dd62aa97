"""Deploy the chat service with the newly registered version: as the champion, or as a canary beside it.

    python -m tasks deploy_chat_service --run-id R --input registry_version=N

Local mode: start the service (gunicorn, detached, pid and log in the state folder) when it is not running, or ask
the running one to reload (``POST /admin/reload``: it reads the registry's aliases again). Container modes: restart
the compose service or roll out the Kubernetes deployment (tasks/release/rollout.py). Then wait until ``/api/model``
serves the expected versions, send one smoke-test chat, and record the URL and version in the run's ``releases`` row.
When the service does not come up, the step fails with the reason and the row says ``deploy_failed``; a canary that
fails so is withdrawn first (candidate alias and share tag removed, the service reloaded onto the champion alone).

Canary (``release.canary_share`` > 0 and register_model set the ``candidate`` alias on this version): the version gets
the share as a tag, the service serves it beside the champion, the smoke test chats with the candidate, and the row
says ``canary`` with the share and the time the canary began (the canary verdict step decides later). Without an
input the step serves whatever the aliases say (a redeploy, e.g. after the machine restarted).
"""

from __future__ import annotations

import logging

from tasks.context import StepContext
from tasks.errors import StepError
from tasks.release import canary as canary_release
from tasks.release import deploy, registry
from tasks.release.registry import serving_uri

log = logging.getLogger("tasks.steps.deploy_chat_service")

def record(ctx: StepContext, version: str, url: str, status: str, detail: str, canary_share: float | None = None,
           canary_started: bool = False) -> None:
    """Mark the release row of this run (or, for a redeploy outside a training run, the row of the run that
    registered this version) with the service URL and the outcome; never a new row."""
    from sqlalchemy import func, select, update

    from tasks.io import db, schema

    r = schema.releases
    with db.engine().begin() as conn:
        model = r.c.registered_model.is_(None) | (r.c.registered_model == ctx.config.release.registered_model)
        row = conn.execute(select(r.c.id, r.c.detail).where(r.c.run_id == ctx.run_id)).first() or conn.execute(
            select(r.c.id, r.c.detail).where(r.c.registry_version == version, model, ~r.c.run_id.like("rollback-%"))
            .order_by(r.c.id.desc()).limit(1)).first()
        if row is None:
            log.warning("no release row for run %s or version %s: the deployment is not recorded", ctx.run_id, version)
            return
        # keep what earlier steps said (e.g. why the Hub push was skipped); a retry replaces its own part only
        earlier = (row.detail or "").split(" | deploy: ")[0]
        detail = f"{earlier} | deploy: {detail}" if earlier else f"deploy: {detail}"
        values = {"service_url": url, "status": status, "detail": detail}
        if canary_started:  # the first start counts: a retried deploy does not restart the canary's clock
            values.update(canary_share=canary_share, canary_started_at=func.coalesce(r.c.canary_started_at, func.now()))
        conn.execute(update(r).where(r.c.id == row.id).values(**values))


def run(ctx: StepContext) -> dict:
    cfg = ctx.config
    name = cfg.release.registered_model
    try:
        found = resume_withdrawn_canary(ctx, registry.aliases(name))
        version, candidate, canary = plan(ctx, found)
        if canary:
            registry.set_version_tag(name, candidate, registry.CANARY_SHARE_TAG, str(cfg.release.canary_share))
        elif ctx.inputs.get("registry_version") and found.get("candidate"):
            # this release replaced the champion directly: an older canary is void (it would serve beside it)
            registry.delete_alias(name, "candidate")
            log.info("removed the stale candidate alias (version %s): version %s replaces the champion directly",
                     found["candidate"], version)
    except registry.RegistryUnavailable as exc:
        raise StepError(f"deploy_chat_service: the model registry is unreachable: {exc}") from exc
    serving = candidate if canary else version
    mode = cfg.execution.mode  # the Airflow side passes the resolved mode (--set execution.mode=...)
    url = None
    try:
        # a release expects exactly its canary or none; a redeploy whatever candidate the service takes up
        expect = candidate if canary else (None if ctx.inputs.get("registry_version") else deploy.ANY)
        url, info = deploy.redeploy(cfg, version, expect, restart=True)
        msg = deploy.smoke_test(url, arm="candidate" if canary else None)
    except (StepError, OSError, ValueError) as exc:
        withdrawn = withdraw_canary(cfg, candidate, version) if canary else ""
        record(ctx, serving, url or "", "deploy_failed", f"{str(exc)[:1500]}{withdrawn}")
        raise StepError(f"deploy_chat_service failed ({mode} mode): {exc}{withdrawn}") from exc
    smoke = f"smoke test: {msg['completion_tokens']} tokens in {msg['latency_ms']:.0f} ms"
    if canary:
        detail = (f"canary: version {candidate} serves {cfg.release.canary_share:.0%} of new conversations beside "
                  f"champion {version} since {info['candidate'].get('loaded_at')}; {smoke}")
        record(ctx, candidate, url, "canary", detail, canary_share=cfg.release.canary_share, canary_started=True)
    else:
        detail = f"serving version {version} since {info.get('loaded_at')}; {smoke}"
        record(ctx, version, url, "deployed", detail)
    log.info("deployed: %s serves %s version %s; %s", url, info.get("name"), serving, detail)
    return {"service_url": url, "version": serving, "champion_version": version, "canary": canary, "mode": mode,
            "smoke_latency_ms": msg["latency_ms"]}


def withdraw_canary(cfg, candidate: str, champion: str) -> str:
    """A canary that failed its deploy or smoke test gets no traffic: its alias and share tag go before the step fails
    (else the service would keep giving it new conversations, restarts included), then the service is reloaded to
    serve the champion alone. Returns the sentence the release row and the error end with."""
    name = cfg.release.registered_model
    try:
        canary_release.end_canary(name, candidate)
        registry.delete_version_tag(name, candidate, registry.CANARY_SHARE_TAG)
    except registry.RegistryUnavailable as exc:
        log.error("could not withdraw canary version %s: the registry is unreachable (%s); its candidate alias may "
                  "still give it new conversations", candidate, exc)
        return f"; canary NOT withdrawn, the registry is unreachable: {exc}"
    log.warning("canary version %s withdrawn: candidate alias and share tag removed; champion %s gets all new "
                "conversations", candidate, champion)
    try:
        deploy.follow_aliases(cfg, champion, "deploy_chat_service (canary withdrawn)")
    except (StepError, OSError, ValueError) as exc:
        log.error("%s", exc)
        return (f"; canary version {candidate} withdrawn (candidate alias and share tag removed), but the service did "
                f"not reload yet: it serves champion {champion} alone from its next reload or restart")
    return (f"; canary version {candidate} withdrawn: candidate alias and share tag removed, champion {champion} "
            "serves all conversations")


def resume_withdrawn_canary(ctx: StepContext, found: dict) -> dict:
    """A retry of a canary deploy that an earlier try withdrew (this run's row says ``deploy_failed``, the version is
    neither champion nor candidate): put the candidate alias back and try the canary again, as the first try meant.
    Without this the retry would deploy the version as the champion it never became and wait for nothing."""
    wanted = ctx.inputs.get("registry_version")
    if (not wanted or ctx.config.release.canary_share <= 0 or found.get("candidate")
            or found.get("champion") in (None, str(wanted))):
        return found
    if (canary_release.run_row(ctx.run_id) or {}).get("status") != "deploy_failed":
        return found
    registry.set_alias(ctx.config.release.registered_model, "candidate", str(wanted))
    log.info("retry: re-starting the canary of version %s that an earlier try withdrew", wanted)
    return {**found, "candidate": str(wanted)}


def plan(ctx: StepContext, found: dict) -> tuple[str, str | None, bool]:
    """(champion version to serve, candidate version or None, whether this deploy starts a canary)."""
    wanted = ctx.inputs.get("registry_version")
    champ, cand = found.get("champion"), found.get("candidate")
    if not wanted:  # a redeploy: whatever the aliases say
        if not champ:
            raise StepError(f"nothing to deploy: no registry_version input and no champion for "
                            f"{serving_uri(ctx.config)}")
        return champ, cand, False
    canary = ctx.config.release.canary_share > 0 and cand == str(wanted) and champ not in (None, str(wanted))
    return (champ, str(wanted), True) if canary else (str(wanted), None, False)
