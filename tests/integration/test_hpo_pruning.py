"""HPO pruning through the real steps (plan_hpo, hpo_trial, select_best) and the real Postgres optuna storage: a trial
whose validation loss is worse than the median of the complete trials at a report step is stopped there. (That every
trial measures the same validation conversations, whatever its batch size: tests/unit/test_hpo.py.)"""

import json

import pytest
from sqlalchemy import select

from tasks.io import db, schema
from tests.conftest import prepared_snapshot, run_step, step_manifest

pytestmark = pytest.mark.integration

# Trials of 4 steps report the validation loss at step 2 (not at the last step: a trial that gets there is scored
# instead). The learning-rate range is widened both ways: a rate of 1e-7 leaves an adapter where it started (its
# loss stays the base model's), 0.5 makes it diverge. (A near-zero rate is no bad trial in 2 steps: a good rate has
# barely moved the loss by then -- 0.02 had even raised it.)
HPO = ["--set", "hpo.trial_max_steps=4", "--set", "hpo.report_every=2", "--set", "hpo.learning_rate=[1.0e-7, 1.0]"]
STILL = {"lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "learning_rate": 1e-7, "weight_decay": 0.0,
         "batch_size": 8, "warmup_ratio": 0.0}
BAD_LR = 0.5


@pytest.fixture(scope="module")
def snapshot(services):
    return prepared_snapshot("hpo-pruning-tests", 240, seed=23)


def test_a_diverging_trial_is_pruned_at_its_first_report_by_the_median_pruner(mlflow_server, snapshot,
                                                                             tiny_base_model, uid):
    import optuna

    from tasks.ml import hpo

    run_id = f"prune-{uid}"
    args = ["--set", f"model.base_model={tiny_base_model}", *HPO]
    plan = step_manifest("plan_hpo", run_id, *args)
    study = optuna.load_study(study_name=plan["study"], storage=hpo.storage())
    # study.ask() hands out enqueued parameters in order: two still adapters (batch 8 and 16), then a diverging one
    for params in ({**STILL, "batch_size": 8}, {**STILL, "batch_size": 16}, {**STILL, "learning_rate": BAD_LR}):
        study.enqueue_trial(params)
    runs = [run_step("hpo_trial", run_id, *args, "--input", f"study={plan['study']}", "--input", f"slot={slot}",
                     "--input", f"snapshot_uri={snapshot}") for slot in range(3)]
    outs = [json.loads(r.stdout.strip().splitlines()[-1]) for r in runs]

    assert [o["state"] for o in outs] == ["COMPLETE", "COMPLETE", "PRUNED"], [o["error"] for o in outs]
    assert outs[2]["params"]["training.learning_rate"] == BAD_LR
    trials = optuna.load_study(study_name=plan["study"], storage=hpo.storage()).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "PRUNED"]
    # both still adapters report the base model's loss, at batch 8 as at batch 16
    assert trials[0].intermediate_values[2] == pytest.approx(trials[1].intermediate_values[2], abs=1e-4)
    pruned = trials[2]
    assert all(sorted(t.intermediate_values) == [2] for t in trials)
    assert pruned.user_attrs["steps"] == 2 and outs[2]["steps"] == 2  # stopped at its report, after 2 of 4 steps
    assert [t.user_attrs["steps"] for t in trials[:2]] == [4, 4] and [o["steps"] for o in outs[:2]] == [4, 4]
    # the reported value is the negated validation loss
    bad_loss, good_losses = -pruned.intermediate_values[2], [-t.intermediate_values[2] for t in trials[:2]]
    assert bad_loss > max(good_losses) + 0.1

    log = runs[2].stderr
    median = sum(good_losses) / 2  # the median of two values
    assert (f"trial {pruned.number} PRUNED: after 2 of 4 steps: validation loss {bad_loss:.4f} at step 2 is worse "
            f"than the median {median:.4f} of 2 complete trial(s) at that step") in log
    assert "step 3/4" not in log and "COMPLETE" not in log

    with db.engine().connect() as conn:
        rows = conn.execute(select(schema.hpo_trials).where(schema.hpo_trials.c.study_name == plan["study"])
                            .order_by(schema.hpo_trials.c.trial_number)).all()
    assert [r.state for r in rows] == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert rows[2].value == pytest.approx(pruned.intermediate_values[2]) and rows[2].error is None

    best = step_manifest("select_best", run_id, *args, "--input", f"study={plan['study']}")
    assert best["best_trial"] in (0, 1) and best["trial_counts"]["PRUNED"] == 1  # a pruned trial is never chosen
