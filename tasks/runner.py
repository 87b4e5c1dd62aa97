"""Dispatch ``python -m tasks <step>`` to its module in tasks/steps/ and emit the manifest.

Each step module exposes ``run(ctx: StepContext) -> dict``. Heavy imports live inside those functions, so
``python -m tasks --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

from tasks.config import Config, PipelineConfig, load_config
from tasks.context import StepContext
from tasks.errors import ConfigError, StepError

# Every step name is one module in tasks/steps/ with a run(ctx) -> manifest function.
STEPS = ("migrate", "sync_raw_data", "prepare_chatml", "generate_demo_data", "build_demo_model", "import_base_model",
         "plan_hpo", "hpo_trial", "select_best", "finetune", "evaluate", "quality_gate", "register_model",
         "push_to_hub", "deploy_chat_service", "list_landing", "record_approval",
         "canary_status", "canary_verdict", "rollback_release")

K8S_XCOM_PATH = Path("/airflow/xcom/return.json")
log = logging.getLogger("tasks")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tasks", description="Run one platform step.")
    p.add_argument("step", choices=sorted(STEPS))
    p.add_argument("--run-id", default="manual", help="Pipeline run id (DAG run id).")
    p.add_argument("--config", default=None, help="YAML config file (default: $ECB_CONFIG or include/config).")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p.add_argument("--input", dest="inputs", action="append", default=[], metavar="KEY=VALUE",
                   help="Step input, usually a URI or id from an upstream manifest.")
    return p


def emit_manifest(manifest: dict) -> None:
    """Last stdout line carries the manifest; Kubernetes pods also get it in the xcom sidecar file."""
    line = json.dumps(manifest, sort_keys=True, default=str)
    if K8S_XCOM_PATH.parent.is_dir():
        K8S_XCOM_PATH.write_text(line)
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def setup_logging(pipeline: PipelineConfig) -> None:
    # Under Airflow the task log adds its own timestamps (--set pipeline.log_timestamps=false), on a terminal we
    # add ours. force: main() may run more than once in a process (tests), each time with its own settings.
    stamp = "%(asctime)s " if pipeline.log_timestamps else ""
    logging.basicConfig(level=pipeline.log_level, stream=sys.stderr, force=True,
                        format=stamp + "%(levelname)s %(name)s: %(message)s")
    logging.getLogger("botocore").setLevel(logging.WARNING)


def configure_io(cfg: Config) -> None:
    """The S3, database and MLflow helpers are called without a config: give them this run's settings once."""
    from tasks.io import db, s3, tracking

    s3.configure(cfg.storage)
    db.configure(pool_size=cfg.storage.db_pool_size, retry_s=cfg.storage.db_retry_s)
    tracking.configure(cfg.pipeline.mlflow_experiment)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        setup_logging(PipelineConfig())  # the config could not say how to log
        log.error("step %s failed: %s", args.step, exc)
        return 2
    setup_logging(cfg.pipeline)
    configure_io(cfg)
    try:
        inputs = dict(kv.split("=", 1) for kv in args.inputs)
        ctx = StepContext(args.step, args.run_id, cfg, args.overrides, inputs, args.config)
        manifest = importlib.import_module(f"tasks.steps.{args.step}").run(ctx)
    except (StepError, ConfigError) as exc:
        log.error("step %s failed: %s", args.step, exc)
        return 2
    emit_manifest({"step": args.step, "run_id": args.run_id, **manifest})
    return 0
