"""MLflow Model Registry: who is the champion, and registering a released candidate.

    python -m tasks register_model --run-id R --input adapter_uri=s3://... --input decision_id=N ...

A registered version carries its lineage as tags (pipeline run, dataset snapshot, gate decision, git commit,
adapter location, base model). Aliases: ``champion`` is the serving model; ``previous`` keeps the one before it
reachable for a rollback. Registering is idempotent: a version tagged with the same run id is reused.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
from pathlib import Path

from tasks import s3, tracking
from tasks.runner import StepContext, StepError

log = logging.getLogger("tasks.registry")


class RegistryUnavailable(RuntimeError):
    pass


def _client():
    if not tracking.enabled():
        raise RegistryUnavailable("MLFLOW_TRACKING_URI is not set")
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def version_info(mv) -> dict:
    tags = mv.tags or {}
    return {"version": str(mv.version), "run_id": tags.get("ecb.run_id"), "adapter_uri": tags.get("adapter_uri"),
            "snapshot_id": tags.get("snapshot_id"), "base_model": tags.get("base_model")}


def champion(name: str) -> dict | None:
    """The version behind the `champion` alias, None when there is none; RegistryUnavailable when the registry
    cannot be asked (the gate then fails closed)."""
    from mlflow.exceptions import MlflowException

    try:
        client = _client()
        return version_info(client.get_model_version_by_alias(name, "champion"))
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise RegistryUnavailable(str(exc)) from exc
    except (OSError, ConnectionError) as exc:
        raise RegistryUnavailable(str(exc)) from exc


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("ECB_GIT_COMMIT", "unknown")


def _existing_version(client, name: str, run_id: str):
    for mv in client.search_model_versions(f"name = '{name}'"):
        if (mv.tags or {}).get("ecb.run_id") == run_id:
            return mv
    return None


def log_candidate(mlflow_run_id: str, adapter_uri: str, cfg) -> str:
    """Log the adapter + tokenizer + resolved config as an MLflow pyfunc model with a signature; returns its URI."""
    import mlflow
    from mlflow.models import infer_signature

    from tasks.serving_model import ChatbotModel

    example = {"messages": [json.dumps([{"role": "user", "content": "Where is my order {{Order Number}}?"}])]}
    signature = infer_signature(example, ["Your order ships today."])
    with tempfile.TemporaryDirectory() as tmp:
        s3.download_prefix(adapter_uri, tmp)
        with mlflow.start_run(run_id=mlflow_run_id):
            # Signature only: an input example would make MLflow load the model and run it just to validate.
            info = mlflow.pyfunc.log_model(name="chatbot", python_model=ChatbotModel(), artifacts={"adapter": tmp},
                                           signature=signature,
                                           code_paths=[str(Path(__file__).resolve().parent)],
                                           model_config={"base_model": cfg.model.base_model,
                                                         "max_new_tokens": cfg.eval.max_new_tokens})
    return info.model_uri


def run(ctx: StepContext) -> dict:
    cfg = ctx.config
    name = cfg.release.registered_model
    adapter_uri, decision_id = ctx.require_input("adapter_uri"), ctx.require_input("decision_id")
    snapshot_id, mlflow_run = ctx.require_input("snapshot_id"), ctx.inputs.get("mlflow_run_id")
    from mlflow.exceptions import MlflowException

    where, mv = f"model registry (MLflow at {os.environ.get('MLFLOW_TRACKING_URI')})", None
    try:
        client = _client()
        previous = champion(name)
        mv = _existing_version(client, name, ctx.run_id)
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
    from tasks import db, schema
    from tasks.config import TRAINING_SECTIONS

    row = {"run_id": ctx.run_id, "snapshot_id": snapshot_id, "config_hash": ctx.config.section_hash(*TRAINING_SECTIONS),
           "registry_version": version, "status": "registered"}
    with db.engine().begin() as conn:
        db.upsert(conn, schema.releases, row, keys=("run_id",))
