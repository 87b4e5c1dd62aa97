"""Run one HPO trial of this run's study: brief training on a subset, pruned on validation loss, scored on the
validation weighted score. A crashed or pruned trial is told to the study and the task still succeeds.

    python -m tasks hpo_trial --run-id R --input study=S --input slot=0 --input snapshot_uri=s3://...
"""

from __future__ import annotations

import logging

from tasks.context import StepContext
from tasks.io import tracking
from tasks.ml.hpo import SPACE, distributions, existing_trial, load_study, record_trial, train_and_score

log = logging.getLogger("tasks.steps.hpo_trial")


def run(ctx: StepContext) -> dict:
    import optuna

    hcfg = ctx.config.hpo
    name, slot = ctx.require_input("study"), ctx.require_input("slot")
    study = load_study(name, hcfg)
    if done := existing_trial(study, slot):
        log.info("slot %s already has trial %d (%s); not running it again", slot, done.number, done.state.name)
        return record_trial(ctx, name, done)
    t = study.ask(distributions(hcfg))
    t.set_user_attr("slot", slot)
    overrides = {SPACE[k]: v for k, v in t.params.items()}
    parent = tracking.find_or_create_run(f"hpo-{ctx.run_id}", {"ecb.run_id": ctx.run_id, "ecb.kind": "hpo"})
    child = tracking.find_or_create_run(f"trial-{t.number}", {"ecb.run_id": ctx.run_id, "ecb.kind": "hpo-trial",
                                                              "ecb.trial": str(t.number)}, parent_run_id=parent)
    t.set_user_attr("mlflow_run_id", child)
    tracking.log_params(child, {k: str(v) for k, v in overrides.items()})
    log.info("trial %d (slot %s) parameters: %s", t.number, slot, overrides)
    try:
        value = train_and_score(ctx, t, overrides, child)
        study.tell(t, value)
        log.info("trial %d COMPLETE: validation weighted score %.4f", t.number, value)
    except optuna.TrialPruned as exc:
        study.tell(t, state=optuna.trial.TrialState.PRUNED)
        log.info("trial %d PRUNED: %s", t.number, exc)
    except Exception as exc:  # noqa: BLE001 - a crashed trial is recorded as FAIL, the DAG goes on
        t.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:2000])
        study.tell(t, state=optuna.trial.TrialState.FAIL)
        log.exception("trial %d FAILED", t.number)
    return record_trial(ctx, name, study.trials[t.number])
