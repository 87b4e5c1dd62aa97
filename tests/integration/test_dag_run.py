"""The training DAG through dag.test() on real Postgres, SeaweedFS and MLflow (Airflow metadata in Postgres too).

Sizes come from tests/ecb_test_config.yaml (3 HPO trials, short fine-tune) and the tiny demo-style base model.
"""

import os
import shutil

import pytest
import requests
from sqlalchemy import func, insert, select

from tasks.demo import datagen
from tasks.io import db, s3, schema

pytestmark = pytest.mark.integration


def xcom(dagrun, task_id):
    return dagrun.get_task_instance(task_id).xcom_pull(task_ids=task_id)


def count(table, *where):
    with db.engine().connect() as conn:
        return conn.execute(select(func.count()).select_from(table).where(*where)).scalar()


@pytest.fixture
def source(tmp_path, bitext_csv):
    src = tmp_path / "landing"
    src.mkdir()
    shutil.copy(bitext_csv, src / "bitext_sample.csv")
    datagen.write_csv(datagen.generate_rows(300, seed=11), src / "demo.csv")
    return src


def run_dag(dagbag, conf):
    from airflow.utils.state import DagRunState

    dagrun = dagbag.dags["ecommerce_chatbot_training"].test(run_conf=conf)
    assert dagrun.state == DagRunState.SUCCESS, [(t.task_id, t.state) for t in dagrun.get_task_instances()]
    return dagrun


def test_dag_syncs_prepares_and_is_idempotent(services, airflow_db, mlflow_server, dagbag, source, tiny_base_model,
                                              uid, chat_service):
    conf = {"data.source": str(source), "model.base_model": str(tiny_base_model),
            "release.registered_model": f"dagrun-{uid}"}
    first = run_dag(dagbag, conf)
    sync, prep = xcom(first, "sync_raw_data"), xcom(first, "prepare_chatml")
    assert sync["n_objects"] == 2
    assert prep["rows_in"] == 566 + 300
    assert prep["rows_in"] == prep["rows_kept"] + prep["rows_quarantined"]
    assert min(prep["n_train"], prep["n_validation"], prep["n_test"]) > 0
    for name in ("train.jsonl", "validation.jsonl", "test.jsonl", "quarantine.jsonl", "manifest.json", "config.json"):
        assert s3.head(s3.join(prep["snapshot_uri"], name)), name
    raw = s3.get_json(sync["manifest_uri"])
    assert sorted(o["rel"] for o in raw["objects"]) == ["bitext_sample.csv", "demo.csv"]
    assert count(schema.raw_manifests, schema.raw_manifests.c.run_id == first.run_id) == 1
    assert count(schema.snapshots, schema.snapshots.c.snapshot_id == prep["snapshot_id"]) == 1
    assert first.get_task_instance("data_or_params_changed").state == "success"
    check_hpo_and_finetune(first)
    check_release_and_deploy(first)

    # The rest of this test is about the data path: no search, a token training and evaluation to save time.
    conf.update({"hpo.enabled": False, "training.max_steps": 2, "eval.max_examples": 4})
    second = run_dag(dagbag, conf)
    prep2 = xcom(second, "prepare_chatml")
    assert prep2["snapshot_id"] == prep["snapshot_id"] and prep2["reused"] is True
    assert prep2["config_hash"] != prep["config_hash"]  # hpo.enabled changed: a different training config
    assert xcom(second, "sync_raw_data")["n_copied"] == 0
    assert count(schema.snapshots, schema.snapshots.c.snapshot_id == prep["snapshot_id"]) == 1
    assert count(schema.raw_manifests, schema.raw_manifests.c.run_id.in_([first.run_id, second.run_id])) == 2

    # Pretend the second run's model was released: the same data and params must now stop the nightly run early ...
    with db.engine().begin() as conn:
        conn.execute(insert(schema.releases).values(run_id=f"release-{uid}", snapshot_id=prep["snapshot_id"],
                                                    config_hash=prep2["config_hash"], registry_version="1",
                                                    status="deployed"))
    try:
        third = run_dag(dagbag, conf)
        assert xcom(third, "prepare_chatml")["unchanged_since_release"] is True
        assert third.get_task_instance("plan_hpo").state == "skipped"
        assert third.get_task_instance("finetune").state == "skipped"
        # ... unless force_retrain is set.
        forced = run_dag(dagbag, {**conf, "force_retrain": True})
        assert forced.get_task_instance("finetune").state == "success"
    finally:
        with db.engine().begin() as conn:
            conn.execute(schema.releases.delete().where(schema.releases.c.run_id == f"release-{uid}"))


