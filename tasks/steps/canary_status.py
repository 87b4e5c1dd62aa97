"""Whether the canary of a release has been seen enough to be judged: the DAG's waiting task runs this until ready.

    python -m tasks canary_status --run-id R --input registry_version=N

Ready when the candidate has ``release.canary_min_messages`` replies since the canary began, or when
``release.canary_timeout_s`` has passed (the verdict then judges what there is), or at once when version N is no
canary (it was released straight to champion, or its canary was already decided). Reads Postgres only; the manifest
carries the counts and ``ready``; the Airflow side reschedules the check while it is false.
"""

from __future__ import annotations

import logging

from tasks.context import StepContext
from tasks.errors import StepError
from tasks.release import canary, registry

log = logging.getLogger("tasks.steps.canary_status")


def run(ctx: StepContext) -> dict:
    rel = ctx.config.release
    version = ctx.require_input("registry_version")
    row = canary.release_row(rel.registered_model, version)
    if row is None or row["status"] != "canary":
        log.info("Version %s is no canary (release status %s): nothing to wait for.", version,
                 row["status"] if row else "unknown")
        return {"ready": True, "canary": False, "version": version}
    if row["canary_started_at"] is None:
        raise StepError(f"release row {row['id']} of version {version} says canary but has no start time")
    try:
        champion = canary.current_champion(rel.registered_model)
    except (registry.RegistryUnavailable, canary.CanaryError) as exc:
        raise StepError(f"canary_status: {exc}") from exc
    arms = canary.arm_stats([version, champion], row["canary_started_at"])
    elapsed = (row["now"] - row["canary_started_at"]).total_seconds()
    seen, enough = arms[version].replies, arms[version].replies >= rel.canary_min_messages
    timed_out = not enough and elapsed >= rel.canary_timeout_s
    log.info("Canary version %s: %d of %d candidate replies (champion %s: %d) after %.0fs of at most %ds: %s.",
             version, seen, rel.canary_min_messages, champion, arms[champion].replies, elapsed, rel.canary_timeout_s,
             "enough to judge" if enough else "time is up, judging what there is" if timed_out else "waiting")
    return {"ready": enough or timed_out, "canary": True, "version": version, "champion_version": champion,
            "candidate_replies": seen, "champion_replies": arms[champion].replies, "elapsed_s": round(elapsed, 1),
            "timed_out": timed_out}
