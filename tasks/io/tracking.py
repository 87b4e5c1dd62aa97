"""MLflow helpers: one MLflow run per (pipeline run, step kind), found again on retry instead of duplicated.

The tracking server comes from MLFLOW_TRACKING_URI. Without it, tracking is skipped with one log line, so a step
can still be run by hand; in the pipeline the connection `mlflow_default` always sets it. The experiment is the config
field pipeline.mlflow_experiment, set once per process by ``configure`` (the step runner calls it).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

from tasks import env
from tasks.config import PipelineConfig
from tasks.config import flatten as flatten_tree

log = logging.getLogger("tasks.io.tracking")
_settings = {"experiment": PipelineConfig().mlflow_experiment}


def configure(experiment: str) -> None:
    """Log this process's MLflow runs to ``experiment`` (pipeline.mlflow_experiment)."""
    _settings["experiment"] = experiment


def enabled() -> bool:
    return bool(env.get("MLFLOW_TRACKING_URI"))


def flatten(cfg_dict: dict) -> dict[str, str]:
    """A config dict as MLflow params: section.field -> value as text (MLflow caps a param at 500 characters)."""
    return {name: str(value)[:500] for name, value in flatten_tree(cfg_dict, depth=1).items()}


def filter_literal(value: str, what: str = "value") -> str:
    """``value`` quoted for an MLflow search filter. MLflow's filter strings have no escape for quotes, so a value
    with a quote or backslash (a run id or model name typed into a trigger form) is refused instead of changing the
    search."""
    text = str(value)
    if any(c in text for c in "'\"\\`") or not text.isprintable():
        raise ValueError(f"{what} {text!r} cannot be used in an MLflow search: quotes, backslashes, backticks and "
                         "control characters are not allowed")
    return f"'{text}'"


def _experiment_id(client) -> str:
    name = _settings["experiment"]
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp else client.create_experiment(name)


def find_or_create_run(run_name: str, tags: dict[str, str], parent_run_id: str | None = None) -> str | None:
    """The MLflow run carrying these ecb.* tags (created once, reused by retries); None when tracking is off."""
    if not enabled():
        log.info("MLFLOW_TRACKING_URI is not set: not logging %s to MLflow", run_name)
        return None
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp_id = _experiment_id(client)
    query = " and ".join(f"tags.`{k}` = {filter_literal(v, k)}" for k, v in tags.items())
    found = client.search_runs([exp_id], filter_string=query, max_results=1)
    if found:
        return found[0].info.run_id
    extra = {"mlflow.parentRunId": parent_run_id} if parent_run_id else {}
    return client.create_run(exp_id, run_name=run_name, tags={**tags, **extra}).info.run_id


@contextmanager
def active(run_id: str | None):
    """Make run_id the active MLflow run (no-op when tracking is off); ends it FINISHED or FAILED."""
    if run_id is None:
        yield None
        return
    import mlflow

    with mlflow.start_run(run_id=run_id) as run:
        yield run


def log_params(run_id: str | None, params: dict) -> None:
    if run_id is None:
        return
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    existing = client.get_run(run_id).data.params
    new = [Param(k, v) for k, v in params.items() if k not in existing]  # params are immutable: log once
    for i in range(0, len(new), 100):
        client.log_batch(run_id, params=new[i:i + 100])


def log_metrics(run_id: str | None, rows: list[tuple[str, float, int]]) -> None:
    """rows: (key, value, step). Batched, so a progress tick costs one HTTP call."""
    if run_id is None or not rows:
        return
    import time

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, int(s)) for k, v, s in rows]
    client = MlflowClient()
    for i in range(0, len(metrics), 500):
        client.log_batch(run_id, metrics=metrics[i:i + 500])
