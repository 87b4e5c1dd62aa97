"""Push a registered release to the Hugging Face Hub, with a model card built from what Postgres recorded.

    python -m tasks push_to_hub --run-id R --input adapter_uri=s3://... --input registry_version=N

The card's numbers come from the rows the pipeline wrote (snapshot, training run, evaluations, gate decision), so
they are the ones the gate saw. No token configured -> the step skips with one clear line (see tasks/release/hub.py).
"""

from __future__ import annotations

import logging

from tasks.context import StepContext
from tasks.release import hub

log = logging.getLogger("tasks.steps.push_to_hub")


def release_meta(ctx: StepContext, version: str) -> dict:
    from sqlalchemy import select

    from tasks.io import db, schema

    cfg = ctx.config
    with db.engine().connect() as conn:
        rel = conn.execute(select(schema.releases).where(schema.releases.c.run_id == ctx.run_id)).mappings().one()
        snap = conn.execute(select(schema.snapshots).where(schema.snapshots.c.snapshot_id == rel["snapshot_id"])) \
            .mappings().one()
        gate = conn.execute(select(schema.gate_decisions).where(schema.gate_decisions.c.run_id == ctx.run_id)) \
            .mappings().one()
        evals = {r["id"]: r for r in conn.execute(select(schema.evaluations).where(schema.evaluations.c.id.in_(
            [i for i in (gate["candidate_eval_id"], gate["champion_eval_id"]) if i]))).mappings()}
        train = conn.execute(select(schema.training_runs).where(schema.training_runs.c.run_id == ctx.run_id,
                                                                 schema.training_runs.c.kind == "final")) \
            .mappings().first()

    def metrics(eval_id):
        row = evals.get(eval_id)
        return {**row["metrics"], "weighted_score": row["weighted_score"]} if row else None

    best = (train and (train["params"] or {}).get("best_params")) or {}
    hyper = {"lora.r": cfg.lora.r, "lora.alpha": cfg.lora.alpha, "lora.dropout": cfg.lora.dropout,
             "lora.target_modules": ",".join(cfg.lora.target_modules), "training.learning_rate":
             cfg.training.learning_rate, "training.epochs": cfg.training.epochs, "training.batch_size":
             cfg.training.batch_size, "quantization": cfg.lora.quantization, **best}
    return {"repo_id": cfg.release.hub_repo_id, "base_model": cfg.model.base_model, "registry_version": version,
            "run_id": ctx.run_id, "gate_decision_id": gate["id"],  # the lineage /api/model shows for this version
            "snapshot_id": rel["snapshot_id"], "private": cfg.release.hub_private,
            "rows": {k: snap[k] for k in ("rows_in", "rows_kept", "rows_quarantined", "n_train", "n_validation",
                                          "n_test")},
            "hyperparameters": hyper, "metrics": metrics(gate["candidate_eval_id"]),
            "champion_metrics": metrics(gate["champion_eval_id"]), "gate_summary": gate["summary"],
            "system_prompt": cfg.data.system_prompt, "datasets": [], "license": "apache-2.0"}


def record(ctx: StepContext, result: dict) -> None:
    from sqlalchemy import update

    from tasks.io import db, schema

    values = ({"hub_repo": result["repo_id"], "hub_revision": result["revision"], "status": "pushed"}
              if result["status"] in ("pushed", "exists") else {"detail": f"hub push {result['status']}: "
                                                                          f"{result.get('reason', '')}"})
    if result.get("note"):  # released under another tag than v<version>: say which and why
        values["detail"] = f"hub push: {result['note']}"
    with db.engine().begin() as conn:
        conn.execute(update(schema.releases).where(schema.releases.c.run_id == ctx.run_id).values(**values))


def run(ctx: StepContext) -> dict:
    adapter_uri, version = ctx.require_input("adapter_uri"), ctx.require_input("registry_version")
    result = hub.publish(adapter_uri, version, release_meta(ctx, version), ctx.config.release.hub_repo_id)
    record(ctx, result)
    return result
