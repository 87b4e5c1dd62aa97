"""MLflow Model Registry client: who is the champion, and logging a candidate as a pyfunc model.

A registered version carries its lineage as tags (pipeline run, dataset snapshot, gate decision, git commit,
adapter location, base model). Aliases: ``champion`` is the serving model; ``previous`` keeps the one before it
reachable for a rollback. Registering is idempotent: a version tagged with the same run id is reused.
"""

from __future__ import annotations

import json
import logging
import subprocess
import tempfile
from pathlib import Path

from tasks import env
from tasks.io import s3, tracking

log = logging.getLogger("tasks.release.registry")


class RegistryUnavailable(RuntimeError):
    pass


def registry_client():
    if not tracking.enabled():
        raise RegistryUnavailable("MLFLOW_TRACKING_URI is not set")
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def serving_uri(cfg) -> str:
    """The model the chat service serves: chat.model_uri, or the champion alias of release.registered_model."""
    return cfg.chat.model_uri or f"models:/{cfg.release.registered_model}@champion"


def version_info(mv) -> dict:
    tags = mv.tags or {}
    return {"version": str(mv.version), "run_id": tags.get("ecb.run_id"), "adapter_uri": tags.get("adapter_uri"),
            "snapshot_id": tags.get("snapshot_id"), "base_model": tags.get("base_model")}


def champion(name: str) -> dict | None:
    """The version behind the `champion` alias, None when there is none; RegistryUnavailable when the registry
    cannot be asked (the gate then fails closed)."""
    return by_alias(name, "champion")


def by_alias(name: str, alias: str) -> dict | None:
    """The version behind ``alias`` of registered model ``name`` (version_info), None when the model or the alias
    does not exist; RegistryUnavailable when the registry cannot be asked."""
    from mlflow.exceptions import MlflowException

    try:
        client = registry_client()
        return version_info(client.get_model_version_by_alias(name, alias))
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise RegistryUnavailable(str(exc)) from exc
    except (OSError, ConnectionError) as exc:
        raise RegistryUnavailable(str(exc)) from exc


def git_commit() -> str:
    """The commit of this checkout; in an image (no .git, maybe no git) the one it was built from (ECB_GIT_COMMIT)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head = ""
    # git installed but no repository (an image built without .git) prints nothing: fall back to the build arg too
    return head or env.get("ECB_GIT_COMMIT") or "unknown"


def version_of_run(client, name: str, run_id: str):
    for mv in client.search_model_versions(f"name = {tracking.filter_literal(name, 'registered model name')}"):
        if (mv.tags or {}).get("ecb.run_id") == run_id:
            return mv
    return None


def log_candidate(mlflow_run_id: str, adapter_uri: str, cfg) -> str:
    """Log the adapter + tokenizer + resolved config as an MLflow pyfunc model with a signature; returns its URI."""
    import mlflow
    from mlflow.models import infer_signature

    from tasks.release.pyfunc import ChatbotModel

    example = {"messages": [json.dumps([{"role": "user", "content": "Where is my order {{Order Number}}?"}])]}
    signature = infer_signature(example, ["Your order ships today."])
    with tempfile.TemporaryDirectory() as tmp:
        s3.download_prefix(adapter_uri, tmp)
        with mlflow.start_run(run_id=mlflow_run_id):
            # Signature only: an input example would make MLflow load the model and run it just to validate.
            info = mlflow.pyfunc.log_model(name="chatbot", python_model=ChatbotModel(), artifacts={"adapter": tmp},
                                           signature=signature,
                                           code_paths=[str(Path(__file__).resolve().parents[1])],  # the tasks package
                                           model_config={"base_model": cfg.model.base_model,
                                                         "max_new_tokens": cfg.eval.max_new_tokens})
    return info.model_uri


# --- aliases of a release: champion (serving), candidate (the canary beside it), previous (the one before) ---------
CANARY_SHARE_TAG = "ecb.canary_share"  # on the candidate version: the share of conversations it gets


def _registry_call(fn, *args):
    """Run a registry call; RegistryUnavailable when the registry cannot be asked."""
    from mlflow.exceptions import MlflowException

    try:
        return fn(registry_client(), *args)
    except MlflowException as exc:
        raise RegistryUnavailable(str(exc)) from exc
    except (OSError, ConnectionError) as exc:
        raise RegistryUnavailable(str(exc)) from exc


def aliases(name: str) -> dict[str, str]:
    """{alias: version} of registered model ``name`` ({} when the model does not exist)."""
    from mlflow.exceptions import MlflowException

    def read(client):
        try:
            return {a: str(v) for a, v in (client.get_registered_model(name).aliases or {}).items()}
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return {}
            raise

    return _registry_call(read)


def set_alias(name: str, alias: str, version: str) -> None:
    _registry_call(lambda c: c.set_registered_model_alias(name, alias, str(version)))


def delete_alias(name: str, alias: str) -> bool:
    """Remove ``alias``; False when it was not set (idempotent)."""
    if alias not in aliases(name):
        return False
    _registry_call(lambda c: c.delete_registered_model_alias(name, alias))
    return True


def version_tags(name: str, version: str) -> dict | None:
    """Tags of one registered version; None when the version does not exist."""
    from mlflow.exceptions import MlflowException

    def read(client):
        try:
            return dict(client.get_model_version(name, str(version)).tags or {})
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise

    return _registry_call(read)


def set_version_tag(name: str, version: str, key: str, value: str) -> None:
    _registry_call(lambda c: c.set_model_version_tag(name, str(version), key, value))


def delete_version_tag(name: str, version: str, key: str) -> bool:
    """Remove tag ``key`` of one version; False when it was not set (idempotent)."""
    if key not in (version_tags(name, version) or {}):
        return False
    _registry_call(lambda c: c.delete_model_version_tag(name, str(version), key))
    return True
