"""Fault: the MLflow tracking server (the model registry) is down during `register_model`.

The server is the real one the stack starts (tasks/devstack/stack.py `mlflow_up`); the test SIGKILLs its process group
and starts it again. Two outages:
  a. down before the step starts: the step fails within its retry budget, naming the registry, nothing registered;
  b. killed in the middle of the step (after it created the candidate's logged model, while it uploads the pyfunc
     model): the step fails the same way; no version for the run, the `champion` alias still on the old version.
Once the server is back, a rerun registers exactly one version for the run and moves the aliases
(champion -> new, previous -> old); one more rerun registers nothing new.

The step's MLflow client gets MLFLOW_HTTP_REQUEST_MAX_RETRIES=3 (about 15 s of retrying) so an outage fails in
seconds here; with MLflow's default of 7 the same failure comes after about 4 minutes of retries.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from tasks.config import load_config
from tasks.devstack import stack
from tests.chaos.faults_pipeline import StepProcess, kill_group, make_snapshot, wait_until
from tests.conftest import SETTINGS, run_step, step_manifest

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

FAST_FAIL = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3"}


@pytest.fixture
def mlflow_restored(mlflow_server):
    """Whatever the test does to the server, it is up again afterwards for the rest of the session."""
    yield mlflow_server
    stack.mlflow_up(SETTINGS)


def versions(client, name: str) -> list:
    return sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))


def test_registry_down_fails_closed_and_rerun_registers_once(mlflow_restored, tiny_base_model, uid):
    from mlflow.tracking import MlflowClient

    name = f"chaos-registry-{uid}"
    prep = make_snapshot(f"chaos-reg-{uid}", rows=160)
    tune = step_manifest("finetune", f"reg-{uid}", "--set", f"model.base_model={tiny_base_model}", "--set",
                         "training.max_steps=2", "--input", f"snapshot_uri={prep['snapshot_uri']}")

    def register_args(run_id):
        return ["--set", f"release.registered_model={name}", "--set", f"model.base_model={tiny_base_model}",
                "--input", f"adapter_uri={tune['adapter_uri']}", "--input", f"mlflow_run_id={tune['mlflow_run_id']}",
                "--input", f"snapshot_id={prep['snapshot_id']}", "--input", "decision_id=0"]

    # A champion to protect: run r0 registered while the server is up.
    first = step_manifest("register_model", f"r0-{uid}", *register_args(f"r0-{uid}"))
    client = MlflowClient()
    assert first["version"] == "1" and client.get_model_version_by_alias(name, "champion").version == "1"
    run_id, env = f"r1-{uid}", {**os.environ, **FAST_FAIL}
    uri = os.environ["MLFLOW_TRACKING_URI"]

    # a. Down before the step starts.
    kill_group(stack.MLFLOW)
    t0 = time.monotonic()
    down = StepProcess("register_model", run_id, register_args(run_id), env=env).wait()
    t_down = time.monotonic() - t0
    assert down.returncode == 2 and down.stdout == "", down.stderr[-3000:]
    assert "model registry" in down.stderr and uri in down.stderr and "no alias moved" in down.stderr
    assert "Traceback" not in down.stderr
    stack.mlflow_up(SETTINGS)
    assert [v.version for v in versions(client, name)] == ["1"]
    assert client.get_model_version_by_alias(name, "champion").version == "1"

    # b. Killed mid-step: as soon as the step has created the candidate's logged model (the pyfunc upload follows).
    exp = client.get_experiment_by_name(load_config().pipeline.mlflow_experiment)
    before = {m.model_id for m in client.search_logged_models([exp.experiment_id])}
    t0 = time.monotonic()
    proc = StepProcess("register_model", run_id, register_args(run_id), env=env)
    wait_until(lambda: {m.model_id for m in client.search_logged_models([exp.experiment_id])} - before,
               "register_model to start logging the candidate", 300, every=0.2)
    kill_group(stack.MLFLOW)
    mid = proc.wait()
    t_mid = time.monotonic() - t0
    assert mid.returncode == 2 and mid.stdout == "", mid.stderr[-3000:]
    assert "model registry" in mid.stderr and uri in mid.stderr and "no alias moved" in mid.stderr
    assert "Traceback" not in mid.stderr
    stack.mlflow_up(SETTINGS)
    assert [v.version for v in versions(client, name)] == ["1"]  # nothing registered for r1
    assert client.get_model_version_by_alias(name, "champion").version == "1"

    # Back up: the rerun registers exactly one version, moves champion and keeps the old one as previous.
    t0 = time.monotonic()
    again = json.loads(run_step("register_model", run_id, *register_args(run_id)).stdout.splitlines()[-1])
    t_rerun = time.monotonic() - t0
    assert again["version"] == "2" and again["previous_version"] == "1"
    vs = versions(client, name)
    assert [v.version for v in vs] == ["1", "2"] and [v.tags["ecb.run_id"] for v in vs] == [f"r0-{uid}", run_id]
    assert client.get_model_version_by_alias(name, "champion").version == "2"
    assert client.get_model_version_by_alias(name, "previous").version == "1"
    once_more = json.loads(run_step("register_model", run_id, *register_args(run_id)).stdout.splitlines()[-1])
    assert once_more["version"] == "2" and len(versions(client, name)) == 2
    print(f"\nREGISTRY-DOWN: 2 outages (before the step, mid-step), both failed closed (exit 2, {t_down:.0f}s and "
          f"{t_mid:.0f}s), champion stayed on v1; rerun registered exactly one version (v2) in {t_rerun:.0f}s")
    for r in (down, mid):
        print("  " + next(line for line in r.stderr.splitlines() if "step register_model failed" in line)[:300])
