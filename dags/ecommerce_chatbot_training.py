"""
### E-commerce support chatbot: nightly training pipeline

Syncs raw support conversations from `data.source` into the platform's S3 raw area, prepares a ChatML snapshot
(train / validation / test, stratified by intent, bad rows quarantined with a reason) and decides whether anything
changed since the released model. Every step is `python -m tasks <step>` run by one step mechanism
(`ecb_airflow.steps`); XCom carries only the small JSON manifests the steps print.

**Trigger with config** to override a run: `force_retrain` trains even when nothing changed; the other fields are
the platform config (see `include/config/default.yaml` and `tasks/config.py` for every field's help).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import dag, task

from ecb_airflow.params import dag_params
from ecb_airflow.steps import from_step, step
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
    step_timeout = timedelta(seconds=CFG.pipeline.step_timeout_s)
    sync = step("sync_raw_data", timeout=step_timeout)
    prep = step("prepare_chatml", inputs={"raw_manifest": from_step("sync_raw_data", "manifest_uri")},
                timeout=step_timeout)

    @task.short_circuit(ignore_downstream_trigger_rules=False)
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

    sync >> prep >> data_or_params_changed(prep.output)


ecommerce_chatbot_training()
