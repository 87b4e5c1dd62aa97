"""
### E-commerce support chatbot: landing watcher

Turns an upload to the landing prefix (`data.source`) into an event of the landing asset, which starts the training
DAG (`ecommerce_chatbot_training` is scheduled on it, besides nightly) without a manual trigger.

Every `pipeline.landing_check_s` seconds `list_landing` lists the prefix (names, checksums and sizes of the files
matching `data.file_patterns`, nothing copied) and `announce_new_data` compares its digest with the one the last
landing asset event carries: a change emits a new event (extra: source, digest, file count, bytes); no change, or an
empty prefix, skips the task and emits nothing. Several uploads between two listings make one event.

On AWS, set `pipeline.landing_queue_url` to an SQS queue that receives the prefix's S3 event notifications: the
landing asset then has an AssetWatcher on the triggerer and this DAG stops polling (it can still be run by hand).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from airflow.sdk import dag, task
from airflow.sdk.exceptions import AirflowSkipException

from ecb_airflow import assets, decisions
from ecb_airflow.steps import step
from tasks.config import load_config

CFG = load_config()
LANDING = assets.platform_assets(CFG).landing
log = logging.getLogger("airflow.task")


@dag(
    dag_id="ecommerce_chatbot_landing_watcher",
    schedule=assets.watcher_schedule(CFG),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"owner": "ml-platform", "retries": CFG.pipeline.retries,
                  "retry_delay": timedelta(seconds=CFG.pipeline.retry_delay_s),
                  "execution_timeout": timedelta(seconds=CFG.pipeline.step_timeout_s)},
    tags=["chatbot", "data", "ml-platform"],
    doc_md=__doc__,
)
def ecommerce_chatbot_landing_watcher():
    listing = step("list_landing")

    @task(inlets=[LANDING], outlets=[LANDING])
    def announce_new_data(listing: dict, inlet_events=None, outlet_events=None) -> dict:
        """Emit a landing asset event when the listing differs from the last one announced."""
        last = inlet_events[LANDING].ascending(False).limit(1)
        changed, why = decisions.landing_changed(listing, last[0].extra if len(last) else None)
        log.info("%s", why)
        if not changed:
            raise AirflowSkipException(why)  # a skipped task emits no asset event
        extra = {k: listing[k] for k in assets.LANDING_FIELDS}
        outlet_events[LANDING].extra.update(extra)
        return extra

    announce_new_data(listing.output)


ecommerce_chatbot_landing_watcher()