@pytest.fixture
def chat_service():
    """The chat service the DAG's last task starts (detached gunicorn): stopped when the test ends."""
    from tasks.devstack import stack

    yield stack.CHAT
    stack.CHAT.stop(timeout=20)


def check_release_and_deploy(dagrun):
    """No champion yet, so the gate releases; the last task deploys the chat service, which answers with the
    version just registered (the push was skipped: no HF token in this test)."""
    gate = xcom(dagrun, "quality_gate")  # the gate step's manifest; release_or_skip followed it
    assert gate["release"] is True, gate
    assert dagrun.get_task_instance("release_or_skip").state == "success"
    assert dagrun.get_task_instance("skip_release").state == "skipped"
    version = xcom(dagrun, "register_model")["version"]
    assert xcom(dagrun, "push_to_hub")["status"] == "skipped"
    deployed = xcom(dagrun, "deploy_chat_service")
    assert deployed["version"] == version and deployed["mode"] == "local"
    url = deployed["service_url"]
    conv = requests.post(f"{url}/api/conversations", json={}, timeout=10).json()
    reply = requests.post(f"{url}/api/conversations/{conv['conversation_id']}/messages",
                          json={"content": "How do I return an item?"},
                          headers={"X-Client-Token": conv["client_token"]}, timeout=60)
    assert reply.status_code == 200
    # the public answer does not name the version (a canary arm); the admin API does, for the reply too
    conv = requests.get(f"{url}/admin/conversations/{conv['conversation_id']}", timeout=10,
                        headers={"Authorization": f"Bearer {os.environ['ECB_CHAT_ADMIN_TOKEN']}"}).json()
    assert conv["model_version"] == version
    assert next(m for m in conv["messages"] if m["id"] == reply.json()["message"]["id"])["model_version"] == version
    info = requests.get(f"{url}/api/model", timeout=10).json()
    assert info["lineage"]["dag_run_id"] == dagrun.run_id and info["lineage"]["gate_decision"]["release"] is True
    with db.engine().connect() as conn:
        row = conn.execute(select(schema.releases).where(schema.releases.c.run_id == dagrun.run_id)).mappings().one()
    assert row["status"] == "deployed" and row["service_url"] == url and row["registry_version"] == version


def check_hpo_and_finetune(dagrun):
    """3 mapped trials recorded in the Postgres optuna storage and in hpo_trials; the best one's params used."""
    import optuna

    from tasks.ml import hpo

    mapped = [ti for ti in dagrun.get_task_instances() if ti.task_id == "hpo_trial"]
    assert sorted(ti.map_index for ti in mapped) == [0, 1, 2]
    best = xcom(dagrun, "select_best")
    study = optuna.load_study(study_name=best["study"], storage=hpo.storage())
    assert len(study.trials) == 3
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    top = max(complete, key=lambda t: t.value)
    assert best["best_trial"] == top.number and best["best_value"] == top.value
    assert best["best_params"] == {hpo.SPACE[k]: v for k, v in top.params.items()}
    with db.engine().connect() as conn:
        rows = conn.execute(select(schema.hpo_trials).where(schema.hpo_trials.c.study_name == best["study"])).all()
        run_row = conn.execute(select(schema.pipeline_runs.c.hpo)
                               .where(schema.pipeline_runs.c.run_id == dagrun.run_id)).scalar()
    assert sorted(r.trial_number for r in rows) == [0, 1, 2]
    assert run_row["best_params"] == best["best_params"]
    tuned = xcom(dagrun, "finetune")
    assert tuned["best_params"] == best["best_params"]
    cfg = s3.get_json(s3.join(tuned["adapter_uri"], "ecb_config.json"))
    assert cfg["lora"]["r"] == best["best_params"]["lora.r"]
    assert cfg["training"]["learning_rate"] == best["best_params"]["training.learning_rate"]
