"""DAG integrity (Astronomer style): every DAG imports, is configured for production, and parses light."""

import copy
import json
import subprocess
import sys
from datetime import timedelta

import pytest

from tests.conftest import REPO

HEAVY = ("torch", "transformers", "peft", "datasets", "mlflow")


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}
    assert "ecommerce_chatbot_training" in dagbag.dags


@pytest.mark.parametrize("dag_id", ["ecommerce_chatbot_training"])
def test_dag_is_production_ready(dagbag, dag_id):
    dag = dagbag.dags[dag_id]
    assert dag.tags, "every DAG needs tags"
    assert dag.catchup is False
    assert dag.max_active_runs == 1
    assert dag.doc_md and "Trigger with config" in dag.doc_md
    assert dag.schedule is not None  # nightly retraining
    for task in dag.tasks:
        assert task.retries >= 2, f"{task.task_id} has retries={task.retries}"


def test_every_dag_has_tags_and_retries(dagbag):
    for dag_id, dag in dagbag.dags.items():
        assert dag.tags, dag_id
        assert all(t.retries >= 2 for t in dag.tasks), dag_id


def test_pipeline_settings_are_used_as_configured(monkeypatch, tmp_path):
    """pipeline.retries is "Airflow retries per task": a configured 0 means 0 (no floor); step_timeout_s is every
    task's execution_timeout, mapped trials included."""
    from airflow.dag_processing.dagbag import DagBag

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("pipeline:\n  retries: 0\n  poll_retries: 0\n  step_timeout_s: 120\n")
    monkeypatch.setenv("ECB_CONFIG", str(cfg))
    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    tasks = bag.dags["ecommerce_chatbot_training"].tasks
    assert {(t.retries, t.execution_timeout) for t in tasks} == {(0, timedelta(seconds=120))}
    # retry_delay_s "doubles each retry": Airflow 3.3 reads retry_exponential_backoff as the multiplier (True = 1).
    steps = [t for t in tasks if t.task_id != "wait_for_canary"]
    assert {t.retry_exponential_backoff for t in steps} == {2.0}


def test_trigger_form_comes_from_config(dagbag):
    from tasks.config import load_config

    params = dagbag.dags["ecommerce_chatbot_training"].params
    assert params["force_retrain"] is False
    assert params["data.source"] == load_config().data.source
    assert params["hpo.n_trials"] == load_config().hpo.n_trials and params["hpo.enabled"] is True
    assert "data.max_rows" in params
    assert params.get_param("data.max_rows").schema["type"] == "integer"
    assert params.get_param("data.source").description  # help text reaches the form


def test_a_runs_conf_does_not_change_the_form_of_later_parses():
    """A run's conf resolves into the DAG's Param objects in place: a DAG parsed after it (same process, as in the
    dag-processor) must still show the defaults."""
    from airflow.sdk.definitions.param import ParamsDict

    from ecb_airflow.params import dag_params

    run = ParamsDict(dag_params())
    run.update({"force_retrain": True, "force_deploy": True})
    assert run["force_retrain"] is True
    later = ParamsDict(dag_params())
    assert later["force_retrain"] is False and later["force_deploy"] is False


