"""Rated chat replies into the next snapshot, the live eval set through evaluate and the gate, and the champion
evaluated again when the evaluation settings change -- real Postgres, S3 and MLflow, the real step commands.

The feedback rows are written through the chat service's own store functions (tasks/chat/store.py). The chat tables
are global to the test database, so each test that reads feedback empties them first and owns them while it runs.
"""

import json

import pytest
from sqlalchemy import func, select, text

from tasks.chat import store
from tasks.demo import datagen
from tasks.io import db, s3, schema
from tests.conftest import run_step, step_manifest

pytestmark = pytest.mark.integration

PARCEL = "Hi, my parcel from last week has not arrived yet, what can I do?"
ADDRESS = "Can I change the delivery address after ordering?"


def empty_chat_tables() -> None:
    with db.engine().begin() as conn:
        conn.execute(text("TRUNCATE conversations CASCADE"))  # messages and feedback go with them


def chat(turns: list[tuple[str, str, int | None]], version: str = "1", finish: str = "stop") -> list[int]:
    """One conversation of (user text, reply, rating or None) turns, as the chat API stores it; the reply ids."""
    cid, _ = store.create_conversation(version)
    ids = []
    for user, reply, rating in turns:
        store.add_message(cid, "user", user, model_version=version)
        msg = store.add_message(cid, "assistant", reply, model_version=version, finish_reason=finish,
                                latency_ms=12.0, prompt_tokens=30, completion_tokens=20)
        if rating is not None:
            store.rate(msg["id"], rating, version)
        ids.append(msg["id"])
    return ids


def read_jsonl(uri: str) -> list[dict]:
    return [json.loads(line) for line in s3.get_bytes(uri).decode().splitlines() if line.strip()]


def sync(uid: str, rows: int = 300, seed: int = 41) -> list[str]:
    source = f"s3://ecb-landing/feedback-{uid}/"
    s3.put_bytes(source + "demo.csv", datagen.to_csv_bytes(datagen.generate_rows(rows, seed=seed)))
    common = ["--set", f"data.source={source}", "--set", f"storage.raw_prefix=raw-fb-{uid}/",
              "--set", f"storage.snapshot_prefix=snap-fb-{uid}/"]
    synced = step_manifest("sync_raw_data", f"fb-sync-{uid}", *common)
    return [*common, "--input", f"raw_manifest={synced['manifest_uri']}"]


def prepare(args: list[str], run: str, include: bool):
    r = run_step("prepare_chatml", run, *args, "--set", f"data.include_feedback={str(include).lower()}")
    return json.loads(r.stdout.splitlines()[-1]), r.stderr


