"""Roll the chat service back to an earlier registered version: ``ecb release rollback`` and the rollback DAG.

    python -m tasks rollback_release --run-id R [--input to=VERSION] --input reason=TEXT [--input by=WHO]

Moves the aliases (``champion`` -> VERSION, default the ``previous`` alias; ``previous`` -> the demoted champion; a
running canary ends), records who (``by``, default the OS user) and why in ``releases`` (the demoted version's row
says ``rolled_back``; a ``rollback-...`` row records the event), then reloads the chat service and waits until it
serves VERSION. The service reads the aliases at every start, so a restart serves VERSION too.

A retry of the same run (an Airflow retry after the reload timed out, a killed worker) finishes the move the first
try planned, stored in the run's ``rollback-...`` row before any alias moved: it never plans again from aliases that
already moved, and it adds no second row.
"""

from __future__ import annotations

import getpass
import logging

from tasks.context import StepContext
from tasks.errors import StepError
from tasks.release import canary, deploy, registry

log = logging.getLogger("tasks.steps.rollback_release")


def run(ctx: StepContext) -> dict:
    cfg = ctx.config
    name = cfg.release.registered_model
    to = (ctx.inputs.get("to") or "").strip() or None
    reason = (ctx.inputs.get("reason") or "").strip() or "no reason given"
    by = (ctx.inputs.get("by") or "").strip() or getpass.getuser()
    try:
        moved = canary.manual_rollback(name, to, by, reason, ctx.run_id)
    except (registry.RegistryUnavailable, canary.CanaryError) as exc:
        raise StepError(f"rollback_release: {exc}") from exc
    target = moved["champion"]
    url, info = deploy.follow_aliases(cfg, target, "rollback_release")
    log.info("Rolled %s back to version %s (demoted: %s) for %s, who said: %s; %s serves version %s since %s.", name,
             target, ", ".join(moved["demoted"]) or "none", by, reason, url, info["version"], info.get("loaded_at"))
    return {"registered_model": name, "version": target, "demoted": moved["demoted"], "by": by, "reason": reason,
            "service_url": url}
