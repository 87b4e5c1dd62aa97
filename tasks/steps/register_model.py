"""Register the gated candidate in the MLflow Model Registry and move the aliases.

    python -m tasks register_model --run-id R --input adapter_uri=s3://... --input decision_id=N \
        --input snapshot_id=S --input mlflow_run_id=M

A registered version carries its lineage as tags (pipeline run, dataset snapshot, gate decision, git commit,
adapter location, base model). Aliases: ``champion`` is the serving model; ``previous`` keeps the one before it
reachable for a rollback. Idempotent: a version tagged with the same run id is reused; the champion alias moves last.
"""

from __future__ import annotations

import logging

from tasks import env
from tasks.config import TRAINING_SECTIONS
from tasks.context import StepContext
from tasks.errors import StepError
from tasks.io import db, schema
from tasks.release.registry import (
    RegistryUnavailable,
    champion,
    git_commit,
    log_candidate,
    registry_client,
    version_of_run,
)

log = logging.getLogger("tasks.steps.register_model")


def run(ctx: StepContext) -> dict:
    cfg = ctx.config
    name = cfg.release.registered_model
    adapter_uri, decision_id = ctx.require_input("adapter_uri"), ctx.require_input("decision_id")
    snapshot_id, mlflow_run = ctx.require_input("snapshot_id"), ctx.inputs.get("mlflow_run_id")
    from mlflow.exceptions import MlflowException

    where, mv = f"model registry (MLflow at {env.get('MLFLOW_TRACKING_URI') or 'unset'})", None
    try:
        client = registry_client()
        previous = champion(name)
        mv = version_of_run(client, name, ctx.run_id)
        if mv is None:
            if not mlflow_run:
                raise StepError("register_model needs --input mlflow_run_id (the fine-tune's MLflow run)")
            if not client.search_registered_models(f"name = '{name}'"):
                client.create_registered_model(name, description="E-commerce customer-support chatbot (LoRA)")
            model_uri = log_candidate(mlflow_run, adapter_uri, cfg)
            tags = {"ecb.run_id": ctx.run_id, "snapshot_id": snapshot_id, "gate_decision_id": decision_id,
                    "git_commit": git_commit(), "adapter_uri": adapter_uri, "base_model": cfg.model.base_model}
            import mlflow

            mv = mlflow.register_model(model_uri, name, tags=tags)
            log.info("registered %s version %s from %s", name, mv.version, model_uri)
        else:
            log.info("%s version %s is already registered for run %s; reusing it", name, mv.version, ctx.run_id)
        if previous and previous["version"] != str(mv.version):
            client.set_registered_model_alias(name, "previous", previous["version"])
        client.set_registered_model_alias(name, "champion", mv.version)
    except RegistryUnavailable as exc:
        raise StepError(f"{where} unreachable, nothing registered and no alias moved: {exc}") from exc
    except MlflowException as exc:  # the server went away (or failed) part-way: the champion alias moves last
        done = (f"version {mv.version} registered, champion alias not moved" if mv is not None
                else "nothing registered and no alias moved")
        raise StepError(f"{where} failed during register_model ({done}; a rerun completes it): {exc}") from exc
    record_release(ctx, snapshot_id, str(mv.version))
    log.info("alias champion -> %s version %s%s", name, mv.version,
             f" (previous -> version {previous['version']})" if previous and previous["version"] != str(mv.version)
             else "")
    return {"registered_model": name, "version": str(mv.version), "previous_version": previous and
            previous["version"], "adapter_uri": adapter_uri, "snapshot_id": snapshot_id}


def record_release(ctx: StepContext, snapshot_id: str, version: str) -> None:
    row = {"run_id": ctx.run_id, "snapshot_id": snapshot_id, "config_hash": ctx.config.section_hash(*TRAINING_SECTIONS),
           "registry_version": version, "status": "registered"}
    with db.engine().begin() as conn:
        db.upsert(conn, schema.releases, row, keys=("run_id",))