def test_feedback_goes_to_train_review_and_live_and_changes_the_snapshot_id(services, uid):
    empty_chat_tables()
    args = sync(uid)
    off, _ = prepare(args, f"fb-off-{uid}", include=False)
    base = {s: read_jsonl(s3.join(off["snapshot_uri"], f"{s}.jsonl")) for s in ("train", "validation", "test")}
    raw_test_question = base["test"][0]["messages"][1]["content"]

    chat([(PARCEL, "I'm sorry about the delay. Open Your Orders, choose the order and select Track package.", 1)])
    chat([(raw_test_question, "A good answer to a question of the test split.", 1)])  # must not leak into train
    chat([("How long do refunds take?", "Refunds usually take", 1)], finish="length")  # cut off
    chat([(ADDRESS, "No.", -1), ("Really? Not even before it ships?", "Yes, before it ships you can.", 1)],
         version="2")
    chat([(PARCEL, "Wait.", -1)])  # its question is trained on (the thumbs-up above): not held out
    chat([("Do you sell gift cards?", "We do not know.", None)])  # not rated: not read

    again, _ = prepare(args, f"fb-off2-{uid}", include=False)
    assert (again["snapshot_id"], again["reused"]) == (off["snapshot_id"], True)  # off: feedback changes nothing
    assert "feedback" not in s3.get_json(s3.join(off["snapshot_uri"], "manifest.json"))
    assert not s3.head(s3.join(off["snapshot_uri"], "review.jsonl"))

    on, log = prepare(args, f"fb-on-{uid}", include=True)
    assert on["snapshot_id"] != off["snapshot_id"] and on["reused"] is False
    uri = on["snapshot_uri"]
    got = {s: read_jsonl(s3.join(uri, f"{s}.jsonl")) for s in ("train", "validation", "test")}
    assert got["validation"] == base["validation"] and got["test"] == base["test"]  # train only
    assert got["train"][:len(base["train"])] == base["train"]
    added = got["train"][len(base["train"]):]
    assert [(r["source"], r["messages"][1]["content"]) for r in added] == [("feedback", PARCEL)]
    assert added[0]["messages"][0]["content"] and added[0]["messages"][2]["content"].startswith("I'm sorry")
    assert raw_test_question not in [r["messages"][1]["content"] for r in added]

    review = read_jsonl(s3.join(uri, "review.jsonl"))
    assert [(r["user_text"], r["reply"], r["model_version"]) for r in review] == [(ADDRESS, "No.", "2"),
                                                                                 (PARCEL, "Wait.", "1")]
    assert all(r["conversation_id"] and r["message_id"] and r["rated_at"] for r in review)
    live = read_jsonl(s3.join(uri, "live.jsonl"))
    assert [(r["messages"][1]["content"], r["messages"][2]["content"], r["model_version"]) for r in live] == \
        [(ADDRESS, "No.", "2")]

    manifest = s3.get_json(s3.join(uri, "manifest.json"))
    c = manifest["feedback"]
    assert c == {"rows_read": 6, "thumbs_up": 4, "thumbs_down": 2, "other_rating": 0, "added_to_train": 1,
                 "skipped_train": {"in_raw_data": 1, "incomplete_reply": 1, "later_turn": 1},
                 "to_review": 2, "to_live": 1, "skipped_live": {"in_train": 1}}
    assert c["thumbs_up"] == c["added_to_train"] + sum(c["skipped_train"].values())
    assert c["thumbs_down"] == c["to_review"] == c["to_live"] + sum(c["skipped_live"].values())
    assert manifest["n_train"] == off["n_train"] + 1 == on["n_train"] and on["n_train_feedback"] == 1
    assert manifest["rows_in"] == manifest["rows_kept"] + manifest["rows_quarantined"] + manifest["rows_sampled_out"]
    assert on["feedback"] == c and on["n_live"] == 1
    assert ("feedback: 6 rated replies read (4 thumbs-up, 2 thumbs-down, 0 other ratings); 1 added to train, "
            "3 skipped (in_raw_data=1, incomplete_reply=1, later_turn=1); 2 to review; 1 to the live eval set, "
            "1 skipped (in_train=1)") in log
    with db.engine().connect() as conn:
        row = conn.execute(select(schema.snapshots).where(schema.snapshots.c.snapshot_id == on["snapshot_id"])).one()
    assert row.n_train == manifest["n_train"]

    same, _ = prepare(args, f"fb-on2-{uid}", include=True)
    assert (same["snapshot_id"], same["reused"]) == (on["snapshot_id"], True)  # nothing new: reused
    chat([("Do you ship to Norway?", "Yes, we ship to Norway within 5 days.", 1)])
    newer, _ = prepare(args, f"fb-on3-{uid}", include=True)
    assert newer["snapshot_id"] != on["snapshot_id"] and newer["n_train"] == on["n_train"] + 1


# ------------------------------------------------------------------------------------------ evaluate + gate


@pytest.fixture(scope="module")
def trained(services, mlflow_server, tiny_base_model):
    """A snapshot with a live set, an adapter trained on it, and that adapter registered as the champion."""
    import uuid

    from mlflow.tracking import MlflowClient

    uid = uuid.uuid4().hex[:10]
    empty_chat_tables()
    chat([(ADDRESS, "No.", -1)], version="2")
    chat([("Is there a discount for students on Tuesdays?", "Discounts are for", -1)], version="1", finish="length")
    chat([("Could I settle the bill with an invoice next month?", "Never.", -1)], version="1")
    on, _ = prepare(sync(uid, rows=240, seed=43), f"fb-ev-{uid}", include=True)
    assert on["n_live"] == 3
    base = ["--set", f"model.base_model={tiny_base_model}"]
    tune = step_manifest("finetune", f"fb-ft-{uid}", *base, "--set", "training.max_steps=2",
                         "--input", f"snapshot_uri={on['snapshot_uri']}")
    name = f"ecb-fb-{uid}"
    client = MlflowClient()
    client.create_registered_model(name)
    mv = client.create_model_version(name, source=tune["adapter_uri"], tags={
        "ecb.run_id": f"fb-champ-{uid}", "adapter_uri": tune["adapter_uri"], "base_model": str(tiny_base_model),
        "snapshot_id": on["snapshot_id"]})
    client.set_registered_model_alias(name, "champion", mv.version)
    args = [*base, "--set", f"release.registered_model={name}", "--input", f"snapshot_uri={on['snapshot_uri']}",
            "--input", f"adapter_uri={tune['adapter_uri']}"]
    return {"args": args, "snapshot": on, "name": name, "champion_ref": f"registry:{name}/{mv.version}"}