def test_pipeline_shape(dagbag):
    """Edges from the DAG's >> and from the data: a task reading `step.output["key"]` is downstream of that step."""
    dag = dagbag.dags["ecommerce_chatbot_training"]
    assert dag.get_task("prepare_chatml").upstream_task_ids == {"sync_raw_data"}
    assert dag.get_task("data_or_params_changed").upstream_task_ids == {"prepare_chatml"}
    assert dag.get_task("plan_hpo").upstream_task_ids == {"data_or_params_changed"}
    assert dag.get_task("hpo_trial").pool == "gpu" and dag.get_task("finetune").pool == "gpu"
    assert dag.get_task("select_best").trigger_rule == "all_done"  # failed/pruned trials must not block it
    assert dag.get_task("select_best").upstream_task_ids == {"hpo_trial", "plan_hpo"}
    assert dag.get_task("finetune").upstream_task_ids == {"select_best", "prepare_chatml"}
    # Everything that trains or releases is behind the short circuit, whatever else it reads from.
    behind = {t.task_id for t in dag.get_task("data_or_params_changed").get_flat_relatives(upstream=False)}
    assert behind == {t.task_id for t in dag.tasks} - {"sync_raw_data", "prepare_chatml", "data_or_params_changed"}
    # The quality gate is a step; a person may be asked (approve_release, its answer recorded by a step); a branch
    # task follows the decision to one of two tasks.
    assert dag.get_task("quality_gate").upstream_task_ids == {"evaluate"}
    assert dag.get_task("approve_release").upstream_task_ids == {"quality_gate"}
    assert dag.get_task("approve_release").downstream_task_ids == {"record_approval"}
    assert dag.get_task("record_approval").upstream_task_ids == {"approve_release", "quality_gate"}
    assert dag.get_task("release_or_skip").upstream_task_ids == {"quality_gate", "record_approval"}
    assert dag.get_task("release_or_skip").downstream_task_ids == {"register_model", "skip_release"}
    assert dag.get_task("register_model").upstream_task_ids == {"release_or_skip", "quality_gate", "finetune",
                                                                "prepare_chatml"}
    assert dag.get_task("skip_release").upstream_task_ids == {"release_or_skip", "quality_gate", "record_approval"}
    # Nobody asked = approve_release and record_approval skipped: the branch and skip_release must still run;
    # register_model runs only after everything upstream of it succeeded.
    assert dag.get_task("release_or_skip").trigger_rule == "none_failed_min_one_success"
    assert dag.get_task("skip_release").trigger_rule == "none_failed_min_one_success"
    assert dag.get_task("register_model").trigger_rule == "all_success"
    assert dag.get_task("record_approval").trigger_rule == "all_success"
    # The deploy step runs after register_model, never after skip_release; then the canary is waited for and judged,
    # and only then is the release published: nothing reaches the Hub before its verdict.
    deploy = dag.get_task("deploy_chat_service")
    assert deploy.upstream_task_ids == {"register_model", "prepare_chatml"}
    assert deploy.downstream_task_ids == {"wait_for_canary"}
    assert dag.get_task("skip_release").downstream_task_ids == set()
    assert dag.get_task("wait_for_canary").upstream_task_ids == {"deploy_chat_service", "register_model"}
    verdict = dag.get_task("canary_verdict")
    assert verdict.upstream_task_ids == {"wait_for_canary", "register_model"}
    assert verdict.downstream_task_ids == {"push_to_hub"}
    push = dag.get_task("push_to_hub")
    assert push.upstream_task_ids == {"canary_verdict", "finetune", "register_model"}
    assert push.downstream_task_ids == set() and push.trigger_rule == "all_success"
    assert "skip_release" not in {t.task_id for t in push.get_flat_relatives(upstream=True)}


def test_data_passes_one_way(dagbag):
    """Upstream values reach steps as XComArgs to manifest fields, never as hand-written xcom_pull templates."""
    from airflow.sdk import XComArg

    dag = dagbag.dags["ecommerce_chatbot_training"]
    for task in dag.tasks:
        for name, value in (getattr(task, "inputs", None) or {}).items():
            assert isinstance(value, XComArg) or "xcom_pull" not in str(value), (task.task_id, name)
    gate_inputs = dag.get_task("quality_gate").inputs
    assert isinstance(gate_inputs["evaluation"], XComArg) and gate_inputs["evaluation"].operator.task_id == "evaluate"
    assert gate_inputs["force_deploy"] == "{{ params.force_deploy | lower }}"
    assert all(getattr(dag.get_task(t), "multiple_outputs", False) for t in ("prepare_chatml", "finetune",
                                                                             "quality_gate", "register_model"))


