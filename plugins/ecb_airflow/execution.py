"""Where a step runs: one step definition becomes a local subprocess, a Docker container or a Kubernetes pod.

The mode comes from ``$ECB_EXECUTION_MODE``, else the Airflow Variable ``ecb_execution`` (a JSON object of
``execution.*`` fields, e.g. ``{"mode": "kubernetes", "image": "registry.example/ecb-gpu:1.4"}``), else the config
file; ``settings()`` is the one place that resolves it (``ecb_airflow.steps`` picks the operator class from it). The
Docker and Kubernetes providers are imported only when their mode is chosen, so parsing the DAG in local mode stays
as light as before.

The container contract is the same in both container modes: entrypoint ``python -m tasks``, arguments
``<step> --run-id R --set ... --input ...`` built when the task runs (as in local mode; plus ``--set execution.*``
for fields the Variable changed), environment = ``STEP_ENV`` and the mode (nothing secret) plus the names in
``SETTING_ENV`` and ``SECRET_ENV``. Docker gets their values from the worker's Airflow connections at run time,
outside every rendered field; Kubernetes from the ConfigMap and Secret named in the config, so the pod spec holds
names, never values. The step's JSON manifest becomes the XCom.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from ecb_airflow.command import build_command, conn_env
from tasks.config import ExecutionConfig, load_config

MODES = ("local", "docker", "kubernetes")
VARIABLE = "ecb_execution"
ENTRYPOINT = ("python", "-m", "tasks")
CACHE_DIR = "/cache"  # a volume in Dockerfile.gpu: model and Hugging Face caches outlive one step's container
STEP_UID = 1000  # the non-root user of Dockerfile.gpu
# Fixed, non-secret environment of every step container.
STEP_ENV = {"PYTHONUNBUFFERED": "1", "HF_HOME": f"{CACHE_DIR}/huggingface",
            "ECB_MODEL_CACHE": f"{CACHE_DIR}/ecb/models"}
# Settings a step reads (endpoints, region): the ConfigMap's keys in Kubernetes.
SETTING_ENV = ("ECB_S3_ENDPOINT_URL", "AWS_DEFAULT_REGION", "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL",
               "HF_ENDPOINT")
# Credentials a step reads: the Secret's keys in Kubernetes; in Docker, never in a template field.
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "ECB_RESULTS_DB_URL", "ECB_OPTUNA_DB_URL", "HF_TOKEN",
              "ECB_CHAT_ADMIN_TOKEN", "ECB_CHAT_API_KEYS")

_CACHE: dict = {}
_CACHE_S = 10.0  # one DAG parse asks once per step; a later parse sees a changed Variable


def _variable() -> dict:
    """The ``ecb_execution`` Variable as a dict ({} when unset). Outside a task or the DAG processor only the
    environment backend (AIRFLOW_VAR_ECB_EXECUTION) is asked, so a plain parse touches no database."""
    from airflow.sdk import Variable

    raw = Variable.get(VARIABLE, default=None)
    if not raw:
        return {}
    value = json.loads(raw) if isinstance(raw, str) else raw
    if not isinstance(value, dict):
        raise ValueError(f"Airflow Variable {VARIABLE} must be a JSON object of execution fields, got {raw!r}")
    return value


def settings() -> ExecutionConfig:
    """The execution settings in force: config file <- Variable ecb_execution <- $ECB_EXECUTION_MODE."""
    key = tuple(os.environ.get(k) for k in ("ECB_EXECUTION_MODE", "AIRFLOW_VAR_ECB_EXECUTION", "ECB_CONFIG"))
    hit = _CACHE.get(key)
    if hit and time.monotonic() - hit[0] < _CACHE_S:
        return hit[1]
    overrides = {f"execution.{name}": value for name, value in _variable().items()}
    if key[0]:
        overrides["execution.mode"] = key[0]
    ex = load_config(overrides=overrides).execution  # validates the mode and every other field
    _CACHE.clear()
    _CACHE[key] = (time.monotonic(), ex)
    return ex


def gpus_for(step_name: str, gpu: bool, ex: ExecutionConfig) -> int:
    return int(ex.step_gpus.get(step_name, ex.gpus_per_step)) if gpu else 0


def container_env(ex: ExecutionConfig) -> dict[str, str]:
    """The non-secret environment of a step container; the mode tells the deploy step how to roll out."""
    return {**STEP_ENV, "ECB_EXECUTION_MODE": ex.mode}


def changed_settings(ex: ExecutionConfig) -> dict:
    """execution.* values the Variable changed from the config file, passed on as ``--set`` so the step in its
    container resolves the same ones (the deploy step restarts the chat service they name)."""
    base = dataclasses.asdict(load_config().execution)
    return {f"execution.{k}": v for k, v in dataclasses.asdict(ex).items() if k != "mode" and v != base[k]}


def container_kwargs(gpus: int, ex: ExecutionConfig) -> dict:
    """Operator arguments both container modes add: the changed settings, and one ``gpu`` pool slot per device."""
    extra: dict = {"overrides": changed_settings(ex)}
    if gpus > 1:
        extra["pool_slots"] = gpus  # the gpu pool has one slot per device
    return extra


def step_arguments(step_name: str, context, inputs: dict, overrides: dict) -> list[str]:
    """Arguments after the ``python -m tasks`` entrypoint: exactly the local command's, from the run's params."""
    return build_command(step_name, context["run_id"], dict(context["params"]), inputs, overrides)[3:]


def run_time_env() -> dict[str, str]:
    """Values of the step settings and secrets for a container, read when the task runs: the worker's environment,
    then its Airflow connections (as in local mode)."""
    env = {name: os.environ[name] for name in (*SETTING_ENV, *SECRET_ENV) if os.environ.get(name)}
    env.update({name: value for name, value in conn_env().items() if value})
    return env
