"""
### E-commerce support chatbot: nightly training pipeline

Runs nightly (`pipeline.schedule`) and whenever new raw data lands in `data.source` (the landing asset; the
`ecommerce_chatbot_landing_watcher` DAG emits its events). Assets page: landing -> raw -> snapshot -> model.

1. `sync_raw_data` mirrors `data.source` into the platform's S3 raw area (incremental, manifest in S3 + Postgres).
2. `prepare_chatml` builds a ChatML snapshot (train / validation / test by intent; bad rows quarantined with a
   reason); the same input is prepared once.
3. `data_or_params_changed` stops the run early when the snapshot and training config equal the released model's.
4. `plan_hpo` -> `hpo_trial` (one mapped task per Optuna trial, `gpu` pool) -> `select_best` -> `finetune`
   (LoRA / QLoRA, resumable from S3 checkpoints).
5. `evaluate` scores the candidate and the registry's champion on the same test split; the `quality_gate` step
   (read its log for why a model was or was not released) decides, and `release_or_skip` follows its decision to
   `register_model` -> `deploy_chat_service` (starts or hot-reloads the chat service, smoke-tests it) ->
   `wait_for_canary` -> `canary_verdict` -> `push_to_hub` (only a final release is published), or to
   `skip_release`. When `gate.require_approval` is set, or the gate releases on a delta whose bootstrap CI includes
   0 or has no CI against a champion at all, `approve_release` waits for a person (Required actions; no answer in
   `gate.approval_timeout_s` = Reject) and `record_approval` writes the answer and who gave it to `gate_decisions`
   first.
6. With `release.canary_share` > 0 the new version is deployed as a canary (registry alias `candidate`) beside the
   champion; `wait_for_canary` polls until it has `release.canary_min_messages` replies (or
   `release.canary_timeout_s`), rescheduling in between, and `canary_verdict` promotes it or rolls it back (its log
   gives the numbers and the decision in one sentence). Roll back by hand: DAG `ecommerce_chatbot_rollback`.

Every step is `python -m tasks <step>` run by one step mechanism (`ecb_airflow.steps`); XCom carries only the
small JSON manifests the steps print, and tasks read their fields as `step.output["key"]`.

**Trigger with config** to override a run: `force_retrain` trains even when nothing changed; `force_deploy`
releases whatever the gate says; `gate.min_improvement_threshold` sets the bar; `gate.require_approval` has a
person approve the release; `hpo.enabled` and `hpo.n_trials` steer the search; the other fields are the platform
config (`ecb config` lists all of them).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from airflow.sdk import dag, task

from ecb_airflow import assets, decisions
from ecb_airflow.approval import GateApprovalOperator
from ecb_airflow.params import dag_params
from ecb_airflow.polling import step_poll
from ecb_airflow.steps import mapped_step, step
from tasks.config import load_config

CFG = load_config()  # parsed once per DAG-file parse; pure Python, no ML imports
ASSETS = assets.platform_assets(CFG)
log = logging.getLogger("airflow.task")

default_args = {
    "owner": "ml-platform",
    "retries": CFG.pipeline.retries,
    "retry_delay": timedelta(seconds=CFG.pipeline.retry_delay_s),
    "retry_exponential_backoff": 2.0,  # doubles each retry (Airflow 3.3: a multiplier; True = 1 = constant)
    "execution_timeout": timedelta(seconds=CFG.pipeline.step_timeout_s),
}


@dag(
    dag_id="ecommerce_chatbot_training",
    schedule=assets.training_schedule(CFG, ASSETS.landing),  # nightly, or when new raw data lands
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=default_args,
    params=dag_params(),
    tags=["chatbot", "training", "ml-platform"],
    doc_md=__doc__,
)
def ecommerce_chatbot_training():
    sync = step("sync_raw_data", outlets=[ASSETS.raw], outlet_fields=assets.RAW_FIELDS)
    prep = step("prepare_chatml", inputs={"raw_manifest": sync.output["manifest_uri"]}, outlets=[ASSETS.snapshot],
                outlet_fields=assets.SNAPSHOT_FIELDS)

    @task.short_circuit
    def data_or_params_changed(prep_manifest: dict, params: dict | None = None) -> bool:
        """Stop the nightly run early when it would retrain on exactly what the released model saw."""
        go, why = decisions.keep_training(prep_manifest, force_retrain=bool((params or {}).get("force_retrain")))
        log.info("%s", why)
        return go

    @task
    def trial_inputs(plan_manifest: dict, prep_manifest: dict) -> list[dict]:
        """One input dict per Optuna trial slot (empty when HPO is off: the mapped task is then skipped)."""
        return [{**slot, "snapshot_uri": prep_manifest["snapshot_uri"]} for slot in plan_manifest["slots"]]

    # none_failed_min_one_success: record_approval is skipped when nobody was asked.
    @task.branch(trigger_rule="none_failed_min_one_success")
    def release_or_skip(decision: dict, approval: dict | None) -> str:
        """Follow the quality_gate step's decision, or the person's answer when one was asked."""
        branch, why = decisions.gate_branch(decision, approval)
        log.info("%s", why)
        return branch

    @task(trigger_rule="none_failed_min_one_success")
    def skip_release(decision: dict, approval: dict | None) -> None:
        """The gate kept the champion, or a person rejected the candidate; say so where people look first."""
        log.info("No release: %s", decisions.final_summary(decision, approval))

    changed = data_or_params_changed(prep.output)
    plan = step("plan_hpo")
    trials = mapped_step("hpo_trial", trial_inputs(plan.output, prep.output), gpu=True)
    # all_done: failed or pruned trials (or none at all, with HPO off) must not block choosing the best.
    best = step("select_best", inputs={"study": plan.output["study"]}, trigger_rule="all_done")
    snapshot = {"snapshot_uri": prep.output["snapshot_uri"]}
    tune = step("finetune", gpu=True, inputs={**snapshot, "best_params": best.output["best_params_json"]})
    tuned = {"adapter_uri": tune.output["adapter_uri"], "mlflow_run_id": tune.output["mlflow_run_id"]}
    evaluate = step("evaluate", gpu=True, inputs={**snapshot, **tuned})
    # The whole evaluate manifest goes as JSON; force_deploy renders as true / false, as the step reads it.
    gate = step("quality_gate", inputs={"evaluation": evaluate.output,
                                        "force_deploy": "{{ params.force_deploy | lower }}"})
    # Asks a person only when decisions.approval_needed says so; skipped (and record_approval with it) otherwise.
    approve = GateApprovalOperator(task_id="approve_release", decision=gate.output,
                                   timeout_s=CFG.gate.approval_timeout_s)
    record = step("record_approval", inputs={"decision_id": gate.output["decision_id"], "approval": approve.output})
    register = step("register_model", inputs={**tuned, "snapshot_id": prep.output["snapshot_id"],
                                              "decision_id": gate.output["decision_id"]},
                    outlets=[ASSETS.model], outlet_fields=assets.MODEL_FIELDS)
    version = {"registry_version": register.output["version"]}
    # Never after skip_release.
    deploy = step("deploy_chat_service", inputs={**version, "snapshot_id": prep.output["snapshot_id"]})
    # A canary (release.canary_share > 0) is judged on live chats: poll its reply count, giving the worker slot back
    # between polls, then promote or roll back. Without a canary both finish at once.
    wait = step_poll("canary_status", task_id="wait_for_canary", inputs=version,
                     poke_interval_s=CFG.release.canary_poll_s, timeout_s=CFG.release.canary_timeout_s + 3600,
                     retries=CFG.pipeline.poll_retries)
    verdict = step("canary_verdict", inputs=version)
    # Last: only a final release (served as the champion) reaches the Hub's main and its version tag; a canary the
    # verdict rolled back is skipped inside the step (it succeeds), as is a push without a token.
    push = step("push_to_hub", inputs={"adapter_uri": tune.output["adapter_uri"], **version})

    sync >> prep >> changed >> plan >> trials >> best >> tune >> evaluate >> gate
    release_or_skip(gate.output, record.output) >> [register, skip_release(gate.output, record.output)]
    register >> deploy >> wait >> verdict >> push


ecommerce_chatbot_training()
