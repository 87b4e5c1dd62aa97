"""Score the candidate and the current champion on the same test split, with batched greedy generation.

    python -m tasks evaluate --run-id R --input snapshot_uri=s3://.../snapshots/<id> --input adapter_uri=s3://...

The prompt is built by the tokenizer's chat template; decoding is greedy, so the same model and split always give
the same outputs and scores. The adapter is merged into the base weights before generation (faster, identical).
With no champion and gate.first_release_vs_base, the untuned base model is scored too (model ref
``base:<model.base_model>``): the first release must beat it. An evaluation is stored per (model, snapshot,
split): the champion's stored evaluation is reused when it was made on this snapshot with the same evaluation
settings (example cap, max_new_tokens, ...; see tasks/ml/evaluation.py), otherwise the champion is evaluated now and
its row replaced. A snapshot made with data.include_feedback also has a live set (prompts whose chat reply got a
thumbs-down): both models answer it again and the gate reports how close they stay to the rejected replies. Rows go
to Postgres `evaluations`, outputs to S3, metrics and a sample table to
MLflow.
"""

from __future__ import annotations

import logging

from tasks.context import StepContext
from tasks.ml.evaluation import evaluate_model, live_summary, summary
from tasks.release import registry

log = logging.getLogger("tasks.steps.evaluate")


def run(ctx: StepContext) -> dict:
    cfg = ctx.config
    snapshot_uri, adapter_uri = ctx.require_input("snapshot_uri"), ctx.require_input("adapter_uri")
    candidate = evaluate_model(ctx, f"run:{ctx.run_id}", snapshot_uri, adapter_uri, cfg.model.base_model,
                               ctx.inputs.get("mlflow_run_id"))
    champ, registry_error = {"test": None, "live": None}, None
    try:
        info = registry.champion(cfg.release.registered_model)
    except registry.RegistryUnavailable as exc:
        info, registry_error = None, str(exc)
        log.error("model registry unreachable (%s): the gate will not release", exc)
    if info:
        log.info("champion: %s version %s (run %s, snapshot %s)", cfg.release.registered_model, info["version"],
                 info["run_id"], info["snapshot_id"])
        champ = evaluate_model(ctx, f"registry:{cfg.release.registered_model}/{info['version']}", snapshot_uri,
                               info["adapter_uri"], info["base_model"] or cfg.model.base_model,
                               aliases=(f"run:{info['run_id']}",))
    elif not registry_error:
        log.info("no champion in the registry yet: this candidate would be the first release")
    base = None
    if info is None and not registry_error and cfg.gate.first_release_vs_base:
        log.info("gate.first_release_vs_base: the first release must beat the untuned base model %s; evaluating it "
                 "on the same test split", cfg.model.base_model)
        base = evaluate_model(ctx, f"base:{cfg.model.base_model}", snapshot_uri, None, cfg.model.base_model,
                              with_live=False)["test"]
    return {"candidate": summary(candidate["test"]), "champion": summary(champ["test"]), "base": summary(base),
            "registry_error": registry_error, "champion_version": info and info["version"],
            "candidate_live": live_summary(candidate["live"]), "champion_live": live_summary(champ["live"])}
