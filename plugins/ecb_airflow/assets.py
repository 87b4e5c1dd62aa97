"""The platform's data as Airflow Assets, and the schedules built on them.

    landing  (data.source, where new conversations are uploaded)  --landing watcher-->  asset event
      -> training DAG (nightly, or when the landing asset gets an event)
           sync_raw_data  -> raw      (the platform's mirror, storage.raw_prefix; extra: digest, counts)
           prepare_chatml -> snapshot (storage.snapshot_prefix; extra: snapshot id and uri, split sizes)
           register_model -> model    (models:/<release.registered_model>; extra: the registered version)

The landing asset is separate from the raw mirror on purpose: the training DAG is scheduled on the landing asset, so
an event it emitted itself there would start it again. Events on the landing asset come from the landing watcher
DAG (it lists the prefix every ``pipeline.landing_check_s`` seconds and emits when the listing changed) or, with
``pipeline.landing_queue_url``, from an AssetWatcher reading the S3 event notifications of the prefix from SQS.
Built from the typed config when a DAG file is parsed; no ML imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from airflow.sdk import Asset, AssetOrTimeSchedule, AssetWatcher, CronTriggerTimetable

from tasks.config import Config

LANDING, RAW, SNAPSHOT, MODEL = ("support_conversations_landing", "support_conversations_raw", "chatml_snapshot",
                                 "chatbot_model")
# Manifest fields each step attaches to the asset event it emits (ecb_airflow.step_operator.outlet_fields).
LANDING_FIELDS = ("source", "digest", "n_objects", "n_bytes")
RAW_FIELDS = ("digest", "n_objects", "n_bytes", "n_copied", "manifest_uri")
SNAPSHOT_FIELDS = ("snapshot_id", "snapshot_uri", "reused", "rows_kept", "n_train", "n_validation", "n_test")
MODEL_FIELDS = ("registered_model", "version", "previous_version")
SQS_WATCHER = "landing_s3_notifications"


@dataclass(frozen=True)
class PlatformAssets:
    landing: Asset
    raw: Asset
    snapshot: Asset
    model: Asset


def location_uri(source: str) -> str:
    """An asset URI for data.source: s3:// stays, a local folder becomes file:// (absolute)."""
    if "://" in source:
        return source
    return Path(source).expanduser().resolve().as_uri()


def landing_watchers(cfg: Config) -> list[AssetWatcher]:
    """An SQS AssetWatcher when the landing prefix's S3 event notifications go to a queue (the triggerer polls it
    and turns each message into an asset event); none otherwise."""
    if not cfg.pipeline.landing_queue_url:
        return []
    from airflow.providers.amazon.aws.triggers.sqs import SqsSensorTrigger

    # Long polls (20 s, SQS's longest) with a short pause between them: an upload starts a run within about 30 s.
    trigger = SqsSensorTrigger(sqs_queue=cfg.pipeline.landing_queue_url, aws_conn_id="aws_default",
                               wait_time_seconds=20, waiter_delay=10, max_messages=10)
    return [AssetWatcher(name=SQS_WATCHER, trigger=trigger)]


def platform_assets(cfg: Config) -> PlatformAssets:
    bucket = f"s3://{cfg.storage.bucket}"
    return PlatformAssets(
        landing=Asset(name=LANDING, uri=location_uri(cfg.data.source), group="raw_data",
                      watchers=landing_watchers(cfg)),
        raw=Asset(name=RAW, uri=f"{bucket}/{cfg.storage.raw_prefix}", group="raw_data"),
        snapshot=Asset(name=SNAPSHOT, uri=f"{bucket}/{cfg.storage.snapshot_prefix}", group="training_data"),
        model=Asset(name=MODEL, uri=f"models:/{cfg.release.registered_model}", group="model"),
    )


def training_schedule(cfg: Config, landing: Asset):
    """Nightly (pipeline.schedule, a cron or preset) or when new raw data lands; '' = only when new data lands."""
    if not cfg.pipeline.schedule:
        return [landing]
    return AssetOrTimeSchedule(timetable=CronTriggerTimetable(cfg.pipeline.schedule, timezone="UTC"),
                               assets=[landing])


def watcher_schedule(cfg: Config) -> timedelta | None:
    """How often the landing watcher lists the prefix: off (manual runs only) with an SQS watcher or
    landing_check_s = 0."""
    if cfg.pipeline.landing_queue_url or not cfg.pipeline.landing_check_s:
        return None
    return timedelta(seconds=cfg.pipeline.landing_check_s)