@pytest.mark.parametrize("force", [True, False])
def test_force_deploy_renders_true_or_false(dagbag, force):
    dag = dagbag.dags["ecommerce_chatbot_training"]
    gate = dag.get_task("quality_gate")
    params = copy.deepcopy(dag.params)
    params["force_deploy"] = force  # as a trigger form or run conf sets it (validated as a boolean)
    for context_params in (params, params.validate()):  # the ParamsDict a task gets, and a plain dict
        assert gate.render_template(gate.inputs["force_deploy"], {"params": context_params}) == str(force).lower()


PREP = {"snapshot_id": "snap-2", "config_hash": "cfg-2", "unchanged_since_release": False,
        "last_release": {"registry_version": "4", "run_id": "run-1", "snapshot_id": "snap-1", "config_hash": "cfg-1"}}


@pytest.mark.parametrize(("prep", "force", "go", "words"), [
    (PREP, False, True, "differ from the last release (snapshot snap-1, config cfg-1)"),
    ({**PREP, "last_release": None}, False, True, "(none yet)"),
    ({**PREP, "unchanged_since_release": True, "snapshot_id": "snap-1", "config_hash": "cfg-1"}, False, False,
     "Stopping early: snapshot snap-1 and config hash cfg-1 equal those of release 4 (run run-1)"),
    ({**PREP, "unchanged_since_release": True}, True, True, "force_retrain is set (snapshot snap-2)"),
], ids=["changed", "first-release", "unchanged", "unchanged-but-forced"])
def test_short_circuit_decision(prep, force, go, words):
    from ecb_airflow.decisions import keep_training

    decided, sentence = keep_training(prep, force_retrain=force)
    assert decided is go and words in sentence


@pytest.mark.parametrize(("release", "branch"), [(True, "register_model"), (False, "skip_release")])
def test_gate_branch_choice(dagbag, release, branch):
    from ecb_airflow.decisions import gate_branch

    decision = {"release": release, "decision_id": 12, "summary": "Not released runs/x: delta below threshold."}
    chosen, sentence = gate_branch(decision)
    assert chosen == branch
    assert sentence == f"Gate decision 12 -> {branch}: {decision['summary']}"
    # Whichever it returns is a task the branch task leads to.
    assert chosen in dagbag.dags["ecommerce_chatbot_training"].get_task("release_or_skip").downstream_task_ids


