"""sync_raw_data against real SeaweedFS and PostgreSQL: incremental copy, manifest in S3 and Postgres."""

import json
import shutil

import pytest
from sqlalchemy import func, select

from tasks.demo import datagen
from tasks.io import db, s3, schema
from tests.conftest import run_step

pytestmark = pytest.mark.integration


def manifest_of(r):
    return json.loads(r.stdout.strip().splitlines()[-1])


def raw_rows(run_id):
    with db.engine().connect() as conn:
        return conn.execute(select(schema.raw_manifests).where(schema.raw_manifests.c.run_id == run_id)).all()


def test_s3_source_is_copied_once_then_incrementally(services, uid):
    source = f"s3://ecb-landing/test-{uid}/"
    s3.put_bytes(source + "a.csv", datagen.to_csv_bytes(datagen.generate_rows(30, seed=1)))
    line = b'{"instruction": "hi", "response": "hello", "intent": "x", "category": "Y"}\n'
    s3.put_bytes(source + "sub/b.jsonl", line)
    s3.put_bytes(source + "notes.txt", b"ignored: not a data file")
    common = ["--set", f"data.source={source}", "--set", f"storage.raw_prefix=raw-{uid}/"]

    first = manifest_of(run_step("sync_raw_data", f"r1-{uid}", *common))
    assert (first["n_objects"], first["n_copied"]) == (2, 2)
    raw = s3.get_json(first["manifest_uri"])
    assert [o["rel"] for o in raw["objects"]] == ["a.csv", "sub/b.jsonl"]
    assert s3.get_bytes(f"s3://ecb-platform/raw-{uid}/a.csv") == s3.get_bytes(source + "a.csv")
    assert raw["n_bytes"] == sum(o["size"] for o in raw["objects"])

    second = manifest_of(run_step("sync_raw_data", f"r2-{uid}", *common))
    assert second["n_copied"] == 0 and second["digest"] == first["digest"]

    s3.put_bytes(source + "a.csv", datagen.to_csv_bytes(datagen.generate_rows(31, seed=1)))
    third = manifest_of(run_step("sync_raw_data", f"r3-{uid}", *common))
    assert third["n_copied"] == 1 and third["digest"] != first["digest"]
    assert s3.get_bytes(f"s3://ecb-platform/raw-{uid}/a.csv") == s3.get_bytes(source + "a.csv")


def test_local_folder_source_and_rerun_is_idempotent(services, uid, tmp_path, bitext_csv):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(bitext_csv, src / "bitext.csv")
    common = ["--set", f"data.source={src}", "--set", f"storage.raw_prefix=raw-{uid}/"]
    for _ in range(2):  # the same run id twice, as an Airflow retry would
        m = manifest_of(run_step("sync_raw_data", f"local-{uid}", *common))
    assert m["n_objects"] == 1 and m["n_copied"] == 0
    rows = raw_rows(f"local-{uid}")
    assert len(rows) == 1 and rows[0].n_objects == 1 and rows[0].digest == m["digest"]
    assert s3.get_bytes(f"s3://ecb-platform/raw-{uid}/bitext.csv") == bitext_csv.read_bytes()
    with db.engine().connect() as conn:
        n = conn.execute(select(func.count()).select_from(schema.pipeline_runs)
                         .where(schema.pipeline_runs.c.run_id == f"local-{uid}")).scalar()
    assert n == 1
    assert s3.get_json(f"s3://ecb-platform/runs/local-{uid}/config.json")["data"]["source"] == str(src)


def test_missing_source_fails_with_its_name(services, uid):
    r = run_step("sync_raw_data", f"x-{uid}", "--set", f"data.source=/nonexistent/{uid}", check=False)
    assert r.returncode == 2
    assert f"/nonexistent/{uid}" in r.stderr
    r = run_step("sync_raw_data", f"y-{uid}", "--set", f"data.source=s3://ecb-landing/empty-{uid}/", check=False)
    assert r.returncode == 2 and f"empty-{uid}" in r.stderr and "holds no files" in r.stderr
