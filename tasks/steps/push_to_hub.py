"""Publish a final release to the Hugging Face Hub, with a model card built from what Postgres recorded.

    python -m tasks push_to_hub --run-id R --input adapter_uri=s3://... --input registry_version=N

Only a release that is final reaches the Hub: the DAG runs this step after the canary verdict, and the step publishes
only when the run's ``releases`` row says ``deployed`` (served as the champion: promoted by its canary, or released
without one). A canary still running, rolled back, or whose deploy failed is skipped with the reason, so the Hub's
``main`` and its version tags never name a model customers were taken off. The card's numbers come from the rows
the pipeline wrote (snapshot, training run, evaluations, gate decision), so they are the ones the gate saw. No token
configured -> the step skips with one clear line (see tasks/release/hub.py).
"""

from __future__ import annotations

import logging

from tasks.context import StepContext
from tasks.ml import model_source
from tasks.release import canary, hub

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
    source = model_source.base_model_source(cfg.model) or {}  # an imported GGUF records its origin and licence
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
            "system_prompt": cfg.data.system_prompt, "datasets": [], "license": "apache-2.0",
            "base_model_source": source.get("source"),
            "base_model_license": source.get("license") or cfg.model.base_model_license or None}


FINAL = "deployed"  # the releases status of a version that serves as the champion


def record(row: dict | None, result: dict) -> None:
    """The Hub repo and commit of a published release (the status stays what the release is: ``deployed``), or why
    nothing was published, in the run's release ``row``."""
    values = ({"hub_repo": result["repo_id"], "hub_revision": result["revision"]}
              if result["status"] in ("pushed", "exists") else {})
    detail = f"hub push {result['status']}" + (f": {result['reason']}" if result.get("reason") else "")
    if result.get("note"):  # released under another tag than v<version>: say which and why
        detail = f"hub push: {result['note']}"
    if row is not None:
        canary.update_row(row["id"], detail, **values)


def run(ctx: StepContext) -> dict:
    adapter_uri, version = ctx.require_input("adapter_uri"), ctx.require_input("registry_version")
    repo_id = ctx.config.release.hub_repo_id
    row = canary.run_row(ctx.run_id)
    status = row["status"] if row else None
    if status != FINAL:
        reason = (f"version {version} is not a final release (release status {status or 'unknown'}: a canary that "
                  f"is still running, was rolled back or failed to deploy is never published); the Hub's main and "
                  f"tags of {repo_id} stay as they were")
        log.info("Not publishing: %s.", reason)
        result = {"status": "skipped", "reason": reason, "repo_id": repo_id, "registry_version": version}
    else:
        result = hub.publish(adapter_uri, version, release_meta(ctx, version), repo_id)
    record(row, result)
    return result