def test_parsing_dags_imports_no_ml_libraries():
    """Parse dags/ in a clean interpreter (other tests import torch) and list the heavy modules it pulled in."""
    code = (
        "import sys, json\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        f"bag = DagBag(dag_folder={str(REPO / 'dags')!r})\n"
        f"print(json.dumps({{'errors': list(bag.import_errors), 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out == {"errors": [], "heavy": []}


def test_canary_wait_is_a_rescheduling_sensor_of_the_status_step(dagbag):
    """The wait gives its worker slot back between polls (reschedule mode), polls at release.canary_poll_s, runs the
    canary_status step with the registered version, and its timeout is a backstop beyond the step's own limit."""
    from airflow.sdk import BaseSensorOperator, XComArg

    from tasks.config import load_config

    cfg = load_config().release
    wait = dagbag.dags["ecommerce_chatbot_training"].get_task("wait_for_canary")
    assert isinstance(wait, BaseSensorOperator) and wait.mode == "reschedule" and wait.reschedule is True
    assert wait.step == "canary_status" and wait.poke_interval == cfg.canary_poll_s
    assert wait.timeout > cfg.canary_timeout_s
    # A lost poke (apache/airflow#71172) costs one poll interval, not the canary's verdict.
    assert wait.retries == load_config().pipeline.poll_retries >= 5
    assert wait.retry_delay.total_seconds() == cfg.canary_poll_s and wait.retry_exponential_backoff == 0
    assert isinstance(wait.inputs["registry_version"], XComArg)
    assert wait.inputs["registry_version"].operator.task_id == "register_model"
    assert set(wait.template_fields) >= {"inputs", "overrides"}  # upstream values are rendered like any step's
    verdict = dagbag.dags["ecommerce_chatbot_training"].get_task("canary_verdict")
    assert verdict.step == "canary_verdict" and verdict.inputs["registry_version"].operator.task_id == "register_model"


def test_rollback_dag_is_manual_with_a_form(dagbag):
    dag = dagbag.dags["ecommerce_chatbot_rollback"]
    assert dag.schedule is None and dag.catchup is False and dag.max_active_runs == 1 and dag.tags
    assert dag.doc_md and "Trigger with config" in dag.doc_md
    assert set(dag.params) >= {"version", "reason"}
    assert dag.params.get_param("reason").schema["minLength"] == 1  # a rollback says why
    (task,) = dag.tasks
    assert task.step == "rollback_release" and task.retries >= 2
    rendered = task.render_template(task.inputs, {"params": {"version": "3", "reason": "bad replies"},
                                                  "dag_run": type("Run", (), {"triggering_user_name": "alice"})()})
    assert rendered == {"to": "3", "reason": "bad replies", "by": "alice"}


@pytest.mark.parametrize("ready", [True, False])
def test_step_poll_pokes_the_step_once_per_poke(monkeypatch, ready):
    """A poke runs the step operator's execute once; its manifest's `ready` is the sensor's answer and the
    manifest its XCom value."""
    from ecb_airflow import polling, steps

    calls = []
    manifest = {"ready": ready, "candidate_replies": 7}
    monkeypatch.setattr(steps.LocalStepOperator, "execute", lambda self, context: calls.append(context) or manifest)
    sensor = polling.step_poll("canary_status", task_id="wait", poke_interval_s=5, timeout_s=60, retries=3,
                               inputs={"registry_version": "2"})
    assert isinstance(sensor, steps.LocalStepOperator) and sensor.step == "canary_status"
    result = sensor.poke({"run_id": "r"})
    assert calls == [{"run_id": "r"}] and result.is_done is ready and result.xcom_value == manifest


# --- data-aware scheduling (Assets) and the landing watcher --------------------------------------------------------

WATCHER_ID = "ecommerce_chatbot_landing_watcher"


def parse_with(monkeypatch, tmp_path, yaml_text: str):
    """The DAGs parsed with one more config file on top of the test config (what a deployment's file would set)."""
    import os

    from airflow.dag_processing.dagbag import DagBag

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml_text)
    monkeypatch.setenv("ECB_CONFIG", os.pathsep.join([os.environ["ECB_CONFIG"], str(cfg)]))
    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    return bag


def test_training_runs_nightly_or_when_raw_data_lands(dagbag):
    from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable

    from tasks.config import load_config

    cfg = load_config()
    timetable = dagbag.dags["ecommerce_chatbot_training"].timetable
    assert isinstance(timetable, AssetOrTimeSchedule)
    assert isinstance(timetable.timetable, CronTriggerTimetable)
    assert timetable.timetable.expression == "0 0 * * *" and cfg.pipeline.schedule == "@daily"
    (landing,) = timetable.asset_condition.objects
    assert (landing.name, landing.uri) == ("support_conversations_landing", cfg.data.source.rstrip("/"))


def test_schedule_settings(monkeypatch, tmp_path):
    """'' = no nightly run (new data only); landing_check_s is the watcher's period, 0 turns polling off; a local
    data.source is a file:// asset."""
    from airflow.sdk import Asset

    bag = parse_with(monkeypatch, tmp_path, f"pipeline:\n  schedule: ''\n  landing_check_s: 0\n"
                                            f"data:\n  source: {tmp_path / 'landing'}\n")
    schedule = bag.dags["ecommerce_chatbot_training"].timetable.asset_condition
    assert [a.uri for a in schedule.objects] == [(tmp_path / "landing").as_uri()]
    assert bag.dags[WATCHER_ID].schedule is None
    assert not isinstance(bag.dags["ecommerce_chatbot_training"].schedule, str)
    bag = parse_with(monkeypatch, tmp_path, "pipeline:\n  schedule: '30 2 * * *'\n  landing_check_s: 45\n")
    assert bag.dags["ecommerce_chatbot_training"].timetable.timetable.expression == "30 2 * * *"
    assert bag.dags[WATCHER_ID].schedule == timedelta(seconds=45)
    assert isinstance(bag.dags[WATCHER_ID].get_task("announce_new_data").outlets[0], Asset)


