"""The training DAG through dag.test() on real embedded Postgres + SeaweedFS (Airflow metadata in Postgres too)."""

import shutil

import pytest
from sqlalchemy import func, insert, select

from tasks import datagen, db, s3, schema

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


def test_dag_syncs_prepares_and_is_idempotent(services, airflow_db, dagbag, source, uid):
    conf = {"data.source": str(source)}
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

    second = run_dag(dagbag, conf)
    prep2 = xcom(second, "prepare_chatml")
    assert prep2["snapshot_id"] == prep["snapshot_id"] and prep2["reused"] is True
    assert xcom(second, "sync_raw_data")["n_copied"] == 0
    assert count(schema.snapshots, schema.snapshots.c.snapshot_id == prep["snapshot_id"]) == 1
    assert count(schema.raw_manifests, schema.raw_manifests.c.run_id.in_([first.run_id, second.run_id])) == 2

    # Pretend the first run's model was released: the same data and params must now stop the nightly run early ...
    with db.engine().begin() as conn:
        conn.execute(insert(schema.releases).values(run_id=f"release-{uid}", snapshot_id=prep["snapshot_id"],
                                                    config_hash=prep["config_hash"], registry_version="1",
                                                    status="deployed"))
    try:
        third = run_dag(dagbag, conf)
        assert xcom(third, "prepare_chatml")["unchanged_since_release"] is True
        assert xcom(third, "data_or_params_changed") is False
        # ... unless force_retrain is set.
        forced = run_dag(dagbag, {**conf, "force_retrain": True})
        assert xcom(forced, "data_or_params_changed") is True
    finally:
        with db.engine().begin() as conn:
            conn.execute(schema.releases.delete().where(schema.releases.c.run_id == f"release-{uid}"))
