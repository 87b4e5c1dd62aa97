"""Evaluate -> quality gate -> register through dag.test() on real Postgres, S3 and a real MLflow server.

The first run has no champion and is released (registered version with the `champion` alias); a second run on the
same data trains the same model again (force_retrain), the gate says "no release" and the alias stays put.
The Hub push has no token here, so it skips (the push itself is tested against a local endpoint in test_push).
"""

import pytest
from sqlalchemy import select

from tasks.demo import datagen
from tasks.io import db, schema

pytestmark = pytest.mark.integration


def run_dag(dagbag, conf):
    from airflow.utils.state import DagRunState

    dagrun = dagbag.dags["ecommerce_chatbot_training"].test(run_conf=conf)
    states = {t.task_id: t.state for t in dagrun.get_task_instances()}
    assert dagrun.state == DagRunState.SUCCESS, states
    return dagrun, states


def gate_row(run_id):
    with db.engine().connect() as conn:
        return conn.execute(select(schema.gate_decisions).where(schema.gate_decisions.c.run_id == run_id)).one()


def test_first_run_releases_second_keeps_the_champion(services, airflow_db, mlflow_server, dagbag, tiny_base_model,
                                                      tmp_path, uid, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("HF_TOKEN", raising=False)
    name = f"ecb-test-{uid}"
    src = tmp_path / "landing"
    src.mkdir()
    datagen.write_csv(datagen.generate_rows(400, seed=31), src / "demo.csv")
    conf = {"data.source": str(src), "model.base_model": str(tiny_base_model), "hpo.enabled": False,
            "release.registered_model": name}
    first, states = run_dag(dagbag, conf)
    assert states["quality_gate"] == "success" and states["release_or_skip"] == "success"
    assert states["register_model"] == "success" and states["skip_release"] == "skipped"
    g1 = gate_row(first.run_id)
    assert g1.release is True and "first model" in g1.summary and g1.champion_eval_id is None
    client = MlflowClient()
    champ = client.get_model_version_by_alias(name, "champion")
    assert champ.version == "1"
    assert champ.tags["ecb.run_id"] == first.run_id and champ.tags["gate_decision_id"] == str(g1.id)
    assert champ.tags["snapshot_id"] and champ.tags["git_commit"]
    assert states["push_to_hub"] == "success"  # skipped inside: no token configured
    with db.engine().connect() as conn:
        rel = conn.execute(select(schema.releases).where(schema.releases.c.run_id == first.run_id)).one()
        ev = conn.execute(select(schema.evaluations).where(schema.evaluations.c.id == g1.candidate_eval_id)).one()
    # the push skipped (its reason is kept), then the last task deployed the chat service with this version
    assert rel.registry_version == "1" and rel.status == "deployed" and rel.service_url.startswith("http://")
    assert "no Hugging Face token" in rel.detail and "serving version 1" in rel.detail
    assert states["deploy_chat_service"] == "success"
    assert ev.n_examples > 0 and ev.metrics["bleu4"] >= 0 and ev.per_intent

    second, states = run_dag(dagbag, {**conf, "force_retrain": True})
    assert states["quality_gate"] == "success" and states["release_or_skip"] == "success"
    assert states["register_model"] == "skipped" and states["skip_release"] == "success"
    assert states["deploy_chat_service"] == "skipped"  # never deployed after skip_release
    g2 = gate_row(second.run_id)
    assert second.get_task_instance("quality_gate").xcom_pull(task_ids="quality_gate")["decision_id"] == g2.id
    assert g2.release is False and g2.champion_eval_id == g1.candidate_eval_id  # stored evaluation reused
    assert abs(g2.score_delta) < 1e-9 and "not above the threshold" in g2.summary
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
