"""Whether the canary of a release has been seen enough to be judged: the DAG's waiting task runs this until ready.

    python -m tasks canary_status --run-id R --input registry_version=N

Ready when the canary can be judged (``canary.unseen``: ``release.canary_min_messages`` candidate replies and
``release.canary_min_rated`` rated replies on each arm, counting at most ``release.canary_max_replies_per_conversation``
replies of a conversation), or when ``release.canary_timeout_s`` has passed (the verdict then judges what there is,
and rolls back a canary still short of either), or at once when version N is no canary (it was released straight to
champion, or its canary was already decided). Reads Postgres only; the manifest carries the counts, what is missing
and ``ready``; the Airflow side reschedules the check while it is false.
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
    arms = canary.arm_stats([version, champion], row["canary_started_at"], rel.canary_max_replies_per_conversation)
    cand, champ = arms[version], arms[champion]
    missing = canary.unseen(cand, champ, canary.Limits.from_config(rel))
    elapsed = (row["now"] - row["canary_started_at"]).total_seconds()
    timed_out = bool(missing) and elapsed >= rel.canary_timeout_s
    log.info("Canary version %s: %d candidate replies in %d conversations, %d rated (champion %s: %d replies, %d "
             "rated) after %.0fs of at most %ds: %s.", version, cand.replies, cand.conversations, cand.rated, champion,
             champ.replies, champ.rated, elapsed, rel.canary_timeout_s,
             "enough to judge" if not missing else
             f"time is up, judging what there is ({'; '.join(missing)})" if timed_out else
             f"waiting: {'; '.join(missing)}")
    return {"ready": not missing or timed_out, "canary": True, "version": version, "champion_version": champion,
            "candidate_replies": cand.replies, "champion_replies": champ.replies, "candidate_rated": cand.rated,
            "champion_rated": champ.rated, "candidate_conversations": cand.conversations, "missing": missing,
            "elapsed_s": round(elapsed, 1), "timed_out": timed_out}
