"""Pick the best complete trial of this run's study; its parameters become the fine-tune's overrides.

    python -m tasks select_best --run-id R --input study=S              # needs >= 1 complete trial
"""

from __future__ import annotations

import json
import logging

from tasks.context import StepContext
from tasks.errors import StepError
from tasks.ml.hpo import SPACE, load_study, log_study, record_study, record_trial, study_name

log = logging.getLogger("tasks.steps.select_best")


def run(ctx: StepContext) -> dict:
    import optuna

    hcfg = ctx.config.hpo
    name = ctx.inputs.get("study") or study_name(ctx.run_id)
    if not hcfg.enabled:
        log.info("HPO is off: fine-tune uses the configured parameters")
        return {"study": name, "best_params": {}, "best_params_json": "{}", "best_value": None}
    study = load_study(name, hcfg)
    trials = study.get_trials(deepcopy=False)
    for t in trials:
        record_trial(ctx, name, t)
    counts = {s.name: sum(t.state == s for t in trials) for s in optuna.trial.TrialState}
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        errors = "; ".join(f"trial {t.number}: {t.user_attrs['error']}" for t in trials if "error" in t.user_attrs)
        raise StepError(f"study {name} has no complete trial ({counts}); {errors or 'see the hpo_trial logs'}")
    best = study.best_trial
    params = {SPACE[k]: v for k, v in best.params.items()}
    ranking = sorted(complete, key=lambda t: t.value, reverse=True)
    log.info("trials: %s", ", ".join(f"{k}={v}" for k, v in counts.items() if v))
    for t in ranking:
        log.info("  trial %d  score %.4f  %s", t.number, t.value, {SPACE[k]: v for k, v in t.params.items()})
    log.info("best: trial %d with validation weighted score %.4f -> %s", best.number, best.value, params)
    record_study(ctx, name, counts, best, params)
    log_study(ctx, study, params, best)
    return {"study": name, "best_trial": best.number, "best_value": best.value, "best_params": params,
            "best_params_json": json.dumps(params, sort_keys=True), "trial_counts": counts}
