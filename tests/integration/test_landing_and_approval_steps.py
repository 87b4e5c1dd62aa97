"""The two container-side steps of the release loop on real Postgres and S3 (SeaweedFS):

- list_landing: what the landing watcher compares; its digest is the one sync_raw_data records for the same files.
- record_approval: a person's answer to the release approval lands on the run's gate_decisions row, and the
  manifest says whether the run releases (only an approved release the gate decided; a timeout never releases).
"""

import json

import pytest
from sqlalchemy import select

from tasks.demo import datagen
from tasks.io import db, s3, schema
from tests.conftest import run_step, step_manifest

pytestmark = pytest.mark.integration


def test_list_landing_digest_matches_the_sync(services, uid, tmp_path):
    source = f"s3://ecb-landing/watch-{uid}/"
    empty = step_manifest("list_landing", f"l0-{uid}", "--set", f"data.source={source}")
    assert (empty["n_objects"], empty["n_bytes"]) == (0, 0)  # nothing landed yet: not an error
    datagen.write_csv(datagen.generate_rows(50, seed=3), tmp_path / "a.csv")
    s3.put_bytes(f"{source}a.csv", (tmp_path / "a.csv").read_bytes())
    s3.put_bytes(f"{source}notes.txt", b"ignored: not a data file")
    one = step_manifest("list_landing", f"l1-{uid}", "--set", f"data.source={source}")
    assert one["n_objects"] == 1 and one["n_ignored"] == 1 and one["n_bytes"] == (tmp_path / "a.csv").stat().st_size
    assert one["digest"] != empty["digest"]
    assert step_manifest("list_landing", f"l2-{uid}", "--set", f"data.source={source}")["digest"] == one["digest"]
    synced = step_manifest("sync_raw_data", f"s1-{uid}", "--set", f"data.source={source}")
    assert synced["digest"] == one["digest"]


def gate_decision(run_id: str, release: bool = True) -> int:
    g = schema.gate_decisions
    row = {"run_id": run_id, "release": release, "reasons": ["delta +0.0200 > threshold 0.0010"],
           "summary": "Released: +0.0200 over the champion." if release else "Not released: delta too small."}
    with db.engine().begin() as conn:
        return conn.execute(g.insert().values(**row).returning(g.c.id)).scalar_one()


def row(decision_id: int):
    with db.engine().connect() as conn:
        return conn.execute(select(schema.gate_decisions).where(schema.gate_decisions.c.id == decision_id)).one()


WHY = "Approval asked for gate decision 1: gate.require_approval is set."


def answer(status: str, by: str | None = "alice", comment: str = "") -> str:
    return json.dumps({"status": status, "by": by, "by_id": "1", "at": "2026-12-02T10:00:00+00:00",
                       "comment": comment, "reason": WHY})


@pytest.mark.parametrize(("status", "gate_release", "released", "words"), [
    ("approved", True, True, "Approved by alice (looks good): Released: +0.0200"),
    ("rejected", True, False, "Rejected by alice (looks good): not released."),
    ("timed_out", True, False, "nobody answered the approval in time (fail closed)"),
    ("approved", False, False, "Approved, but the gate did not release by alice"),
], ids=["approved", "rejected", "timed-out", "approved-but-blocked"])
def test_record_approval(services, uid, status, gate_release, released, words):
    run_id = f"appr-{status}-{uid}"
    did = gate_decision(run_id, gate_release)
    by = None if status == "timed_out" else "alice"
    m = step_manifest("record_approval", run_id, "--input", f"decision_id={did}",
                      "--input", f"approval={answer(status, by, 'looks good')}")
    assert m["release"] is released and m["decision_id"] == did and m["approval"] == status and words in m["summary"]
    r = row(did)
    assert r.approval_status == status and r.approval_by == by and r.approval_comment == "looks good"
    assert r.approval_at.isoformat() == "2026-12-02T10:00:00+00:00"
    assert r.approval_reason.startswith("Approval asked") and r.release is gate_release  # the gate's verdict stays


def test_record_approval_refuses_bad_input(services, uid):
    did = gate_decision(f"appr-x-{uid}")
    other = run_step("record_approval", f"someone-else-{uid}", "--input", f"decision_id={did}",
                     "--input", f"approval={answer('approved')}", check=False)
    assert other.returncode == 2 and f"run someone-else-{uid} has no gate decision {did}" in other.stderr
    bad = run_step("record_approval", f"appr-x-{uid}", "--input", f"decision_id={did}",
                   "--input", 'approval={"status": "maybe"}', check=False)
    assert bad.returncode == 2 and "approval status must be one of ['approved', 'rejected', 'timed_out']" in bad.stderr
    assert row(did).approval_status is None  # nothing written by either