def test_sqs_watcher_replaces_polling(monkeypatch, tmp_path):
    """With an SQS queue for the prefix's S3 notifications, the landing asset is watched on the triggerer and the
    watcher DAG does not poll."""
    from airflow.providers.amazon.aws.triggers.sqs import SqsSensorTrigger

    queue = "https://sqs.eu-west-1.amazonaws.com/123456789012/ecb-landing-events"
    bag = parse_with(monkeypatch, tmp_path, f"pipeline:\n  landing_queue_url: {queue}\n")
    (landing,) = bag.dags["ecommerce_chatbot_training"].timetable.asset_condition.objects
    (watcher,) = landing.watchers
    assert watcher.name == "landing_s3_notifications" and isinstance(watcher.trigger, SqsSensorTrigger)
    assert watcher.trigger.sqs_queue == queue and watcher.trigger.aws_conn_id == "aws_default"
    assert bag.dags[WATCHER_ID].schedule is None


def test_assets_lineage(dagbag):
    """raw data -> snapshot -> model, each emitted by the step that writes it, with the manifest fields as extra;
    the training DAG never emits on the landing asset it is scheduled on (it would start itself again)."""
    from ecb_airflow import assets
    from tasks.config import load_config

    cfg = load_config()
    dag = dagbag.dags["ecommerce_chatbot_training"]
    emitted = {t.task_id: [(a.name, a.uri) for a in t.outlets] for t in dag.tasks if t.outlets}
    assert emitted == {
        "sync_raw_data": [("support_conversations_raw", f"s3://{cfg.storage.bucket}/raw")],
        "prepare_chatml": [("chatml_snapshot", f"s3://{cfg.storage.bucket}/snapshots")],
        "register_model": [("chatbot_model", f"models:/{cfg.release.registered_model}")],
    }
    fields = {t: dag.get_task(t).outlet_fields for t in emitted}
    assert fields == {"sync_raw_data": assets.RAW_FIELDS, "prepare_chatml": assets.SNAPSHOT_FIELDS,
                      "register_model": assets.MODEL_FIELDS}
    assert "digest" in fields["sync_raw_data"] and "snapshot_id" in fields["prepare_chatml"]
    assert "version" in fields["register_model"]
    watcher = dagbag.dags[WATCHER_ID]
    assert [a.name for a in watcher.get_task("announce_new_data").outlets] == ["support_conversations_landing"]
    assert [a.name for a in watcher.get_task("announce_new_data").inlets] == ["support_conversations_landing"]


def test_outlet_event_extra_is_the_manifest(dagbag):
    """The post-execute hook puts the named manifest fields (those present) on the task's asset event."""
    from airflow.sdk.execution_time.context import OutletEventAccessors

    from ecb_airflow.step_operator import attach_manifest_to_outlets

    task = dagbag.dags["ecommerce_chatbot_training"].get_task("sync_raw_data")
    assert task._post_execute_hook is attach_manifest_to_outlets
    events = OutletEventAccessors()
    manifest = {"digest": "ab" * 32, "n_objects": 2, "n_bytes": 100, "n_copied": 1, "manifest_uri": "s3://b/m.json",
                "n_ignored": 3, "step": "sync_raw_data"}
    attach_manifest_to_outlets({"task": task, "outlet_events": events}, manifest)
    assert events[task.outlets[0]].extra == {k: manifest[k] for k in ("digest", "n_objects", "n_bytes", "n_copied",
                                                                      "manifest_uri")}
    assert dagbag.dags["ecommerce_chatbot_training"].get_task("evaluate")._post_execute_hook is None  # no outlets


def test_landing_watcher_dag(dagbag):
    from tasks.config import load_config

    dag = dagbag.dags[WATCHER_ID]
    assert dag.catchup is False and dag.max_active_runs == 1 and dag.tags and dag.doc_md
    assert dag.schedule == timedelta(seconds=load_config().pipeline.landing_check_s)
    assert dag.get_task("announce_new_data").upstream_task_ids == {"list_landing"}
    assert dag.get_task("list_landing").step == "list_landing"


