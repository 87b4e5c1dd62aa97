"""
### E-commerce support chatbot: nightly training pipeline

1. `sync_raw_data` mirrors `data.source` into the platform's S3 raw area (incremental, manifest in S3 + Postgres).
2. `prepare_chatml` builds a ChatML snapshot (train / validation / test by intent; bad rows quarantined with a
   reason); the same input is prepared once.
3. `data_or_params_changed` stops the run early when the snapshot and training config equal the released model's.
4. `plan_hpo` -> `hpo_trial` (one mapped task per Optuna trial, `gpu` pool) -> `select_best` -> `finetune`
   (LoRA / QLoRA, resumable from S3 checkpoints).
5. `evaluate` scores the candidate and the registry's champion on the same test split; `quality_gate` (read its
   log for why a model was or was not released) branches to `register_model` -> `push_to_hub` ->
   `deploy_chat_service` (starts or hot-reloads the chat service, smoke-tests it), or `skip_release`.

Every step is `python -m tasks <step>` run by one step mechanism (`ecb_airflow.steps`); XCom carries only the
small JSON manifests the steps print.

**Trigger with config** to override a run: `force_retrain` trains even when nothing changed; `force_deploy`
releases whatever the gate says; `gate.min_improvement_threshold` sets the bar; `hpo.enabled` and
`hpo.n_trials` steer the search; the other fields are the platform config (`ecb config` lists all of them).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import dag, task

from ecb_airflow.gate import QualityGateOperator
from ecb_airflow.params import dag_params
from ecb_airflow.steps import from_step, mapped_step, step
from tasks.config import load_config

CFG = load_config()  # parsed once per DAG-file parse; pure Python, no ML imports

default_args = {
    "owner": "ml-platform",
    "retries": max(CFG.pipeline.retries, 2),
    "retry_delay": timedelta(seconds=CFG.pipeline.retry_delay_s),
    "retry_exponential_backoff": True,  # rides out short S3 / Postgres outages
}


@dag(
    dag_id="ecommerce_chatbot_training",
    schedule=CFG.pipeline.schedule,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=default_args,
    params=dag_params(),
    tags=["chatbot", "training", "ml-platform"],
    doc_md=__doc__,
)
def ecommerce_chatbot_training():
    timeout = timedelta(seconds=CFG.pipeline.step_timeout_s)
    snapshot = {"snapshot_uri": from_step("prepare_chatml", "snapshot_uri")}
    sync = step("sync_raw_data", timeout=timeout)
    prep = step("prepare_chatml", inputs={"raw_manifest": from_step("sync_raw_data", "manifest_uri")},
                timeout=timeout)

    @task.short_circuit
    def data_or_params_changed(prep_manifest: dict, params: dict | None = None) -> bool:
        """Stop the nightly run early when it would retrain on exactly what the released model saw."""
        import logging

        log = logging.getLogger("airflow.task")
        release = prep_manifest.get("last_release")
        if params and params.get("force_retrain"):
            log.info("Continuing: force_retrain is set (snapshot %s).", prep_manifest["snapshot_id"])
            return True
        if prep_manifest["unchanged_since_release"]:
            log.info("Stopping early: snapshot %s and config hash %s equal those of release %s (run %s); "
                     "set force_retrain to train anyway.", prep_manifest["snapshot_id"],
                     prep_manifest["config_hash"], release["registry_version"], release["run_id"])
            return False
        log.info("Continuing: snapshot %s / config %s differ from the last release (%s).",
                 prep_manifest["snapshot_id"], prep_manifest["config_hash"],
                 f"snapshot {release['snapshot_id']}, config {release['config_hash']}" if release else "none yet")
        return True

    @task
    def trial_inputs(plan_manifest: dict, prep_manifest: dict) -> list[dict]:
        """One input dict per Optuna trial slot (empty when HPO is off: the mapped task is then skipped)."""
        return [{**slot, "snapshot_uri": prep_manifest["snapshot_uri"]} for slot in plan_manifest["slots"]]

    changed = data_or_params_changed(prep.output)
    plan = step("plan_hpo", timeout=timeout)
    trials = mapped_step("hpo_trial", trial_inputs(plan.output, prep.output), gpu=True, timeout=timeout)
    # all_done: failed or pruned trials (or none at all, with HPO off) must not block choosing the best.
    best = step("select_best", inputs={"study": from_step("plan_hpo", "study")}, trigger_rule="all_done",
                timeout=timeout)
    tune = step("finetune", gpu=True, timeout=timeout,
                inputs={**snapshot, "best_params": from_step("select_best", "best_params_json")})
    tuned = {"adapter_uri": from_step("finetune", "adapter_uri"),
             "mlflow_run_id": from_step("finetune", "mlflow_run_id")}
    evaluate = step("evaluate", gpu=True, timeout=timeout, inputs={**snapshot, **tuned})
    gate = QualityGateOperator(task_id="quality_gate",
                               inputs={"evaluation": "{{ ti.xcom_pull(task_ids='evaluate') | tojson }}"})
    register = step("register_model", timeout=timeout, inputs={
        **tuned, "snapshot_id": from_step("prepare_chatml", "snapshot_id"),
        "decision_id": "{{ ti.xcom_pull(task_ids='quality_gate', key='decision')['decision_id'] }}"})
    version = {"registry_version": from_step("register_model", "version")}
    push = step("push_to_hub", timeout=timeout, inputs={"adapter_uri": from_step("finetune", "adapter_uri"), **version})
    # Runs after a push that was skipped for lack of a token too (that push succeeds), never after skip_release.
    deploy = step("deploy_chat_service", timeout=timeout,
                  inputs={**version, "snapshot_id": from_step("prepare_chatml", "snapshot_id")})

    @task
    def skip_release(ti=None) -> None:
        """The gate kept the champion; say so where people look first."""
        import logging

        decision = ti.xcom_pull(task_ids="quality_gate", key="decision")
        logging.getLogger("airflow.task").info("No release: %s", decision["summary"])

    sync >> prep >> changed >> plan >> trials >> best >> tune >> evaluate >> gate
    gate >> register >> push >> deploy
    gate >> skip_release()


ecommerce_chatbot_training()