def evaluation_rows(model_ref: str, snapshot_id: str, split: str = "test") -> list:
    e = schema.evaluations
    with db.engine().connect() as conn:
        return conn.execute(select(e).where(e.c.model_ref == model_ref, e.c.snapshot_id == snapshot_id,
                                            e.c.split == split)).all()


def evaluate(trained, run: str, *sets: str):
    r = run_step("evaluate", run, *trained["args"], *(x for s in sets for x in ("--set", s)))
    return json.loads(r.stdout.splitlines()[-1]), r.stderr


def gate(run: str, manifest: dict):
    r = run_step("quality_gate", run, "--set", "gate.min_eval_examples=10", "--input",
                 f"evaluation={json.dumps(manifest)}")
    return json.loads(r.stdout.splitlines()[-1]), r.stderr


def test_champion_is_evaluated_again_when_the_eval_settings_change(trained, uid):
    sid, champ_ref = trained["snapshot"]["snapshot_id"], trained["champion_ref"]
    first, _ = evaluate(trained, f"ev1-{uid}", "eval.max_examples=16")
    assert first["candidate"]["n"] == first["champion"]["n"] == 16

    second, log = evaluate(trained, f"ev2-{uid}", "eval.max_examples=12")  # e.g. a smaller eval budget
    assert second["candidate"]["n"] == 12
    assert second["champion"]["n"] == 12, "the champion's evaluation on 16 examples was reused"
    assert "was made with other settings: max_examples 16 -> 12; evaluating again" in log
    (row,) = evaluation_rows(champ_ref, sid)  # the stored row was replaced, not joined by a second one
    assert row.id == first["champion"]["eval_id"] == second["champion"]["eval_id"]
    assert row.n_examples == 12 and row.metrics["eval_settings"]["max_examples"] == 12
    assert row.run_id == f"ev2-{uid}"
    decision, _ = gate(f"ev2-{uid}", second)
    assert not any("unfair comparison" in r for r in decision["reasons"]), decision["reasons"]
    assert "improvement +0.0000 is not above the threshold" in decision["summary"]  # the same adapter: a tie

    # (same settings reuse the row: test_release checks the champion's evaluation id across two DAG runs)
    third, log = evaluate(trained, f"ev3-{uid}", "eval.max_examples=12", "eval.max_new_tokens=8")
    assert "max_new_tokens 24 -> 8; evaluating again" in log
    (row,) = evaluation_rows(champ_ref, sid)
    assert row.metrics["eval_settings"]["max_new_tokens"] == 8 and third["champion"]["n"] == 12


def test_evaluate_scores_the_live_set_per_model_version_and_the_gate_reports_it(trained, uid):
    sid = trained["snapshot"]["snapshot_id"]
    m, log = evaluate(trained, f"live-{uid}", "eval.max_examples=12")
    assert m["candidate_live"]["n"] == m["champion_live"]["n"] == 3
    live = read_jsonl(s3.join(trained["snapshot"]["snapshot_uri"], "live.jsonl"))
    for ref in (f"run:live-{uid}", trained["champion_ref"]):
        (row,) = evaluation_rows(ref, sid, "live")
        assert row.n_examples == 3 and row.weighted_score is None
        assert 0 <= row.metrics["rejected_similarity"] <= 1 and 0 <= row.metrics["repeat_rate"] <= 1
        assert {v: p["n"] for v, p in row.metrics["per_version"].items()} == {"1": 2, "2": 1}
        outputs = read_jsonl(row.outputs_uri)
        assert [o["rejected"] for o in outputs] == [r["messages"][2]["content"] for r in live]
        assert all(isinstance(o["output"], str) for o in outputs)
    assert f"run:live-{uid}: live set of 3 thumbs-down prompts" in log

    decision, log = gate(f"live-{uid}", m)
    (note,) = [r for r in decision["reasons"] if "live set (3 prompts" in r]
    assert "(+0.0000)" in note and note.endswith("reported only (gate.live_policy=report)")
    assert "live similarity" in log and "live repeats" in log
    with db.engine().connect() as conn:
        n = conn.execute(select(func.count()).select_from(schema.gate_decisions)
                         .where(schema.gate_decisions.c.run_id == f"live-{uid}")).scalar()
    assert n == 1
