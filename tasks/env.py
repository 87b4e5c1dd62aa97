"""Every environment variable the container side reads, in one table: secrets, endpoints, paths and build provenance.

Behaviour lives in the typed config (tasks/config.py, listed by ``ecb config``); the environment only says where
things are and what the credentials are. ``ecb config --env`` prints this table. Reading a name that is not in it
raises, so the table stays complete:

    env.get("MLFLOW_TRACKING_URI")                 # '' when unset
    env.require("ECB_OPTUNA_DB_URL", "HPO needs the Postgres optuna database")   # StepError when unset
    env.child({"ECB_CONFIG": path})                 # this environment + extra, for a subprocess
    previous = env.export(stack_env); ...; env.export(previous)   # set (None: unset) and restore
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tasks.errors import StepError

SECRET, ENDPOINT, PATH, BUILD = "secret", "endpoint", "path", "build"
KINDS = {SECRET: "credential: never logged, and no published file may contain its value",
         ENDPOINT: "where a service is, or which one to use",
         PATH: "a file, folder or search path",
         BUILD: "provenance written into the image when it is built"}


@dataclass(frozen=True)
class Var:
    kind: str
    help: str


VARS: dict[str, Var] = {
    # --- secrets
    "AWS_ACCESS_KEY_ID": Var(SECRET, "S3 access key (SeaweedFS locally, AWS in production)."),
    "AWS_SECRET_ACCESS_KEY": Var(SECRET, "S3 secret key."),
    "AWS_SESSION_TOKEN": Var(SECRET, "Temporary AWS credentials' session token (read by boto3; scanned before a "
                                     "Hub push)."),
    "ECB_RESULTS_DB_URL": Var(SECRET, "postgresql:// URL of the platform results database (holds its password)."),
    "ECB_OPTUNA_DB_URL": Var(SECRET, "postgresql:// URL of the Optuna database used by HPO (holds its password)."),
    "ECB_POSTGRES_URL": Var(SECRET, "Dev stack: an external PostgreSQL server URL without database name, instead of "
                                    "the embedded one."),
    "ECB_CHAT_ADMIN_TOKEN": Var(SECRET, "Bearer token of the chat service's /admin endpoints (deploy sends it)."),
    "ECB_CHAT_API_KEYS": Var(SECRET, "API keys of the chat service's OpenAI-compatible /v1 API, comma-separated "
                                     "(clients send one as a Bearer token)."),
    "HF_TOKEN": Var(SECRET, "Hugging Face token for push_to_hub (unset: the push is skipped)."),
    "HUGGING_FACE_HUB_TOKEN": Var(SECRET, "Legacy name of the Hugging Face token (scanned before a Hub push)."),
    "AIRFLOW__CORE__FERNET_KEY": Var(SECRET, "Airflow's Fernet key (scanned before a Hub push)."),
    "AIRFLOW__API_AUTH__JWT_SECRET": Var(SECRET, "Airflow's JWT secret (scanned before a Hub push)."),
    # --- endpoints
    "ECB_S3_ENDPOINT_URL": Var(ENDPOINT, "S3 endpoint URL (unset or empty: real AWS)."),
    "AWS_DEFAULT_REGION": Var(ENDPOINT, "S3 region (default us-east-1)."),
    "MLFLOW_TRACKING_URI": Var(ENDPOINT, "MLflow tracking server (unset: steps log nothing to MLflow)."),
    "HF_ENDPOINT": Var(ENDPOINT, "Hugging Face Hub endpoint (a private mirror or a test server)."),
    "HF_HUB_OFFLINE": Var(ENDPOINT, "1: never contact the Hugging Face Hub, use the local cache only."),
    "ECB_USE_AWS": Var(ENDPOINT, "Dev stack: 1 = use real AWS S3 instead of the embedded SeaweedFS."),
    "ECB_AIRFLOW_PORT": Var(ENDPOINT, "Dev stack: port of the Airflow api-server (default 8080)."),
    "ECB_STACK_MANAGED": Var(ENDPOINT, "Set to 1 by the dev stack for the processes it starts: the endpoints in their "
                                       "environment are the stack's own, not external services."),
    # --- paths
    "ECB_CONFIG": Var(PATH, "Config YAML file(s): one path, or several joined by ':' (later ones override "
                            "earlier ones); default include/config/default.yaml."),
    "ECB_STATE_DIR": Var(PATH, "Dev stack state folder: data, logs, pid files, stack.env (default <repo>/.ecb)."),
    "ECB_MODEL_CACHE": Var(PATH, "Where s3:// and .gguf base models are synced or converted to when "
                                 "model.cache_dir is empty (default ~/.cache/ecb/models)."),
    "PATH": Var(PATH, "Executable search path; the dev stack puts this virtualenv's bin first for its processes."),
    "PYTHONPATH": Var(PATH, "Module search path; the dev stack puts the repository first for its processes."),
    # --- build
    "ECB_GIT_COMMIT": Var(BUILD, "Commit the image was built from (Dockerfile.gpu); used when git is not available."),
}


def _var(name: str) -> Var:
    try:
        return VARS[name]
    except KeyError:
        raise LookupError(f"environment variable {name} is not registered in tasks/env.py: behaviour belongs in "
                          "the config (tasks/config.py); register secrets, endpoints and paths") from None


def get(name: str, default: str = "") -> str:
    """The variable's value, stripped of surrounding blanks; ``default`` when unset or empty."""
    _var(name)
    return os.environ.get(name, "").strip() or default


def require(name: str, why: str) -> str:
    """The variable's value; a StepError saying why it is needed when unset or empty."""
    value = get(name)
    if not value:
        raise StepError(f"{name} is not set: {why}")
    return value


def secret_values() -> list[str]:
    """Values of every set secret, for scanners that must keep them out of published files."""
    return [v for name, var in VARS.items() if var.kind == SECRET and (v := get(name))]


def child(extra: dict[str, str] | None = None) -> dict[str, str]:
    """A subprocess environment: all of this one (including names this table does not know) plus ``extra``."""
    return {**os.environ, **(extra or {})}


def export(mapping: dict[str, str | None]) -> dict[str, str | None]:
    """Set this process's environment (None unsets a name), for the dev CLI and the stack; returns the previous
    values in the same form, so ``export(previous)`` restores them. Names are not checked against the table: the
    stack also exports Airflow's and MLflow's own settings for the processes it starts."""
    previous = {k: os.environ.get(k) for k in mapping}
    for k, v in mapping.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    return previous
