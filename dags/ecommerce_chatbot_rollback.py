"""
### E-commerce support chatbot: roll back the chat service

Manual trigger only. **Trigger with config**: `version` = the registered version to serve (empty = the registry's
`previous` alias), `reason` = why (required; stored with who triggered the run in the `releases` table).

`rollback_release` moves the registry aliases (`champion` -> the version, `previous` -> the demoted champion, a
running canary ends), records who and why, reloads the chat service and waits until it serves that version. The
service reads the aliases at every start, so a restart keeps serving it. Same as `ecb release rollback`.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Param, dag

from ecb_airflow.steps import step
from tasks.config import MODEL_NAME_PATTERN, load_config

CFG = load_config()

default_args = {
    "owner": "ml-platform",
    "retries": CFG.pipeline.retries,
    "retry_delay": timedelta(seconds=CFG.pipeline.retry_delay_s),
    "retry_exponential_backoff": 2.0,  # doubles each retry (a multiplier since Airflow 3.3)
    "execution_timeout": timedelta(seconds=CFG.pipeline.step_timeout_s),
}


@dag(
    dag_id="ecommerce_chatbot_rollback",
    schedule=None,  # a person decides
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=default_args,
    params={
        "version": Param("", type="string", title="Version",
                         description="Registered version to serve; empty = the registry's 'previous' alias."),
        "reason": Param("", type="string", minLength=1, title="Reason",
                        description="Why the rollback (stored in the releases table with who triggered it)."),
        "release.registered_model": Param(CFG.release.registered_model, type="string",
                                          title="release.registered_model", pattern=f"^{MODEL_NAME_PATTERN}$",
                                          description="MLflow registered model name."),
    },
    tags=["chatbot", "release", "ml-platform"],
    doc_md=__doc__,
)
def ecommerce_chatbot_rollback():
    step("rollback_release", inputs={"to": "{{ params.version }}", "reason": "{{ params.reason }}",
                                     "by": "{{ dag_run.triggering_user_name or 'airflow' }}"})


ecommerce_chatbot_rollback()
