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
    by_alias,
    champion,
    git_commit,
    log_candidate,
    registry_client,
    version_of_run,
)

log = logging.getLogger("tasks.steps.register_model")


def registered(client, name: str) -> bool:
    """Whether registered model ``name`` exists (looked up by name, not through a search filter built from it)."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return True


def run(ctx: StepContext) -> dict:
    cfg = ctx.config
    name = cfg.release.registered_model
    adapter_uri, decision_id = ctx.require_input("adapter_uri"), ctx.require_input("decision_id")
    snapshot_id, mlflow_run = ctx.require_input("snapshot_id"), ctx.inputs.get("mlflow_run_id")
    from mlflow.exceptions import MlflowException

    where, mv = f"model registry (MLflow at {env.get('MLFLOW_TRACKING_URI') or 'unset'})", None
    try:
        client = registry_client()
        current = champion(name)
        mv = version_of_run(client, name, ctx.run_id)
        if mv is None:
            if not mlflow_run:
                raise StepError("register_model needs --input mlflow_run_id (the fine-tune's MLflow run)")
            if not registered(client, name):
                client.create_registered_model(name, description="E-commerce customer-support chatbot (LoRA)")
            model_uri = log_candidate(mlflow_run, adapter_uri, cfg)
            tags = {"ecb.run_id": ctx.run_id, "snapshot_id": snapshot_id, "gate_decision_id": decision_id,
                    "git_commit": git_commit(), "adapter_uri": adapter_uri, "base_model": cfg.model.base_model}
            import mlflow

            mv = mlflow.register_model(model_uri, name, tags=tags)
            log.info("registered %s version %s from %s", name, mv.version, model_uri)
        else:
            log.info("%s version %s is already registered for run %s; reusing it", name, mv.version, ctx.run_id)
        # A canary (release.canary_share > 0 over an existing champion) only gets the candidate alias: the champion
        # and previous aliases move when the canary verdict promotes it (tasks/release/canary.py).
        alias = "candidate" if cfg.release.canary_share > 0 and current and current["version"] != str(mv.version) \
            else "champion"
        if alias == "candidate":
            previous = current
            client.set_registered_model_alias(name, "candidate", mv.version)
        else:
            previous = previous_of(client, name, current, str(mv.version))
            client.set_registered_model_alias(name, "champion", mv.version)
    except RegistryUnavailable as exc:
        raise StepError(f"{where} unreachable, nothing registered and no alias moved: {exc}") from exc
    except MlflowException as exc:  # the server went away (or failed) part-way: the champion alias moves last
        done = (f"version {mv.version} registered, champion alias not moved" if mv is not None
                else "nothing registered and no alias moved")
        raise StepError(f"{where} failed during register_model ({done}; a rerun completes it): {exc}") from exc
    record_release(ctx, snapshot_id, str(mv.version))
    log.info("alias %s -> %s version %s (previous: %s)", alias, name, mv.version,
             f"version {previous['version']}" if previous else "none, this is the first release")
    return {"registered_model": name, "version": str(mv.version), "previous_version": previous and
            previous["version"], "adapter_uri": adapter_uri, "snapshot_id": snapshot_id, "alias": alias}


def previous_of(client, name: str, current: dict | None, version: str) -> dict | None:
    """The version released before ``version``; moves the `previous` alias to the champion it replaces.

    On a rerun the champion alias may already be on ``version`` (the first attempt got that far): the one before
    it is then the version the `previous` alias names, not the champion (that would report the release as its own
    predecessor), and no alias moves.
    """
    if current is None:
        return None
    if current["version"] != version:
        client.set_registered_model_alias(name, "previous", current["version"])
        return current
    before = by_alias(name, "previous")
    log.info("%s version %s is already the champion (a rerun); previous alias: %s", name, version,
             f"version {before['version']}" if before else "none")
    return before


def record_release(ctx: StepContext, snapshot_id: str, version: str) -> None:
    row = {"run_id": ctx.run_id, "snapshot_id": snapshot_id, "config_hash": ctx.config.section_hash(*TRAINING_SECTIONS),
           "registry_version": version, "registered_model": ctx.config.release.registered_model,
           "status": "registered"}
    with db.engine().begin() as conn:
        db.upsert(conn, schema.releases, row, keys=("run_id",))
