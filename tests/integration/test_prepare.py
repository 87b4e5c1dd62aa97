"""prepare_chatml as a step against real S3 and Postgres: snapshot files, quarantine, reuse, clear failures."""

import json

import pytest
from sqlalchemy import func, select

from tasks.demo import datagen
from tasks.io import db, s3, schema
from tests.conftest import run_step

pytestmark = pytest.mark.integration

BROKEN_CSV = (
    b"flags,instruction,category,intent,response\n"
    b"B,where is my order {{Order Number}},ORDER,track_order,You can track it in Your Orders. It ships soon.\n"
    b"B,cancel my order,ORDER,cancel_order,\n"                                      # row 2: empty response
    b"B,   ,ORDER,cancel_order,Sure. Here is how.\n"                                # row 3: whitespace instruction
    b"B,where is my order {{Order Number}},ORDER,track_order,You can track it in Your Orders. It ships soon.\n"
    b"B,refund please,REFUND,get_refund,Happy to help. Refunds take 5 days.,EXTRA\n"  # row 5: extra column
    b"B,short row,REFUND\n"                                                          # row 6: short row
    b"B,<b>I need</b> an invoice &amp; receipt,INVOICE,get_invoice,Invoices are under Account. Download it there.\n"
) + b"B,caf\xe9 order,ORDER,track_order,Bad bytes. Really.\n"                 # row 8: invalid UTF-8


def sync_and_prepare(uid: str, files: dict[str, bytes], run: str = "r1", check: bool = True):
    source = f"s3://ecb-landing/prep-{uid}/"
    for name, data in files.items():
        s3.put_bytes(source + name, data)
    common = ["--set", f"data.source={source}", "--set", f"storage.raw_prefix=raw-{uid}/",
              "--set", f"storage.snapshot_prefix=snap-{uid}/"]
    synced = json.loads(run_step("sync_raw_data", f"{run}-{uid}", *common).stdout.splitlines()[-1])
    return run_step("prepare_chatml", f"{run}-{uid}", *common, "--input", f"raw_manifest={synced['manifest_uri']}",
                    check=check)


def test_broken_csv_is_quarantined_with_reasons(services, uid):
    good = datagen.to_csv_bytes(datagen.generate_rows(120, seed=3))
    m = json.loads(sync_and_prepare(uid, {"broken.csv": BROKEN_CSV, "good.csv": good}).stdout.splitlines()[-1])
    assert m["rows_in"] == 128
    assert m["rows_in"] == m["rows_kept"] + m["rows_quarantined"]
    assert m["rows_quarantined"] == 6
    quarantine = [json.loads(line) for line in s3.get_bytes(s3.join(m["snapshot_uri"], "quarantine.jsonl"))
                  .decode().splitlines()]
    got = sorted((q["source"], q["row"], q["reason"]) for q in quarantine)
    assert got == [("broken.csv", 2, "empty_field"), ("broken.csv", 3, "empty_field"), ("broken.csv", 4, "duplicate"),
                   ("broken.csv", 5, "extra_columns"), ("broken.csv", 6, "short_row"), ("broken.csv", 8, "undecodable")]
    splits = {s: [json.loads(x) for x in s3.get_bytes(s3.join(m["snapshot_uri"], f"{s}.jsonl")).decode().splitlines()]
              for s in ("train", "validation", "test")}
    assert sum(map(len, splits.values())) == m["rows_kept"]
    everything = [r for rows in splits.values() for r in rows]
    cleaned = [r for r in everything if r["source"] == "broken.csv" and r["row"] == 7]
    assert cleaned[0]["messages"][1]["content"] == "I need an invoice & receipt"
    assert [msg["role"] for msg in everything[0]["messages"]] == ["system", "user", "assistant"]
    manifest = s3.get_json(s3.join(m["snapshot_uri"], "manifest.json"))
    assert manifest["quarantine_reasons"] == {"duplicate": 1, "empty_field": 2, "extra_columns": 1, "short_row": 1,
                                              "undecodable": 1}
    with db.engine().connect() as conn:
        row = conn.execute(select(schema.snapshots).where(schema.snapshots.c.snapshot_id == m["snapshot_id"])).one()
    assert (row.rows_in, row.rows_kept, row.rows_quarantined) == (128, 122, 6)


def test_same_input_reuses_the_snapshot(services, uid):
    files = {"a.csv": datagen.to_csv_bytes(datagen.generate_rows(200, seed=4))}
    first = json.loads(sync_and_prepare(uid, files, "r1").stdout.splitlines()[-1])
    second = json.loads(sync_and_prepare(uid, files, "r2").stdout.splitlines()[-1])
    assert (first["reused"], second["reused"]) == (False, True)
    assert first["snapshot_id"] == second["snapshot_id"]
    with db.engine().connect() as conn:
        n = conn.execute(select(func.count()).select_from(schema.snapshots)
                         .where(schema.snapshots.c.snapshot_id == first["snapshot_id"])).scalar()
    assert n == 1


def test_missing_columns_fail_naming_file_and_columns(services, uid):
    bad = b"flags,instruction,category,intent\nB,hello,ORDER,track_order\n"
    r = sync_and_prepare(uid, {"no_response.csv": bad}, check=False)
    assert r.returncode == 2
    assert "no_response.csv" in r.stderr and "response" in r.stderr
    assert r.stdout == ""
