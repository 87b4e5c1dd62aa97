"""Record a person's answer to the release approval in `gate_decisions`, and say whether the run releases.

    python -m tasks record_approval --run-id R --input decision_id=12 \
        --input approval='{"status": "approved", "by": "alice", "at": "2026-12-02T10:00:00+00:00", "comment": ""}'

`approval` is what the approve_release task returns (ecb_airflow.decisions.approval_answer): status approved,
rejected or timed_out (nobody answered within gate.approval_timeout_s), who answered, when, their comment and why
the approval was asked. The row of the gate decision gets these columns; the manifest has the same shape as the
quality_gate one (release, decision_id, summary), so the branch after it follows the answer. Only a release the gate
decided can be approved: an approval of a blocked decision still does not release. A timeout never releases.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime

from tasks.context import StepContext
from tasks.errors import StepError

log = logging.getLogger("tasks.steps.record_approval")
STATUSES = ("approved", "rejected", "timed_out")


def parse_answer(raw: str) -> dict:
    try:
        answer = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise StepError(f"record_approval: --input approval is not JSON ({exc})") from None
    if not isinstance(answer, dict) or answer.get("status") not in STATUSES:
        raise StepError(f"record_approval: approval status must be one of {list(STATUSES)}, got {raw[:200]!r}")
    return answer


def summary_of(answer: dict, gate_summary: str, released: bool) -> str:
    who = answer.get("by") or "nobody"
    comment = f" ({answer['comment']})" if answer.get("comment") else ""
    if answer["status"] == "timed_out":
        return f"Not released: nobody answered the approval in time (fail closed). Gate: {gate_summary}"
    if released:
        return f"Approved by {who}{comment}: {gate_summary}"
    verb = "Rejected" if answer["status"] == "rejected" else "Approved, but the gate did not release"
    return f"{verb} by {who}{comment}: not released. Gate: {gate_summary}"


def record(run_id: str, decision_id: int, answer: dict) -> dict | None:
    from sqlalchemy import update

    from tasks.io import db, schema

    g = schema.gate_decisions
    at = datetime.fromisoformat(answer["at"]) if answer.get("at") else None
    values = {"approval_status": answer["status"], "approval_reason": answer.get("reason") or None,
              "approval_by": answer.get("by"), "approval_comment": answer.get("comment") or None, "approval_at": at}
    # Only this run's decision: an answer is never written onto another run's row.
    stmt = (update(g).where(g.c.id == decision_id, g.c.run_id == run_id).values(**values)
            .returning(g.c.release, g.c.summary))

    def write(conn):  # an idempotent update: safe to run again after a lost connection
        row = conn.execute(stmt).mappings().first()
        return dict(row) if row else None

    return db.transaction(write, what=f"record the approval of gate decision {decision_id}")


def run(ctx: StepContext) -> dict:
    decision_id = ctx.int_input("decision_id", minimum=1)
    if decision_id is None:
        raise StepError("record_approval: needs --input decision_id=<gate_decisions.id>")
    answer = parse_answer(ctx.require_input("approval"))
    row = record(ctx.run_id, decision_id, answer)
    if row is None:
        raise StepError(f"record_approval: run {ctx.run_id} has no gate decision {decision_id}")
    released = answer["status"] == "approved" and bool(row["release"])
    summary = summary_of(answer, row["summary"], released)
    log.info("approval of gate decision %d recorded: %s by %s at %s; asked because: %s", decision_id,
             answer["status"], answer.get("by") or "nobody", answer.get("at"), answer.get("reason") or "n/a")
    log.info("%s", summary)
    return {"release": released, "decision_id": decision_id, "approval": answer["status"],
            "approved_by": answer.get("by"), "summary": summary}
