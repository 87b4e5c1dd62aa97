"""Create this run's Optuna study and return one trial slot per mapped hpo_trial task.

    python -m tasks plan_hpo --run-id R
"""

from __future__ import annotations

import logging

from tasks.context import StepContext
from tasks.ml.hpo import SPACE, storage, study_name

log = logging.getLogger("tasks.steps.plan_hpo")


def run(ctx: StepContext) -> dict:
    import optuna

    hcfg = ctx.config.hpo
    name = study_name(ctx.run_id)
    if not hcfg.enabled:
        log.info("HPO is off (hpo.enabled=false): no trials; the fine-tune uses the configured parameters")
        return {"study": name, "enabled": False, "slots": []}
    optuna.create_study(study_name=name, storage=storage(), direction="maximize", load_if_exists=True)
    slots = [{"study": name, "slot": str(i)} for i in range(hcfg.n_trials)]
    log.info("study %s ready with %d trial slot(s); search space: %s", name, len(slots),
             {k: getattr(hcfg, k) for k in SPACE})
    return {"study": name, "enabled": True, "slots": slots}
