"""One mechanism for every ML step: build the task that runs ``python -m tasks <step>``.

The DAG names steps; this module decides how they execute: a ``local`` subprocess, or (``ecb_airflow.execution``)
a Docker container or Kubernetes pod of the step image, chosen by configuration with no change to the DAG.
Settings reach the step as environment built from Airflow connections, so no secret is ever in a command line, a
template or a log. The step's JSON manifest (its last stdout line) becomes the XCom.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from datetime import timedelta

from airflow.sdk import BaseOperator, Context

from ecb_airflow.execution import container_operator
from tasks.config import iter_fields, load_config

# Airflow connection id -> how it becomes step environment (None when the connection is not defined).
CONNECTIONS = ("aws_default", "ecb_results", "mlflow_default", "huggingface_default")


CONFIG_FIELDS = tuple(name for name, _, _ in iter_fields())


def from_step(task_id: str, key: str) -> str:
    """A Jinja reference to one field of an upstream step's manifest (rendered at run time)."""
    return "{{ ti.xcom_pull(task_ids='%s')['%s'] }}" % (task_id, key)


def config_params() -> dict[str, tuple]:
    """Config fields shown on the trigger form: dotted name -> (default from the YAML config, help, field type)."""
    defaults = load_config()
    out = {}
    for name, f, typ in iter_fields():
        if f.metadata.get("param"):
            section, attr = name.split(".")
            out[name] = (getattr(getattr(defaults, section), attr), f.metadata["help"], typ)
    return out


def _conn_env() -> dict[str, str]:
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
    return {k: v for k, v in env.items() if v is not None}


def step_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(_conn_env())
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["ECB_LOG_TIMESTAMPS"] = "0"  # the task log stamps every line already
    return env


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


def build_command(step_name: str, run_id: str, params: dict, inputs: dict, overrides: dict | None = None) -> list[str]:
    """argv of the step command: config params of the run as --set, upstream values as --input."""
    argv = [sys.executable, "-m", "tasks", step_name, "--run-id", run_id]
    # Form fields and any other config field given in the run's conf JSON ("section.field": value).
    for name in CONFIG_FIELDS:
        if name in params:
            argv += ["--set", f"{name}={json.dumps(params[name])}"]
    for name, value in (overrides or {}).items():
        argv += ["--set", f"{name}={json.dumps(value)}"]
    for key, value in inputs.items():
        argv += ["--input", f"{key}={value}"]
    return argv


def _watch_supervisor(proc: subprocess.Popen, supervisor: int, done: threading.Event) -> None:
    """Kill the step as soon as this task process loses its Airflow supervisor (the scheduler or worker holding it
    was killed): the task runs in its own process group, so it outlives them, and the new scheduler retries the
    task; the step must not run on beside that retry until it next prints a line and hits the closed log socket."""
    while not done.wait(0.5):
        if os.getppid() != supervisor:
            proc.kill()
            return


def run_command(argv: list[str], log, timeout: timedelta | None, extra_env: dict | None = None) -> dict:
    """Run a step command, stream its output into the task log, return its manifest; raise on failure."""
    step_name = argv[3]
    log.info("Running step %s: %s", step_name, " ".join(argv[1:]))
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**step_env(), **(extra_env or {})}, bufsize=1, errors="replace")
    lines: list[str] = []
    timer = threading.Timer(timeout.total_seconds() if timeout else 1e9, proc.kill)
    timer.start()
    done = threading.Event()
    threading.Thread(target=_watch_supervisor, args=(proc, os.getppid(), done), daemon=True).start()
    try:
        for line in proc.stdout:
            lines.append(line)
            log.info("%s", line.rstrip("\n"))
        rc = proc.wait()
    finally:
        done.set()
        timer.cancel()
        if proc.poll() is None:  # the task itself was killed: do not leave the step running
            proc.kill()
    if rc != 0:
        raise RuntimeError(f"step {step_name} exited with code {rc} after {time.monotonic() - started:.1f}s; "
                           f"see the lines above for the reason")
    manifest = parse_manifest(lines[-20:])
    log.info("Step %s finished in %.1fs; manifest: %s", step_name, time.monotonic() - started,
             json.dumps(manifest, sort_keys=True))
    return manifest


class LocalStepOperator(BaseOperator):
    """Run a step command as a subprocess of the worker, streaming its output into the task log."""

    template_fields = ("inputs", "overrides")
    ui_color = "#dbeafe"

    def __init__(self, *, step: str, inputs: dict | None = None, overrides: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        self.step = step
        self.inputs = inputs or {}
        self.overrides = overrides or {}

    def command(self, run_id: str, params: dict) -> list[str]:
        return build_command(self.step, run_id, params, self.inputs, self.overrides)

    def execute(self, context: Context) -> dict:
        return run_command(self.command(context["run_id"], dict(context["params"])), self.log,
                           self.execution_timeout)


def _operator(step_name: str, gpu: bool) -> tuple[type, dict]:
    """The operator class for the configured execution mode and the arguments that mode adds."""
    return container_operator(step_name, gpu) or (LocalStepOperator, {})


def step(step_name: str, *, task_id: str | None = None, inputs: dict | None = None, gpu: bool = False,
         timeout: timedelta | None = None, **kwargs) -> BaseOperator:
    """The single factory the DAG uses for every step. GPU steps take a slot from the ``gpu`` pool."""
    if gpu:
        kwargs.setdefault("pool", "gpu")
    cls, extra = _operator(step_name, gpu)
    return cls(task_id=task_id or step_name, step=step_name, inputs=inputs, execution_timeout=timeout,
               **{**extra, **kwargs})


def mapped_step(step_name: str, expand_inputs, *, task_id: str | None = None, gpu: bool = False,
                timeout: timedelta | None = None, **kwargs):
    """The same step, dynamically mapped: one task instance per element (a dict of inputs) of expand_inputs."""
    if gpu:
        kwargs.setdefault("pool", "gpu")
    cls, extra = _operator(step_name, gpu)
    return cls.partial(task_id=task_id or step_name, step=step_name, execution_timeout=timeout,
                       **{**extra, **kwargs}).expand(inputs=expand_inputs)
