"""One mechanism for every ML step: build the task that runs ``python -m tasks <step>``.

The DAG names steps; this module decides how they execute: a ``local`` subprocess (here), or a Docker container
(``docker_step``) or Kubernetes pod (``k8s_step``) of the step image, as ``execution.settings()`` says, with no change
to the DAG. Settings reach the step as environment built from Airflow connections, so no secret is ever in a command
line, a template or a log. The step's JSON manifest (its last stdout line) becomes the XCom, and each of its fields
its own XCom too (``task.output["key"]``).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from datetime import timedelta

from airflow.sdk import BaseOperator, Context

from ecb_airflow.command import build_command, conn_env, parse_manifest
from ecb_airflow.execution import container_kwargs, gpus_for, settings
from ecb_airflow.step_operator import StepOperator


def step_env() -> dict[str, str]:
    """Environment of a local step subprocess: the worker's, then its Airflow connections."""
    env = dict(os.environ)
    env.update(conn_env())
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


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


class LocalStepOperator(StepOperator):
    """Run a step command as a subprocess of the worker, streaming its output into the task log."""

    ui_color = "#dbeafe"

    def command(self, run_id: str, params: dict) -> list[str]:
        return build_command(self.step, run_id, params, self.inputs, self.overrides)

    def execute(self, context: Context) -> dict:
        return run_command(self.command(context["run_id"], dict(context["params"])), self.log,
                           self.execution_timeout)


def _operator(step_name: str, gpu: bool) -> tuple[type, dict]:
    """The operator class for the execution mode in force and the arguments that mode adds. The container
    modules are imported only here, so local mode never loads the Docker or Kubernetes provider."""
    ex = settings()
    if ex.mode == "local":
        return LocalStepOperator, {}
    gpus = gpus_for(step_name, gpu, ex)
    if ex.mode == "docker":
        from ecb_airflow import docker_step

        cls, mode_kwargs = docker_step.DockerStepOperator, docker_step.docker_kwargs(step_name, gpus, ex)
    else:
        from ecb_airflow import k8s_step

        cls, mode_kwargs = k8s_step.KubernetesStepOperator, k8s_step.pod_kwargs(step_name, gpus, ex)
    return cls, {**container_kwargs(gpus, ex), **mode_kwargs}


def step(step_name: str, *, task_id: str | None = None, inputs: dict | None = None, gpu: bool = False,
         **kwargs) -> BaseOperator:
    """The single factory the DAG uses for every step. GPU steps take a slot from the ``gpu`` pool; the timeout
    and retries come from the DAG's default_args."""
    if gpu:
        kwargs.setdefault("pool", "gpu")
    cls, extra = _operator(step_name, gpu)
    return cls(task_id=task_id or step_name, step=step_name, inputs=inputs, **{**extra, **kwargs})


def mapped_step(step_name: str, expand_inputs, *, task_id: str | None = None, gpu: bool = False, **kwargs):
    """The same step, dynamically mapped: one task instance per element (a dict of inputs) of expand_inputs."""
    if gpu:
        kwargs.setdefault("pool", "gpu")
    cls, extra = _operator(step_name, gpu)
    return cls.partial(task_id=task_id or step_name, step=step_name, **{**extra, **kwargs}).expand(
        inputs=expand_inputs)
