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
    cfg.write_text("pipeline:\n  retries: 0\n  step_timeout_s: 120\n")
    monkeypatch.setenv("ECB_CONFIG", str(cfg))
    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    tasks = bag.dags["ecommerce_chatbot_training"].tasks
    assert {(t.retries, t.execution_timeout) for t in tasks} == {(0, timedelta(seconds=120))}


def test_trigger_form_comes_from_config(dagbag):
    from tasks.config import load_config

    params = dagbag.dags["ecommerce_chatbot_training"].params
    assert params["force_retrain"] is False
    assert params["data.source"] == load_config().data.source
    assert params["hpo.n_trials"] == load_config().hpo.n_trials and params["hpo.enabled"] is True
    assert "data.max_rows" in params
    assert params.get_param("data.max_rows").schema["type"] == "integer"
    assert params.get_param("data.source").description  # help text reaches the form


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
    # The quality gate is a step; a branch task follows its decision to one of two tasks.
    assert dag.get_task("quality_gate").upstream_task_ids == {"evaluate"}
    assert dag.get_task("release_or_skip").upstream_task_ids == {"quality_gate"}
    assert dag.get_task("release_or_skip").downstream_task_ids == {"register_model", "skip_release"}
    assert dag.get_task("register_model").upstream_task_ids == {"release_or_skip", "quality_gate", "finetune",
                                                                "prepare_chatml"}
    assert dag.get_task("skip_release").upstream_task_ids == {"release_or_skip", "quality_gate"}
    # The deploy step is the last task: after the push (skipped pushes succeed), never after skip_release.
    deploy = dag.get_task("deploy_chat_service")
    assert deploy.upstream_task_ids == {"push_to_hub", "register_model", "prepare_chatml"}
    assert deploy.downstream_task_ids == set() and dag.get_task("skip_release").downstream_task_ids == set()
    assert "skip_release" not in {t.task_id for t in deploy.get_flat_relatives(upstream=True)}


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
