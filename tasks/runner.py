"""Dispatch ``python -m tasks <step>`` to a step module and emit its manifest.

Each step module exposes ``run(ctx: StepContext) -> dict``. Heavy imports live inside those functions, so
``python -m tasks --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tasks.config import Config, ConfigError, load_config

# step name -> "module[:function]" implementing it (function(ctx) -> manifest dict; default function: run)
STEPS = {
    "migrate": "tasks.db",
    "sync_raw_data": "tasks.sync_raw_data",
    "prepare_chatml": "tasks.prepare_chatml",
    "generate_demo_data": "tasks.datagen",
    "build_demo_model": "tasks.demo_model",
    "plan_hpo": "tasks.hpo:plan",
    "hpo_trial": "tasks.hpo:trial",
    "select_best": "tasks.hpo:select_best",
    "finetune": "tasks.finetune",
    "evaluate": "tasks.evaluate",
    "quality_gate": "tasks.quality_gate",
    "register_model": "tasks.registry",
    "push_to_hub": "tasks.push_to_hub",
    "deploy_chat_service": "tasks.deploy_chat",
}

K8S_XCOM_PATH = Path("/airflow/xcom/return.json")
log = logging.getLogger("tasks")


class StepError(RuntimeError):
    """A step failed for a reason a person can act on; the message says what and where."""


@dataclass
class StepContext:
    step: str
    run_id: str
    config: Config
    overrides: list[str] = field(default_factory=list)
    inputs: dict[str, str] = field(default_factory=dict)
    config_path: str | None = None

    def config_with(self, extra: dict) -> Config:
        """This run's config (same file, same --set overrides) with more overrides on top, e.g. HPO's choices."""
        return load_config(self.config_path, [*self.overrides, *(f"{k}={json.dumps(v)}" for k, v in extra.items())])

    def require_input(self, key: str) -> str:
        if not self.inputs.get(key):
            raise StepError(f"step {self.step} needs --input {key}=... (got inputs: {sorted(self.inputs)})")
        return self.inputs[key]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tasks", description="Run one platform step.")
    p.add_argument("step", choices=sorted(STEPS))
    p.add_argument("--run-id", default=os.environ.get("ECB_RUN_ID", "manual"), help="Pipeline run id (DAG run id).")
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


def main(argv: list[str] | None = None) -> int:
    # Under Airflow the task log adds its own timestamps (ECB_LOG_TIMESTAMPS=0), on a terminal we add ours.
    stamp = "%(asctime)s " if os.environ.get("ECB_LOG_TIMESTAMPS", "1") == "1" else ""
    logging.basicConfig(level=os.environ.get("ECB_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format=stamp + "%(levelname)s %(name)s: %(message)s")
    logging.getLogger("botocore").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        inputs = dict(kv.split("=", 1) for kv in args.inputs)
        ctx = StepContext(args.step, args.run_id, load_config(args.config, args.overrides), args.overrides, inputs,
                          args.config)
        module_name, _, func = STEPS[args.step].partition(":")
        manifest = getattr(importlib.import_module(module_name), func or "run")(ctx)
    except (StepError, ConfigError) as exc:
        log.error("step %s failed: %s", args.step, exc)
        return 2
    emit_manifest({"step": args.step, "run_id": args.run_id, **manifest})
    return 0
