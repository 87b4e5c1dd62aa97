"""Judge the canary of a release on live signals, then promote it or roll it back: the DAG's last task.

    python -m tasks canary_verdict --run-id R --input registry_version=N

Compares candidate N with the champion on the replies since the canary began (tasks/release/canary.py), with
conversations as the unit: error and timeout rate, thumbs-down rate among rated replies, empty or over-length replies
(each a one-sided test of the difference against a margin, the three Holm-corrected together) and p95 latency. Too
few candidate replies, or too few rated replies on either arm, is a rollback: an unseen canary is never promoted.
Promote: ``previous`` -> the old champion, ``champion`` -> N, ``candidate`` removed, the release row ``deployed``.
Roll back: ``candidate`` removed, the champion stays, the row ``rolled_back``. Either way the chat service is reloaded
and the step waits until it serves only the champion. The decision is stored in the row before any alias moves, so a
retry applies the same decision instead of judging again. The task log states the numbers and the decision in one
sentence.
"""

from __future__ import annotations

import logging

from sqlalchemy import func

from tasks.context import StepContext
from tasks.errors import StepError
from tasks.release import canary, deploy, registry

log = logging.getLogger("tasks.steps.canary_verdict")
STATUS = {"promote": "deployed", "rollback": "rolled_back"}


def run(ctx: StepContext) -> dict:
    cfg, version = ctx.config, ctx.require_input("registry_version")
    name = cfg.release.registered_model
    row = canary.release_row(name, version)
    stored = (row["verdict"] or {}) if row else {}
    if row is None or (row["status"] != "canary" and not stored.get("decision")):
        log.info("No canary to judge: version %s was released with status %s.", version,
                 row["status"] if row else "unknown")
        return {"decision": "none", "version": version}
    try:
        if row["status"] == "canary":
            verdict = stored if stored.get("decision") else judge(cfg, name, version, row)
            if verdict is None:
                return {"decision": "none", "version": version}
            try:
                apply(name, version, verdict["decision"])
            except canary.CanaryEnded as exc:  # a person ended it between the judging and now: their call stands
                log.warning("%s; the verdict (%s) is not applied.", exc, verdict["decision"])
                return {"decision": "none", "version": version, "reason": str(exc)}
            canary.update_row(row["id"], f"canary verdict: {verdict['decision']}",
                              status=STATUS[verdict["decision"]], decided_at=func.now())
        else:  # decided by an earlier try whose reload failed: move nothing (the aliases may have moved since)
            verdict = stored
        champion = canary.current_champion(name)
    except (registry.RegistryUnavailable, canary.CanaryError) as exc:
        raise StepError(f"canary_verdict: {exc}") from exc
    decision = verdict["decision"]
    url, _ = deploy.follow_aliases(cfg, champion, f"canary_verdict ({decision})")
    log.info("%s", verdict["sentence"])
    log.info("The chat service at %s now serves champion version %s only.", url, champion)
    return {"decision": decision, "version": version, "champion_version": champion, "service_url": url,
            "reasons": verdict["reasons"], "candidate": verdict["candidate"], "champion": verdict["champion"]}


def apply(name: str, version: str, decision: str) -> None:
    if decision == "promote":
        old = canary.promote(name, version)
        log.info("Aliases: champion -> version %s, previous -> version %s, candidate removed.", version, old)
    else:
        canary.end_canary(name, version)
        log.info("Aliases: candidate (version %s) removed; the champion stays.", version)


def judge(cfg, name: str, version: str, row: dict) -> dict | None:
    """The verdict on live signals, stored in the release row before anything moves (None: the canary is over).
    A canary the waiting task let through at its time limit without enough replies or ratings is rolled back."""
    found = registry.aliases(name)
    if found.get("candidate") != str(version):
        log.info("The candidate alias no longer names version %s (it names %s): the canary was ended by hand; "
                 "nothing to judge.", version, found.get("candidate"))
        return None
    champion = canary.current_champion(name)
    arms = canary.arm_stats([str(version), champion], row["canary_started_at"],
                            cfg.release.canary_max_replies_per_conversation)
    verdict = canary.judge(arms[str(version)], arms[champion], canary.Limits.from_config(cfg.release)).to_dict()
    canary.update_row(row["id"], verdict=verdict)
    return verdict
