"""The step command, whatever runs it: ``python -m tasks <step> --run-id R --set ... --input ...``.

A leaf of ``ecb_airflow`` (it imports no sibling): the argv, the manifest the step prints, and the environment
built from Airflow connections, shared by the local, Docker and Kubernetes executions.
"""

from __future__ import annotations

import json
import sys

from tasks.config import iter_fields

# Airflow connection ids that become step environment (skipped when the connection is not defined).
CONNECTIONS = ("aws_default", "ecb_results", "mlflow_default", "huggingface_default", "ecb_chat_api")
CONFIG_FIELDS = tuple(name for name, _, _ in iter_fields())
# Set on every command Airflow builds: the task log stamps every line already.
AIRFLOW_SETTINGS = {"pipeline.log_timestamps": False}


def _input_value(value) -> str:
    # A whole upstream manifest (an XComArg resolves to the dict) goes as JSON, the way steps read it.
    return json.dumps(value) if isinstance(value, (dict, list)) else f"{value}"


def build_command(step_name: str, run_id: str, params: dict, inputs: dict, overrides: dict | None = None) -> list[str]:
    """argv of the step command: config params of the run as --set, upstream values as --input."""
    argv = [sys.executable, "-m", "tasks", step_name, "--run-id", run_id]
    for name, value in AIRFLOW_SETTINGS.items():
        argv += ["--set", f"{name}={json.dumps(value)}"]
    # Form fields and any other config field given in the run's conf JSON ("section.field": value).
    for name in CONFIG_FIELDS:
        if name in params:
            argv += ["--set", f"{name}={json.dumps(params[name])}"]
    for name, value in (overrides or {}).items():
        argv += ["--set", f"{name}={json.dumps(value)}"]
    for key, value in inputs.items():
        argv += ["--input", f"{key}={_input_value(value)}"]
    return argv


def parse_manifest(lines: list[str]) -> dict:
    """The manifest is the last stdout line that is a JSON object."""
    for line in reversed(lines):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise ValueError("the step printed no JSON manifest")


def conn_env() -> dict[str, str]:
    """Step environment from the worker's Airflow connections, read when the task runs (never at parse time)."""
    from airflow.sdk import BaseHook

    env: dict[str, str] = {}
    for conn_id in CONNECTIONS:
        try:
            conn = BaseHook.get_connection(conn_id)
        except Exception:  # noqa: S112 - an undefined connection means "use the worker's environment"
            continue
        extra = conn.extra_dejson
        if conn_id == "aws_default":
            env.update({"AWS_ACCESS_KEY_ID": conn.login or "", "AWS_SECRET_ACCESS_KEY": conn.password or "",
                        "AWS_DEFAULT_REGION": extra.get("region_name", "us-east-1"),
                        "ECB_S3_ENDPOINT_URL": extra.get("endpoint_url", "")})
        elif conn_id == "ecb_results":
            env["ECB_RESULTS_DB_URL"] = conn.get_uri().replace("postgres://", "postgresql://", 1)
        elif conn_id == "mlflow_default":
            env["MLFLOW_TRACKING_URI"] = conn.host if "://" in (conn.host or "") else conn.get_uri()
        elif conn_id == "huggingface_default":  # token in the password; optional endpoint in extra
            env["HF_TOKEN"] = conn.password or ""
            if extra.get("endpoint"):
                env["HF_ENDPOINT"] = extra["endpoint"]
        elif conn_id == "ecb_chat_api":  # the chat service's /v1 API keys (comma-separated) in the password
            env["ECB_CHAT_API_KEYS"] = conn.password or ""
    return {k: v for k, v in env.items() if v is not None}

