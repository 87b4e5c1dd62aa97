"""What an HPO trial reports to the pruner and when it stops (tasks.ml.hpo), on an in-memory optuna study; the
trial itself on the tiny model on CPU. The same path through the real steps and Postgres storage:
tests/integration/test_hpo_pruning.py."""

from types import SimpleNamespace

import pytest

from tasks.demo import datagen
from tests.conftest import save_tiny_model

optuna = pytest.importorskip("optuna")


def _study(pruner):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(direction="maximize", pruner=pruner)


def _complete(study, losses_at_2: list[float]) -> None:
    for loss in losses_at_2:
        t = study.ask()
        t.report(-loss, 2)
        study.tell(t, 0.5)


HCFG = SimpleNamespace(report_every=2, trial_max_steps=6, pruner="median")


def test_the_median_pruner_stops_a_trial_worse_than_the_median_at_a_report_step_and_says_why():
    from tasks.ml import hpo

    study = _study(hpo.pruner(SimpleNamespace(pruner="median")))
    _complete(study, [2.0, 2.2])
    calls = []
    good = hpo.pruning_callback(study.ask(), HCFG, lambda: calls.append("good") or 2.05)
    assert good(SimpleNamespace(step=1), 9.9) is False and not calls  # no report between report steps
    assert good(SimpleNamespace(step=2), 9.9) is False and calls == ["good"]  # better than the median 2.1: goes on
    assert good(SimpleNamespace(step=6), 9.9) is False and calls == ["good"]  # nor at the last step (scored instead)

    bad_trial = study.ask()
    bad = hpo.pruning_callback(bad_trial, HCFG, lambda: 3.5)
    with pytest.raises(optuna.TrialPruned) as stop:
        bad(SimpleNamespace(step=2), 9.9)
    assert str(stop.value) == ("after 2 of 6 steps: validation loss 3.5000 at step 2 is worse than the median "
                               "2.1000 of 2 complete trial(s) at that step")
    assert bad_trial.user_attrs["steps"] == 2
    assert study.trials[bad_trial.number].intermediate_values == {2: -3.5}  # the study maximizes: negated loss


def test_no_pruning_before_two_trials_are_complete():
    from tasks.ml import hpo

    study = _study(hpo.pruner(SimpleNamespace(pruner="median")))
    _complete(study, [2.0])
    assert hpo.pruning_callback(study.ask(), HCFG, lambda: 50.0)(SimpleNamespace(step=2), 0.0) is False


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("hpo-base"), 200, seed=4)


def _records(n: int, seed: int) -> list[dict]:
    return [{"messages": [{"role": "system", "content": "You are helpful."},
                          {"role": "user", "content": r["instruction"]},
                          {"role": "assistant", "content": r["response"]}]}
            for r in datagen.generate_rows(n, seed=seed)]


def test_every_trial_reports_its_loss_on_every_validation_conversation_whatever_its_batch_size(base_model, monkeypatch):
    """The pruner compares trials at the same step, so each must be measured on the same conversations: once, a
    trial measured the first two batches of its own sampled batch size (16 of 20 conversations at batch 8, all 20 at
    batch 16)."""
    from tasks.config import load_config
    from tasks.context import StepContext
    from tasks.ml import hpo, training

    val, train = _records(20, 1), _records(48, 0)
    monkeypatch.setattr(hpo, "read_split", lambda uri, split: {"train": train, "validation": val}[split])
    measured, real = [], training.validation_loss

    def spy(model, examples, batch_size, max_batches, pad_id, device):
        measured.append(min(len(examples), batch_size * max_batches))
        return real(model, examples, batch_size, max_batches, pad_id, device)

    monkeypatch.setattr(training, "validation_loss", spy)
    overrides = [f"model.base_model={base_model}", "hpo.trial_max_steps=3", "hpo.report_every=2",
                 "hpo.trial_eval_rows=20", "eval.max_new_tokens=4", "hpo.pruner=none"]
    ctx = StepContext("hpo_trial", "r", load_config(None, overrides), overrides=overrides,
                      inputs={"snapshot_uri": "s3://unused"})
    study = _study(hpo.pruner(SimpleNamespace(pruner="none")))
    for batch_size in (8, 16):
        measured.clear()
        trial = study.ask()
        # a learning rate that leaves the adapter where it started: both trials measure the same model
        hpo.train_and_score(ctx, trial, {"training.batch_size": batch_size, "training.learning_rate": 1e-7}, None)
        assert measured == [20], f"batch {batch_size}: measured {measured} of 20 validation conversations"
        assert trial.user_attrs["steps"] == 3
    first, second = (t.intermediate_values[2] for t in study.trials)
    assert first == pytest.approx(second, abs=1e-5)
