"""The quality gate: decide from the stored evaluations whether the candidate replaces the champion.

    python -m tasks quality_gate --run-id R --input evaluation='<evaluate manifest JSON>' [--input force_deploy=true]

Prints the comparison table (metric | weight | candidate | champion | delta | weighted contribution, the total with
its bootstrap interval, the live set's rows when the snapshot has one, the threshold, the intents that moved most)
and the decision in one sentence, records the decision in Postgres `gate_decisions`, and returns
{"release": bool, ...} for the branch operator.
Fails closed: anything missing, NaN, too small or unreachable means no release, with the reason.
"""

from __future__ import annotations

import json
import logging

from tasks.context import StepContext
from tasks.io import s3
from tasks.release import gate

log = logging.getLogger("tasks.steps.quality_gate")


STORED_WITH_SCORES = ("eval_settings", "model")  # kept in the metrics JSON by tasks.ml.evaluation; not metrics


def evaluation_row(summary: dict | None) -> dict | None:
    if not summary:
        return None
    from sqlalchemy import select

    from tasks.io import db, schema

    with db.engine().connect() as conn:
        row = conn.execute(select(schema.evaluations).where(schema.evaluations.c.id == summary["eval_id"])) \
            .mappings().first()
    return dict(row) if row else None


def load_evaluation(summary: dict | None) -> gate.Evaluation | None:
    """The full evaluation (scores, per-intent, outputs in example order) behind an evaluate-manifest summary."""
    if (row := evaluation_row(summary)) is None:
        return None
    outputs = [json.loads(line) for line in s3.get_bytes(row["outputs_uri"]).decode().splitlines() if line.strip()]
    metrics = row["metrics"] or {}
    return gate.Evaluation(model_ref=row["model_ref"], snapshot_id=row["snapshot_id"], n=row["n_examples"],
                           scores={k: v for k, v in metrics.items() if k not in STORED_WITH_SCORES},
                           weighted_score=row["weighted_score"], per_intent=row["per_intent"] or {},
                           outputs=[o["output"] for o in outputs], references=[o["reference"] for o in outputs],
                           settings=metrics.get("eval_settings"))


def load_live(summary: dict | None) -> gate.LiveEvaluation | None:
    """A model's live-set evaluation (evaluate manifest's candidate_live / champion_live), None without one."""
    if (row := evaluation_row(summary)) is None:
        return None
    m = row["metrics"] or {}
    return gate.LiveEvaluation(model_ref=row["model_ref"], n=row["n_examples"],
                               rejected_similarity=m.get("rejected_similarity"), repeat_rate=m.get("repeat_rate"),
                               per_version=m.get("per_version") or {})


def record(ctx: StepContext, decision: gate.Decision, ev: dict) -> int:
    from sqlalchemy import select

    from tasks.io import db, schema

    g = schema.gate_decisions
    row = {"run_id": ctx.run_id, "candidate_eval_id": (ev.get("candidate") or {}).get("eval_id"),
           "champion_eval_id": (ev.get("champion") or {}).get("eval_id"), "release": decision.release,
           "forced": decision.forced, "score_delta": decision.delta, "ci_low": decision.ci_low,
           "ci_high": decision.ci_high, "threshold": decision.threshold, "reasons": decision.reasons,
           "summary": decision.summary}
    with db.engine().begin() as conn:
        db.upsert(conn, g, row, keys=("run_id",))
        return conn.execute(select(g.c.id).where(g.c.run_id == ctx.run_id)).scalar_one()


def run(ctx: StepContext) -> dict:
    cfg = ctx.config
    ev = json.loads(ctx.require_input("evaluation"))
    force = ctx.inputs.get("force_deploy", "false").lower() == "true"
    candidate, champion = load_evaluation(ev.get("candidate")), load_evaluation(ev.get("champion"))
    decision = gate.decide(candidate, champion, cfg.eval.weights, cfg.gate, registry_error=ev.get("registry_error"),
                           force_deploy=force, candidate_live=load_live(ev.get("candidate_live")),
                           champion_live=load_live(ev.get("champion_live")), base=load_evaluation(ev.get("base")))
    for line in decision.table.splitlines():
        log.info("%s", line)
    if decision.forced:
        log.warning("FORCED RELEASE: force_deploy is set; the gate's own verdict is in the reasons above")
    decision_id = record(ctx, decision, ev)
    log.info("gate decision %d recorded: %s", decision_id, decision.summary)
    return {"release": decision.release, "forced": decision.forced, "decision_id": decision_id,
            "summary": decision.summary, "reasons": decision.reasons, "delta": decision.delta,
            "ci_low": decision.ci_low, "ci_high": decision.ci_high, "ci_problem": decision.ci_problem,
            "versus": decision.versus}
