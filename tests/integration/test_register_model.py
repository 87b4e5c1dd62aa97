"""register_model against a real MLflow server: versions, aliases and the manifest's previous_version on reruns.

A rerun of the step for a run whose version is already the champion (the first attempt moved the alias, then the
task was retried or cleared) must reuse the version, move no alias and report as previous_version the version the
`previous` alias names, never the release itself. The candidate is a small fake adapter on S3: the step logs it as a
pyfunc model without loading it, so no fine-tune is needed.
"""

from __future__ import annotations

import pytest

from tasks.config import load_config
from tasks.io import s3
from tests.conftest import step_manifest

pytestmark = pytest.mark.integration

ADAPTER = {"adapter_config.json": b'{"peft_type": "LORA", "r": 4}', "adapter_model.safetensors": b"\0" * 64}


def candidate(client, uid: str, run_id: str) -> list[str]:
    """A fake adapter on S3 and an MLflow run for it; returns the step's arguments."""
    cfg = load_config()
    s3.ensure_bucket(cfg.storage.bucket)
    adapter_uri = f"s3://{cfg.storage.bucket}/tests/register-{uid}/{run_id}/adapter"
    for name, data in ADAPTER.items():
        s3.put_bytes(f"{adapter_uri}/{name}", data)
    exp = client.get_experiment_by_name(cfg.pipeline.mlflow_experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(cfg.pipeline.mlflow_experiment)
    mlflow_run = client.create_run(exp_id, run_name=f"finetune-{run_id}").info.run_id
    return ["--set", f"release.registered_model=ecb-register-{uid}", "--input", f"adapter_uri={adapter_uri}",
            "--input", f"mlflow_run_id={mlflow_run}", "--input", f"snapshot_id=snap-{uid}",
            "--input", f"decision_id={len(run_id)}"]


def aliases(client, name: str) -> dict[str, str]:
    return {alias: str(version) for alias, version in client.get_registered_model(name).aliases.items()}


def test_rerun_reuses_the_version_and_reports_the_previous_alias(services, mlflow_server, uid):
    from mlflow.tracking import MlflowClient

    client, name = MlflowClient(), f"ecb-register-{uid}"
    first_run, second_run = f"reg-a-{uid}", f"reg-b-{uid}"
    args_a, args_b = candidate(client, uid, first_run), candidate(client, uid, second_run)

    first = step_manifest("register_model", first_run, *args_a)
    assert (first["version"], first["previous_version"]) == ("1", None)
    # rerun of the first release: still its own champion, there is nothing before it
    again = step_manifest("register_model", first_run, *args_a)
    assert (again["version"], again["previous_version"]) == ("1", None)
    assert aliases(client, name) == {"champion": "1"}

    second = step_manifest("register_model", second_run, *args_b)
    assert (second["version"], second["previous_version"]) == ("2", "1")
    assert aliases(client, name) == {"champion": "2", "previous": "1"}

    # rerun after the champion alias already moved to version 2: previous is what the `previous` alias names
    rerun = step_manifest("register_model", second_run, *args_b)
    assert (rerun["version"], rerun["previous_version"]) == ("2", "1")
    assert aliases(client, name) == {"champion": "2", "previous": "1"}
    versions = client.search_model_versions(f"name = '{name}'")
    assert sorted((v.version, v.tags["ecb.run_id"]) for v in versions) == [("1", first_run), ("2", second_run)]