LISTING = {"source": "s3://ecb-landing/x/", "digest": "d2" * 32, "n_objects": 3, "n_bytes": 4096}


@pytest.mark.parametrize(("listing", "last", "changed", "words"), [
    (LISTING, None, True, "3 file(s), 4096 bytes, digest d2d2d2d2d2d2 (before: none announced yet)"),
    (LISTING, {"digest": "d1" * 32, "n_objects": 2}, True, "(before: digest d1d1d1d1d1d1, 2 file(s))"),
    (LISTING, {"digest": "d2" * 32, "n_objects": 3}, False, "No change in s3://ecb-landing/x/"),
    ({**LISTING, "n_objects": 0, "n_bytes": 0}, None, False, "No raw data in s3://ecb-landing/x/"),
    (LISTING, {"note": "an event made by hand, without a digest"}, True, "none announced yet"),
], ids=["first", "changed", "unchanged", "empty", "foreign-event"])
def test_landing_changed(listing, last, changed, words):
    from ecb_airflow.decisions import landing_changed

    decided, sentence = landing_changed(listing, last)
    assert decided is changed and words in sentence


# --- human approval of a release ------------------------------------------------------------------------------------

GATE = {"release": True, "forced": False, "decision_id": 12, "summary": "Released: +0.0210 over champion 3.",
        "reasons": ["delta +0.0210 > threshold 0.0010"], "delta": 0.021, "ci_low": 0.004, "ci_high": 0.038}


@pytest.mark.parametrize(("decision", "require", "asked", "words"), [
    (GATE, False, False, "releases, require_approval is off and the CI is [+0.0040, +0.0380]"),
    (GATE, True, True, "Approval asked for gate decision 12: gate.require_approval is set."),
    ({**GATE, "ci_low": -0.002}, False, True, "[-0.0020, +0.0380], includes 0: the improvement may be noise"),
    ({**GATE, "ci_low": 0.0}, False, True, "includes 0"),
    ({**GATE, "ci_low": -0.002}, True, True, "gate.require_approval is set; the bootstrap 95% CI"),
    ({**GATE, "delta": None, "ci_low": None, "ci_high": None}, False, False,
     "require_approval is off and there is no champion to compare with"),
    ({**GATE, "ci_low": None, "ci_high": None, "ci_problem": "the bootstrap failed: boom"}, False, True,
     "compared with the champion (delta +0.0210) but has no confidence interval (the bootstrap failed: boom)"),
    ({**GATE, "ci_low": None, "ci_high": None}, False, True, "no confidence interval (none was computed)"),
    ({**GATE, "forced": True, "ci_low": None, "ci_high": None}, False, False, "forced (force_deploy) without a CI"),
    ({**GATE, "release": False, "ci_low": -0.01}, True, False, "keeps the champion"),
    ({**GATE, "forced": True, "ci_low": -0.01}, False, False, "No approval asked"),
    ({**GATE, "forced": True, "ci_low": -0.01}, True, True, "gate.require_approval is set."),
], ids=["significant", "required", "ci-straddles-0", "ci-touches-0", "both", "first-model", "champion-no-ci",
        "champion-no-ci-old-manifest", "forced-no-ci", "blocked", "forced-straddling", "forced-required"])
def test_approval_needed(decision, require, asked, words):
    from ecb_airflow.decisions import approval_needed

    decided, sentence = approval_needed(decision, require)
    assert decided is asked and words in sentence


