"""push_to_hub on real Postgres rows: the card and ecb_release.json name the DAG run and the gate decision row.

The chat service's /api/model shows, for the model it serves, ``lineage.dag_run_id`` (the registered version's
``ecb.run_id`` tag, i.e. the step's --run-id) and ``lineage.gate_decision.id`` (the gate_decisions row). The step
assembles the card from the rows the pipeline wrote; here those rows are written directly, the Hub is the local test
server (tests/hub_server.py) and the S3 download is replaced by a copy of a small fake adapter. The Hub already has
a v5 from before a model registry reset, so the release goes up as v5-<8 hex> and the releases row says why.
"""

from __future__ import annotations

import json
import shutil

import huggingface_hub.constants
import pytest
from sqlalchemy import insert, select

from tasks.config import load_config
from tasks.context import StepContext
from tasks.io import db, schema
from tasks.release import hub as hub_lib
from tasks.steps import push_to_hub
from tests.hub_server import HubServer

pytestmark = pytest.mark.integration

TOKEN = "hf_test_meta_token_0123456789abcdef"
ADAPTER = {"adapter_config.json": b'{"peft_type": "LORA", "r": 4}', "adapter_model.safetensors": b"\1" * 64}


def write_rows(run_id: str, uid: str, status: str = "deployed") -> int:
    """The rows of a released run (snapshot, evaluation, gate decision, release with ``status``: ``deployed`` once
    it serves as the champion); returns the gate decision id."""
    snapshot_id = f"snap-meta-{uid}"
    with db.engine().begin() as conn:
        conn.execute(insert(schema.snapshots).values(
            snapshot_id=snapshot_id, raw_digest="d" * 64, prep_config_hash="c" * 64, uri=f"s3://b/{snapshot_id}/",
            rows_in=120, rows_kept=110, rows_quarantined=10, n_train=88, n_validation=11, n_test=11,
            quarantine_reasons={"empty": 10}))
        eval_id = conn.execute(insert(schema.evaluations).values(
            run_id=run_id, model_ref=f"adapter-{uid}", snapshot_id=snapshot_id, split="test", n_examples=11,
            metrics={"bleu4": 0.21, "bleu1": 0.5}, weighted_score=0.3).returning(schema.evaluations.c.id)).scalar()
        gate_id = conn.execute(insert(schema.gate_decisions).values(
            run_id=run_id, candidate_eval_id=eval_id, release=True, reasons=["first model"],
            summary="Released: first model.").returning(schema.gate_decisions.c.id)).scalar()
        conn.execute(insert(schema.releases).values(run_id=run_id, snapshot_id=snapshot_id, config_hash="h" * 64,
                                                    registry_version="5", status=status))
    return gate_id


def test_card_and_lineage_name_the_dag_run_and_the_gate_decision(services, uid, tmp_path, monkeypatch):
    run_id = f"manual__2026-12-02T09:00:00+00:00-{uid}"
    gate_id = write_rows(run_id, uid)
    # a decoy: another run's gate decision, so a query that ignored the run id would name the wrong row
    write_rows(f"other-{uid}", f"{uid}-other")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for name, data in ADAPTER.items():
        (adapter / name).write_bytes(data)

    def fake_download(uri, dest):
        shutil.copytree(adapter, dest, dirs_exist_ok=True)
        return sorted(ADAPTER)

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_lib, "download_adapter", fake_download)
    repo = f"ecb-test/meta-{uid}"
    cfg = load_config(overrides={"release.hub_repo_id": repo})
    ctx = StepContext("push_to_hub", run_id, cfg, inputs={"adapter_uri": "s3://b/adapter", "registry_version": "5"})
    meta = push_to_hub.release_meta(ctx, "5")
    assert (meta["run_id"], meta["gate_decision_id"], meta["registry_version"]) == (run_id, gate_id, "5")
    assert meta["gate_summary"] == "Released: first model." and meta["rows"]["n_train"] == 88

    with HubServer(token=TOKEN) as hub:
        # v5 already on the Hub from before a model registry reset: another run's adapter
        stale_dir = tmp_path / "stale"
        shutil.copytree(adapter, stale_dir)
        (stale_dir / "adapter_model.safetensors").write_bytes(b"\2" * 64)
        stale = hub_lib.push_release(stale_dir, repo, "5", {"run_id": "old-run"}, TOKEN, endpoint=hub.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        result = push_to_hub.run(ctx)
        files = hub.files_at(repo, result["tag"])
        assert hub.repos[repo].tags["v5"]["oid"] == stale["revision"]

    assert result["status"] == "pushed" and result["tag"] == hub_lib.alternate_tag("5", {"run_id": run_id})
    card = files["README.md"].decode()
    assert f"| DAG run id (Airflow) | `{run_id}` |" in card and f"| gate decision id | `{gate_id}` |" in card
    release = json.loads(files["ecb_release.json"])
    assert (release["run_id"], release["gate_decision_id"], release["registry_version"]) == (run_id, gate_id, "5")
    with db.engine().connect() as conn:
        row = conn.execute(select(schema.releases).where(schema.releases.c.run_id == run_id)).one()
    assert (row.status, row.hub_repo, row.hub_revision) == ("deployed", repo, result["revision"])
    assert row.detail.startswith(f"hub push: released as {result['tag']}: tag v5 on {repo}")


@pytest.mark.parametrize("status", ["canary", "rolled_back", "deploy_failed"])
def test_a_release_that_is_not_final_never_reaches_the_hub(services, uid, tmp_path, monkeypatch, status):
    """A canary still running, rolled back by its verdict or by a person, or whose deploy failed: the step succeeds
    without sending anything, so the Hub's main (and any v<version> tag) keeps naming the last final release. The
    Hub is the local test endpoint (tests/hub_server.py through HF_ENDPOINT): the real one cannot be reached here."""
    run_id = f"manual__2026-12-07T09:00:00+00:00-{uid}"
    write_rows(run_id, uid, status=status)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    repo = f"ecb-test/final-{uid}"
    cfg = load_config(overrides={"release.hub_repo_id": repo})
    ctx = StepContext("push_to_hub", run_id, cfg, inputs={"adapter_uri": "s3://b/adapter", "registry_version": "5"})
    with HubServer(token=TOKEN) as hub:
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        result = push_to_hub.run(ctx)
        assert hub.commits == [] and repo not in hub.repos
    assert result["status"] == "skipped" and f"release status {status}" in result["reason"]
    with db.engine().connect() as conn:
        row = conn.execute(select(schema.releases).where(schema.releases.c.run_id == run_id)).one()
    assert (row.status, row.hub_repo, row.hub_revision) == (status, None, None)
    assert f"hub push skipped: version 5 is not a final release (release status {status}" in row.detail
