"""The release loop through the real Airflow stack (api-server, scheduler, dag-processor, triggerer; LocalExecutor):

1. New raw data starts training without a manual trigger: a CSV uploaded to the landing prefix is seen by the
   landing watcher DAG (it lists the prefix every 10 s here), which emits a landing asset event; the scheduler starts
   an asset-triggered run of the training DAG. Listings that did not change emit nothing.
2. With gate.require_approval the run waits in approve_release (awaiting_input) with the gate's numbers in the
   request; approving it through the HITL REST API releases (register_model, the model asset event), and the
   answer and who gave it are in gate_decisions. A second run (forced release) is rejected the same way: it skips
   the release, and that answer is recorded too.
3. The Assets page of the Airflow UI lists raw data, snapshot and model (a screenshot is kept in the test's tmp dir).

Small settings: the test config plus a stack config written here (HPO off, 10 fine-tune steps, tiny base model, no
nightly run: the cron only fires on 29 February). The landing prefix and the registered model are the config's own:
asset URIs come from them, and the Airflow database of the test session must not hold a second asset of the same
name under another URI (dag.test() runs of the other tests would find their model asset inactive). So this module
empties the landing prefix and removes an earlier session's registered model first, and uploads data of its own.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from datetime import UTC, datetime

import pytest
import requests
from sqlalchemy import create_engine, select, text

from tasks.demo import datagen
from tasks.devstack import stack
from tasks.io import db, s3, schema
from tasks.io.procs import state_dir, stop_all
from tests.conftest import SETTINGS, chromium

pytestmark = [pytest.mark.integration, pytest.mark.timeout(2400)]

DAG_ID, WATCHER_ID = "ecommerce_chatbot_training", "ecommerce_chatbot_landing_watcher"
ASSET_NAMES = ("support_conversations_landing", "support_conversations_raw", "chatml_snapshot", "chatbot_model")
CANARY_REPLIES = 20  # release.canary_min_messages of the promoted canary
WORSE_REPLIES = 130  # ... and of the rolled back one, which must see >= 200 chats in all
ANSWER_AFTER_S = 2  # Loop.answer: a person does not answer within a scheduler loop of the request


def wait_until(check, what: str, timeout: float, every: float = 1.0, why=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}{why()}")


class Loop:
    """The running stack: its Airflow metadata database, REST API and the names this module's config uses. Queries
    see only what happened since the stack started (a kept state folder holds earlier sessions' runs and events)."""

    def __init__(self, engine, api: str, uid: str, source: str, model_name: str):
        self.engine, self.api, self.uid, self.source, self.model_name = engine, api, uid, source, model_name
        self.t0 = datetime.now(UTC)

    def q(self, sql: str, **params) -> list[dict]:
        with self.engine.connect() as c:
            return [dict(r) for r in c.execute(text(sql), params).mappings()]

    def rest(self, method: str, path: str, **kwargs) -> requests.Response:
        # The local stack runs Airflow's simple auth manager with all users admin: no token needed.
        return requests.request(method, f"{self.api}/api/v2{path}", timeout=30, **kwargs)

    def runs(self, dag_id: str = DAG_ID) -> list[dict]:
        return self.q("SELECT id, run_id, run_type, state FROM dag_run WHERE dag_id = :d AND queued_at >= :t "
                      "ORDER BY id", d=dag_id, t=self.t0)

    def states(self, run_id: str) -> dict[str, str]:
        return {r["task_id"]: r["state"] for r in self.q(
            "SELECT task_id, state FROM task_instance WHERE dag_id = :d AND run_id = :r", d=DAG_ID, r=run_id)}

    def events(self, asset: str) -> list[dict]:
        return self.q("SELECT e.id, e.extra, e.source_dag_id, e.source_run_id, e.source_task_id FROM asset_event e "
                      "JOIN asset a ON a.id = e.asset_id WHERE a.name = :n AND e.timestamp >= :t ORDER BY e.id",
                      n=asset, t=self.t0)

    def xcom(self, run_id: str) -> dict[str, dict]:
        return {r["task_id"]: r["value"] for r in self.q(
            "SELECT task_id, value FROM xcom WHERE dag_id = :d AND run_id = :r AND key = 'return_value'",
            d=DAG_ID, r=run_id)}

    def run_state(self, run_id: str) -> str | None:
        rows = self.q("SELECT state FROM dag_run WHERE dag_id = :d AND run_id = :r", d=DAG_ID, r=run_id)
        return rows[0]["state"] if rows else None

    def why(self, run_id: str) -> str:
        """For a timeout: the run's task states and the end of the log of each task that is not done."""
        states = self.states(run_id)
        out = [f"; task states: {states}"]
        for task_id, state in states.items():
            if state not in ("success", "skipped", None):
                logs = sorted(state_dir().glob(f"airflow/logs/dag_id={DAG_ID}/run_id={run_id}/task_id={task_id}/"
                                                     "*.log"))
                tail = logs[-1].read_text(errors="replace")[-3000:] if logs else "(no log)"
                out.append(f"\n--- {task_id} ({state}), end of {logs[-1].name if logs else 'log'}:\n{tail}")
        return "".join(out)

    def wait_for_approval_request(self, run_id: str) -> None:
        def parked():
            state = self.states(run_id).get("approve_release")
            assert self.run_state(run_id) in ("queued", "running"), (self.run_state(run_id), self.states(run_id))
            return state == "awaiting_input"

        wait_until(parked, f"run {run_id} to wait in approve_release", 1200, 2, lambda: self.why(run_id))

    def parked_exit_read(self, run_id: str) -> bool:
        """Whether the scheduler has read the executor's event for the exit of the try now waiting in
        approve_release (its "TaskInstance Finished: ... state=awaiting_input" line for that try)."""
        (ti,) = self.q("SELECT try_number FROM task_instance WHERE dag_id = :d AND run_id = :r AND task_id = "
                       "'approve_release'", d=DAG_ID, r=run_id)
        log = state_dir() / "logs" / "airflow-scheduler.log"
        needle, this_try = f"task_id=approve_release, run_id={run_id}, ", f"try_number={ti['try_number']},"
        return any(needle in line and "state=awaiting_input" in line and this_try in line
                   for line in log.read_text(errors="replace").splitlines() if "TaskInstance Finished" in line)

    def answer(self, run_id: str, option: str, comment: str) -> dict:
        """Answer as a person would: not before the request is fully parked. Airflow 3.3 race: an answer that
        arrives before the scheduler read the executor's event for the parked task's exit (its supervisor notices
        the exit up to [workers] min_heartbeat_interval later, then one scheduler loop) finds the resumed task
        queued, the scheduler says "finished with state success, but the task instance's state attribute is
        queued", fails that try, and the retry asks again (its upsert drops the answer). Seen in CI with a fixed
        5 s pause; RELIABILITY.md says what an operator sees and does."""
        wait_until(lambda: self.parked_exit_read(run_id), f"the scheduler to read run {run_id}'s parked exit", 120, 1)
        time.sleep(ANSWER_AFTER_S)
        path = f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/approve_release/-1/hitlDetails"
        r = self.rest("PATCH", path, json={"chosen_options": [option], "params_input": {"comment": comment}})
        assert r.status_code == 200, r.text
        return r.json()

    def wait_finished(self, run_id: str) -> str:
        return wait_until(lambda: self.run_state(run_id) in ("success", "failed") and self.run_state(run_id),
                          f"run {run_id} to finish", 1200, 2, lambda: self.why(run_id))


def fresh_landing_and_registry(source: str, model_name: str) -> None:
    """What a kept state folder may hold from an earlier session: landed files (the first listing must find none)
    and a champion of the registered model (the first run must be the first model, which the gate releases)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    bucket, _ = s3.split_uri(source)
    for obj in s3.list_objects(source):
        s3.client().delete_object(Bucket=bucket, Key=obj["key"])
    try:
        MlflowClient().delete_registered_model(model_name)
    except MlflowException:
        pass  # none yet


@pytest.fixture(scope="module")
def loop(services, airflow_db, mlflow_server, tiny_base_model, tmp_path_factory):
    from tasks.config import load_config

    uid = uuid.uuid4().hex[:8]
    defaults = load_config()
    source, model_name = defaults.data.source, defaults.release.registered_model
    fresh_landing_and_registry(source, model_name)
    cfg = tmp_path_factory.mktemp("loop") / "loop.yaml"
    cfg.write_text(json.dumps({
        "model": {"base_model": str(tiny_base_model)},
        "hpo": {"enabled": False},
        "training": {"max_steps": 10},
        "gate": {"require_approval": True},
        "pipeline": {"schedule": "0 0 29 2 *", "landing_check_s": 10},
        "release": {"canary_poll_s": 10},  # read at parse time: the canary test's wait_for_canary looks every 10 s
        # The simulated users all chat from 127.0.0.1: at the default 60 new conversations per address per minute the
        # rolled back canary's ~260 chats took 4.5 minutes of waiting on HTTP 429s (limits are tested in test_chat_api)
        "chat": {"create_limit_per_minute": 100000, "rate_limit_per_minute": 100000},
    }))
    with pytest.MonkeyPatch.context() as mp:
        # Every Airflow process (and the steps it runs) reads the test config, then this file.
        mp.setitem(SETTINGS, "config", os.pathsep.join([stack.base_config(SETTINGS), str(cfg)]))
        mp.delenv("HF_TOKEN", raising=False)  # the push skips; the Hub is tested elsewhere
        # dag.test() runs of other tests stored the DAG with the test config's @daily schedule and its next run
        # (today 00:00): paused, the scheduler cannot start that run before the dag-processor has stored this
        # config's schedule (fails harmlessly when the database has no such DAG yet).
        stack.airflow_cli(SETTINGS, "dags", "pause", DAG_ID, check=False)
        api = stack.airflow_up(SETTINGS)
        engine = create_engine(stack.db_url(SETTINGS, "airflow").replace("postgresql://", "postgresql+psycopg2://",
                                                                         1))
        try:
            loop = Loop(engine, api.replace("localhost", "127.0.0.1"), uid, source, model_name)
            wait_until(lambda: len(loop.q("SELECT 1 FROM dag WHERE dag_id IN (:a, :b)", a=DAG_ID, b=WATCHER_ID)) == 2
                       and "29 2" in loop.q("SELECT timetable_summary FROM dag WHERE dag_id = :d",
                                            d=DAG_ID)[0]["timetable_summary"],
                       "both DAGs to be parsed with this module's schedule", 300, 2)
            # An earlier session's run that never finished (its scheduler was stopped) would hold the one active
            # run slot (max_active_runs=1): asset-triggered and manual runs would wait behind it.
            for run in loop.q("SELECT run_id FROM dag_run WHERE dag_id = :d AND state IN ('queued', 'running')",
                              d=DAG_ID):
                r = loop.rest("PATCH", f"/dags/{DAG_ID}/dagRuns/{run['run_id']}", json={"state": "failed"})
                assert r.status_code == 200, r.text
            # ... and its landing events that no run consumed yet would start a run before this module's upload.
            r = loop.rest("DELETE", f"/dags/{DAG_ID}/assets/queuedEvents")
            assert r.status_code in (204, 404), r.text  # 404: none queued
            for dag_id in (DAG_ID, WATCHER_ID):  # paused above, or by an earlier session
                r = loop.rest("PATCH", f"/dags/{dag_id}", json={"is_paused": False})
                assert r.status_code == 200, r.text
            yield loop
        finally:
            stop_all((*stack.AIRFLOW_PROCS.values(), stack.CHAT), timeout=20)
            engine.dispose()


def gate_row(run_id: str):
    with db.engine().connect() as conn:
        return conn.execute(select(schema.gate_decisions).where(schema.gate_decisions.c.run_id == run_id)).one()


def test_new_raw_data_starts_a_run_that_waits_for_approval(loop):
    # Nothing landed yet: the watcher runs, announces nothing, and no training run starts.
    wait_until(lambda: [r for r in loop.runs(WATCHER_ID) if r["state"] == "success"], "a first watcher run", 300, 2)
    assert loop.events(ASSET_NAMES[0]) == [] and loop.runs() == []

    # Data of this session (seeded by its uid): never the snapshot of an earlier session's release.
    csv = datagen.to_csv_bytes(datagen.generate_rows(400, seed=int(loop.uid, 16) % 100_000))
    s3.put_bytes(f"{loop.source}conversations-2026-12-02.csv", csv)
    t_upload = time.monotonic()
    (event,) = wait_until(lambda: loop.events(ASSET_NAMES[0]), "a landing asset event", 180, 1)
    assert event["source_dag_id"] == WATCHER_ID and event["source_task_id"] == "announce_new_data"
    assert event["extra"]["n_objects"] == 1 and event["extra"]["n_bytes"] == len(csv)
    assert event["extra"]["source"] == loop.source
    (run,) = wait_until(loop.runs, "the training run the asset event starts", 120, 1)
    assert run["run_type"] == "asset_triggered", run
    consumed = loop.q("SELECT x.event_id, e.source_task_id FROM dagrun_asset_event x JOIN dag_run r ON r.id = "
                      "x.dag_run_id JOIN asset_event e ON e.id = x.event_id WHERE r.run_id = :r", r=run["run_id"])
    # (with a kept state folder an earlier session's unconsumed landing event may be consumed as well)
    assert event["id"] in {c["event_id"] for c in consumed}
    assert {c["source_task_id"] for c in consumed} == {"announce_new_data"}
    print(f"\nLANDING: upload -> asset-triggered run {run['run_id']} in {time.monotonic() - t_upload:.0f}s")
    # The next listings see the same files: they announce nothing more.
    (announcing,) = [r["id"] for r in loop.runs(WATCHER_ID) if r["run_id"] == event["source_run_id"]]
    wait_until(lambda: loop.q("SELECT 1 FROM task_instance t JOIN dag_run r ON r.run_id = t.run_id AND r.dag_id = "
                              "t.dag_id WHERE r.dag_id = :d AND r.id > :i AND t.task_id = 'announce_new_data' AND "
                              "t.state = 'skipped'", d=WATCHER_ID, i=announcing),
               "a later watcher run that found no change", 180, 2)
    assert len(loop.events(ASSET_NAMES[0])) == 1 and len(loop.runs()) == 1
    r = loop.rest("PATCH", f"/dags/{WATCHER_ID}", json={"is_paused": True})  # its polling costs CPU the run needs
    assert r.status_code == 200, r.text

    # gate.require_approval: the run waits for a person, with the gate's numbers in the request.
    loop.wait_for_approval_request(run["run_id"])
    path = f"/dags/{DAG_ID}/dagRuns/{run['run_id']}/taskInstances/approve_release/-1/hitlDetails"
    detail = loop.rest("GET", path).json()
    gate = gate_row(run["run_id"])
    assert gate.release is True and gate.approval_status is None
    assert detail["options"] == ["Approve", "Reject"] and detail["defaults"] == ["Reject"]
    assert gate.summary in detail["body"] and "gate.require_approval is set" in detail["body"]
    assert list(detail["params"]) == ["comment"]
    assert loop.states(run["run_id"])["register_model"] is None  # nothing released while it waits

    answer = loop.answer(run["run_id"], "Approve", "checked the samples")
    assert loop.wait_finished(run["run_id"]) == "success", loop.states(run["run_id"])
    states = loop.states(run["run_id"])
    assert (states["approve_release"], states["record_approval"], states["release_or_skip"]) == ("success",) * 3
    assert states["register_model"] == "success" and states["skip_release"] == "skipped"
    gate = gate_row(run["run_id"])
    assert gate.approval_status == "approved" and gate.approval_by == answer["responded_by"]["name"]
    assert gate.approval_comment == "checked the samples" and gate.approval_at is not None
    assert "gate.require_approval is set" in gate.approval_reason

    # Lineage on the Assets: raw data (same digest as the landing listing), snapshot, model version.
    xcom = loop.xcom(run["run_id"])
    (raw,), (snap,), (model,) = (loop.events(n) for n in ASSET_NAMES[1:])
    assert raw["extra"]["digest"] == event["extra"]["digest"] and raw["source_run_id"] == run["run_id"]
    assert snap["extra"]["snapshot_id"] == xcom["prepare_chatml"]["snapshot_id"]
    assert model["extra"] == {"registered_model": loop.model_name, "version": xcom["register_model"]["version"],
                              "previous_version": None}


def test_rejected_release_is_skipped_and_recorded(loop):
    """A forced release still needs the approval (require_approval is set); the person rejects it. A manual run on
    its own prefix (the watcher does not list it)."""
    models_before = len(loop.events("chatbot_model"))
    run_id, source = f"reject-{loop.uid}", f"s3://ecb-landing/reject-{loop.uid}/"
    s3.put_bytes(f"{source}conversations.csv", datagen.to_csv_bytes(datagen.generate_rows(300, seed=43)))
    conf = {"data.source": source, "force_retrain": True, "force_deploy": True, "training.max_steps": 4}
    r = loop.rest("POST", f"/dags/{DAG_ID}/dagRuns", json={"dag_run_id": run_id, "logical_date": None, "conf": conf})
    assert r.status_code == 200, r.text
    loop.wait_for_approval_request(run_id)
    gate = gate_row(run_id)
    assert gate.release is True and gate.forced is True
    answer = loop.answer(run_id, "Reject", "not this one")
    assert loop.wait_finished(run_id) == "success", loop.states(run_id)
    states = loop.states(run_id)
    assert states["skip_release"] == "success" and states["register_model"] == "skipped"
    assert states["deploy_chat_service"] == "skipped"
    gate = gate_row(run_id)
    assert gate.approval_status == "rejected" and gate.approval_by == answer["responded_by"]["name"]
    assert gate.approval_comment == "not this one" and gate.release is True  # the gate's verdict stays as it was
    assert len(loop.events("chatbot_model")) == models_before  # no release, no model event


def canary_run(loop, name: str, candidate_thumbs_down: float, min_replies: int, seed: int):
    """Issue 15 through the training DAG on the real scheduler: a forced, approved release with release.canary_share
    from the run's conf is deployed as a canary beside the champion; while wait_for_canary is rescheduled (no worker
    slot held) simulated users chat and rate every reply (thumbs-down with probability ``candidate_thumbs_down`` on
    the candidate's, 0.05 on the champion's) until the run has finished, so chats keep going through the verdict's
    switch. Returns (deploy manifest, verdict manifest, traffic summary, release row)."""
    from tasks.demo import traffic

    run_id, source = f"{name}-{loop.uid}", f"s3://ecb-landing/{name}-{loop.uid}/"
    s3.put_bytes(f"{source}conversations.csv", datagen.to_csv_bytes(datagen.generate_rows(300, seed=seed)))
    conf = {"data.source": source, "force_retrain": True, "force_deploy": True, "training.max_steps": 4,
            "release.canary_share": 0.5, "release.canary_min_messages": min_replies,
            # The DAG's wiring is under test here (poll, reschedule, verdict, aliases, traffic through the switch);
            # the latency and cut-off checks are tested in tests/unit/test_canary.py. Two different tiny models on a
            # loaded 2-core machine differ in latency and cut-off replies by chance: those margins are open here.
            "release.canary_max_latency_ratio": 100.0, "release.canary_max_bad_reply_increase": 1.0}
    r = loop.rest("POST", f"/dags/{DAG_ID}/dagRuns", json={"dag_run_id": run_id, "logical_date": None, "conf": conf})
    assert r.status_code == 200, r.text
    loop.wait_for_approval_request(run_id)
    loop.answer(run_id, "Approve", f"{name}: canary first")
    wait_until(lambda: loop.states(run_id).get("wait_for_canary") == "up_for_reschedule",
               "wait_for_canary to be rescheduled (the canary has too few replies)", 600, 2, lambda: loop.why(run_id))
    deployed = loop.xcom(run_id)["deploy_chat_service"]
    assert deployed["canary"] is True

    done, summary = threading.Event(), {}
    chats = threading.Thread(target=lambda: summary.update(traffic.drive(
        deployed["service_url"], 2000, traffic.by_version({deployed["version"]: candidate_thumbs_down}, default=0.05),
        workers=3, seed=seed,
        stop=done)))
    chats.start()
    try:
        state = loop.wait_finished(run_id)
    finally:
        done.set()
        chats.join()
    assert state == "success", loop.why(run_id)
    with db.engine().connect() as conn:
        row = conn.execute(select(schema.releases).where(schema.releases.c.run_id == run_id)).mappings().one()
    return deployed, loop.xcom(run_id)["canary_verdict"], summary, dict(row)


def test_a_worse_canary_is_rolled_back_by_the_dag(loop):
    from mlflow.tracking import MlflowClient

    from tasks.demo import traffic

    champion = MlflowClient().get_model_version_by_alias(loop.model_name, "champion").version
    # 130 candidate replies at a 50% share: the verdict comes after ~260 chats (>= 200 even when the split runs
    # 3.7 standard deviations against the candidate); 100 left it at 183 chats once, when the verdict came quickly.
    deployed, verdict, chats, row = canary_run(loop, "worse", 0.6, min_replies=WORSE_REPLIES, seed=47)
    candidate = deployed["version"]
    assert deployed["champion_version"] == champion and candidate != champion
    assert chats["failed"] == 0, chats["failures"]  # none failed, the verdict's switch included
    assert chats["chats"] >= 200 and set(chats["by_version"]) == {champion, candidate}
    assert verdict["decision"] == "rollback" and any("thumbs-down" in r for r in verdict["reasons"]), verdict
    assert verdict["candidate"]["replies"] >= WORSE_REPLIES and verdict["champion_version"] == champion
    aliases = {a: str(v) for a, v in MlflowClient().get_registered_model(loop.model_name).aliases.items()}
    assert aliases["champion"] == champion and "candidate" not in aliases
    assert row["status"] == "rolled_back" and row["verdict"]["decision"] == "rollback"
    after = traffic.drive(deployed["service_url"], 20, traffic.by_version({}), workers=2, seed=5)
    assert after["failed"] == 0 and set(after["by_version"]) == {champion}  # every new chat on the champion


def test_a_good_canary_is_promoted_by_the_dag(loop):
    from mlflow.tracking import MlflowClient

    champion = MlflowClient().get_model_version_by_alias(loop.model_name, "champion").version
    deployed, verdict, chats, row = canary_run(loop, "good", 0.0, min_replies=CANARY_REPLIES, seed=53)
    candidate = deployed["version"]
    assert chats["failed"] == 0, chats["failures"]
    assert verdict["decision"] == "promote", verdict
    assert verdict["candidate"]["replies"] >= CANARY_REPLIES and verdict["champion_version"] == candidate
    aliases = {a: str(v) for a, v in MlflowClient().get_registered_model(loop.model_name).aliases.items()}
    assert aliases == {"champion": candidate, "previous": champion}
    assert row["status"] == "deployed" and row["verdict"]["decision"] == "promote" and row["decided_at"] is not None
    served = requests.get(f"{deployed['service_url']}/api/model", timeout=10).json()
    assert served["version"] == candidate and served["candidate"] is None


@pytest.mark.browser
def test_assets_page_lists_raw_data_snapshot_and_model(loop, tmp_path):
    wait_until(lambda: set(ASSET_NAMES) <= {a["name"] for a in loop.q("SELECT name FROM asset")},
               "the assets to be registered", 300, 2)
    shot = tmp_path / "airflow-assets.png"
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(f"{loop.api}/assets")
        for name in ASSET_NAMES:
            page.get_by_text(name, exact=True).first.wait_for(timeout=60000)
        page.screenshot(path=str(shot), full_page=True)
        content = page.content()
    print(f"\nASSETS PAGE: {shot}")
    assert shot.stat().st_size > 10000
    assert all(name in content for name in ASSET_NAMES)