@pytest.mark.parametrize(("event", "status"), [
    ({"chosen_options": ["Approve"], "responded_by_user": {"id": "7", "name": "alice"}}, "approved"),
    ({"chosen_options": ["Reject"], "responded_by_user": {"id": "8", "name": "bob"}}, "rejected"),
    ({"chosen_options": ["Reject"], "responded_by_user": None, "timedout": True}, "timed_out"),
    ({"chosen_options": ["Approve"], "responded_by_user": None}, "timed_out"),  # nobody answered: never approved
], ids=["approve", "reject", "timeout", "no-responder"])
def test_approval_answer(event, status):
    from datetime import UTC, datetime

    from ecb_airflow.decisions import approval_answer

    at = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)
    answer = approval_answer({**event, "responded_at": at, "params_input": {"comment": "checked the samples"}}, "why")
    assert answer["status"] == status and answer["at"] == "2026-12-02T10:00:00+00:00" and answer["reason"] == "why"
    assert answer["by"] == (event["responded_by_user"] or {}).get("name")
    assert answer["comment"] == "checked the samples"
    json.dumps(answer)  # it goes to the record_approval step as JSON


@pytest.mark.parametrize(("approval", "branch"), [
    (None, "register_model"),
    ({"release": True, "decision_id": 12, "summary": "Approved by alice: ..."}, "register_model"),
    ({"release": False, "decision_id": 12, "summary": "Rejected by bob: not released."}, "skip_release"),
], ids=["nobody-asked", "approved", "rejected"])
def test_gate_branch_follows_the_answer(dagbag, approval, branch):
    from ecb_airflow.decisions import final_summary, gate_branch

    chosen, sentence = gate_branch(GATE, approval)
    assert chosen == branch and sentence.endswith(final_summary(GATE, approval))
    assert chosen in dagbag.dags["ecommerce_chatbot_training"].get_task("release_or_skip").downstream_task_ids


def test_approval_body_shows_the_gate_numbers():
    from ecb_airflow.decisions import approval_body

    body = approval_body({**GATE, "ci_low": -0.002}, "Approval asked for gate decision 12: CI includes 0.", 3600)
    for text in ("**Released: +0.0210 over champion 3.**", "| Weighted score delta (candidate - champion) | +0.0210 |",
                 "| Bootstrap 95% CI of the delta | [-0.0020, +0.0380] |", "- delta +0.0210 > threshold 0.0010",
                 "CI includes 0.", "within 3600 s the candidate is not released"):
        assert text in body, text


def test_approval_task(dagbag):
    """Asks only when needed (else skipped), Reject on timeout, one form field of its own, the answer as XCom."""
    from datetime import UTC, datetime

    from airflow.providers.standard.operators.hitl import HITLOperator
    from airflow.sdk.exceptions import AirflowSkipException

    from tasks.config import load_config

    op = copy.deepcopy(dagbag.dags["ecommerce_chatbot_training"].get_task("approve_release"))
    assert isinstance(op, HITLOperator)
    assert op.options == ["Approve", "Reject"] and op.defaults == ["Reject"] and op.multiple is False
    assert op.response_timeout == timedelta(seconds=load_config().gate.approval_timeout_s)
    assert list(op.serialized_params) == ["comment"]  # not the DAG's trigger form
    op.decision = GATE
    with pytest.raises(AirflowSkipException, match="No approval asked"):
        op.execute({"params": {"gate.require_approval": False}, "run_id": "r1"})
    event = {"chosen_options": ["Reject"], "params_input": {"comment": "too risky"}, "timedout": False,
             "responded_at": datetime(2026, 12, 2, tzinfo=UTC), "responded_by_user": {"id": "1", "name": "a"}}
    answer = op.execute_complete({"params": {"gate.require_approval": True}, "run_id": "r1"}, event)
    assert answer["status"] == "rejected" and answer["by"] == "a" and answer["comment"] == "too risky"
    assert answer["reason"] == "Approval asked for gate decision 12: gate.require_approval is set."
    with pytest.raises(ValueError, match="not in"):
        op.execute_complete({"params": {}, "run_id": "r1"}, {**event, "chosen_options": ["Maybe"]})


def test_require_approval_is_on_the_trigger_form(dagbag):
    params = dagbag.dags["ecommerce_chatbot_training"].params
    assert params["gate.require_approval"] is False
    assert params.get_param("gate.require_approval").schema["type"] == "boolean"
