"""Optuna HPO fan-out: one study per DAG run in the Postgres optuna database; one mapped Airflow task per trial.

    python -m tasks plan_hpo    --run-id R                              # creates the study, returns trial slots
    python -m tasks hpo_trial   --run-id R --input study=S --input slot=0 --input snapshot_uri=s3://...
    python -m tasks select_best --run-id R --input study=S              # needs >= 1 complete trial

A trial trains briefly on a subset, reports (negated) validation loss to the pruner, and is scored with the same
weighted BLEU/ROUGE score as the quality gate on a validation subset. A crashed or pruned trial is told to the
study and the task still succeeds, so one bad trial never fails the DAG.
"""

from __future__ import annotations

import json
import logging
import os
import random

from tasks import s3, tracking
from tasks.runner import StepContext, StepError

log = logging.getLogger("tasks.hpo")
# search-space field in HpoConfig -> config field the value overrides
SPACE = {"lora_r": "lora.r", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
         "learning_rate": "training.learning_rate", "weight_decay": "training.weight_decay",
         "batch_size": "training.batch_size", "warmup_ratio": "training.warmup_ratio"}


def storage():
    import optuna

    url = os.environ.get("ECB_OPTUNA_DB_URL")
    if not url:
        raise StepError("ECB_OPTUNA_DB_URL is not set: HPO needs the Postgres optuna database")
    return optuna.storages.RDBStorage(url=url, engine_kwargs={"pool_pre_ping": True})


def study_name(run_id: str) -> str:
    return f"ecb-{s3.safe_key(run_id)}"


def distributions(hcfg) -> dict:
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    lo, hi = hcfg.lora_r
    ranks = [r for r in (1, 2, 4, 8, 16, 32, 64, 128, 256) if lo <= r <= hi] or [lo]
    return {
        "lora_r": CategoricalDistribution(ranks),
        "lora_alpha": CategoricalDistribution([a for a in (8, 16, 32, 64, 128) if hcfg.lora_alpha[0] <= a
                                               <= hcfg.lora_alpha[1]] or [hcfg.lora_alpha[0]]),
        "lora_dropout": FloatDistribution(*hcfg.lora_dropout),
        "learning_rate": FloatDistribution(*hcfg.learning_rate, log=True),
        "weight_decay": FloatDistribution(*hcfg.weight_decay),
        "batch_size": CategoricalDistribution(list(hcfg.batch_size)),
        "warmup_ratio": FloatDistribution(*hcfg.warmup_ratio),
    }


def pruner(hcfg):
    import optuna

    return {"median": optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
            "hyperband": optuna.pruners.HyperbandPruner(), "none": optuna.pruners.NopPruner()}[hcfg.pruner]


def load_study(name: str, hcfg):
    import optuna

    return optuna.load_study(study_name=name, storage=storage(), pruner=pruner(hcfg),
                             sampler=optuna.samplers.TPESampler(seed=hcfg.seed, n_startup_trials=2))


def plan(ctx: StepContext) -> dict:
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


# --- one trial --------------------------------------------------------------------------------------------------


def _existing_trial(study, slot: str):
    import optuna

    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("slot") == slot:
            if t.state == optuna.trial.TrialState.RUNNING:  # an attempt that died: close it, start a fresh trial
                study.tell(t.number, state=optuna.trial.TrialState.FAIL)
                log.warning("trial %d of slot %s was left RUNNING by a killed attempt; marked FAIL", t.number, slot)
                continue
            if t.state != optuna.trial.TrialState.FAIL or "error" in t.user_attrs:
                return t
    return None


def subset(records: list[dict], n: int, seed: int) -> list[dict]:
    return records if len(records) <= n else random.Random(seed).sample(records, n)


def train_and_score(ctx: StepContext, trial, overrides: dict, mlflow_run: str | None) -> float:
    """Brief training on a subset with the trial's parameters; returns the validation weighted score."""
    import optuna

    from tasks import finetune, generation, metrics
    from tasks.training import TrainState, device_and_dtype, encode_all, fit, make_optimizer, validation_loss

    cfg = ctx.config_with(overrides)
    hcfg = ctx.config.hpo
    cfg.training.max_steps = hcfg.trial_max_steps
    snapshot_uri = ctx.require_input("snapshot_uri")
    device, dtype = device_and_dtype(cfg.training)
    tokenizer, model = finetune.load_base(cfg, device, dtype)
    train = encode_all(tokenizer, subset(finetune.read_split(snapshot_uri, "train"), hcfg.trial_train_rows, 0),
                       cfg.model.max_seq_len)
    val_records = subset(finetune.read_split(snapshot_uri, "validation"), hcfg.trial_eval_rows, 1)
    val = encode_all(tokenizer, val_records, cfg.model.max_seq_len)
    model = finetune.add_lora(model, cfg, cfg.training.seed)
    opt, sched = make_optimizer(model, cfg.training, hcfg.trial_max_steps)

    def on_step(st, loss):
        if st.step % hcfg.report_every == 0 and st.step < hcfg.trial_max_steps:
            vl = validation_loss(model, val, cfg.training.batch_size, 2, tokenizer.pad_token_id, device)
            trial.report(-vl, st.step)  # the study maximizes, so report the negated loss
            log.info("trial %d step %d: validation loss %.4f", trial.number, st.step, vl)
            if trial.should_prune():
                raise optuna.TrialPruned(f"validation loss {vl:.4f} at step {st.step} is worse than the median")
        return False

    state = fit(model, train, cfg.training, hcfg.trial_max_steps, TrainState(), opt, sched,
                pad_id=tokenizer.pad_token_id, device=device, dtype=dtype, on_step=on_step)
    model = generation.merge_for_inference(model)
    prompts = generation.render_prompts(tokenizer, [r["messages"] for r in val_records])
    hyps = generation.generate_batched(model, tokenizer, prompts, cfg.eval.max_new_tokens, cfg.eval.batch_size)
    refs = [r["messages"][-1]["content"] for r in val_records]
    scores = metrics.corpus_scores(hyps, refs)
    value = metrics.weighted_score(scores, cfg.eval.weights)
    tracking.log_metrics(mlflow_run,
                         [(k, v, state.step) for k, v in scores.items() if k != "n"]
                         + [("weighted_score", value, state.step), ("train_loss_last", state.losses[-1][1],
                                                                    state.step)])
    return value


def trial(ctx: StepContext) -> dict:
    import optuna

    hcfg = ctx.config.hpo
    name, slot = ctx.require_input("study"), ctx.require_input("slot")
    study = load_study(name, hcfg)
    if done := _existing_trial(study, slot):
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


def record_trial(ctx: StepContext, name: str, frozen) -> dict:
    from tasks import db, schema

    row = {"run_id": ctx.run_id, "study_name": name, "trial_number": frozen.number, "state": frozen.state.name,
           "params": {SPACE.get(k, k): v for k, v in frozen.params.items()}, "value": frozen.value,
           "error": frozen.user_attrs.get("error"), "mlflow_run_id": frozen.user_attrs.get("mlflow_run_id")}
    with db.engine().begin() as conn:
        db.upsert(conn, schema.hpo_trials, row, keys=("study_name", "trial_number"))
    return {"study": name, "trial": frozen.number, "state": frozen.state.name, "value": frozen.value,
            "params": row["params"], "error": row["error"]}


# --- choose -----------------------------------------------------------------------------------------------------


def select_best(ctx: StepContext) -> dict:
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


def record_study(ctx: StepContext, name: str, counts: dict, best, params: dict) -> None:
    from sqlalchemy import update

    from tasks import db, schema

    summary = {"study": name, "best_trial": best.number, "best_value": best.value, "best_params": params,
               "trial_counts": counts}
    with db.engine().begin() as conn:
        conn.execute(update(schema.pipeline_runs).where(schema.pipeline_runs.c.run_id == ctx.run_id)
                     .values(hpo=summary))


def log_study(ctx: StepContext, study, params: dict, best) -> None:
    parent = tracking.find_or_create_run(f"hpo-{ctx.run_id}", {"ecb.run_id": ctx.run_id, "ecb.kind": "hpo"})
    if parent is None:
        return
    tracking.log_params(parent, {f"best.{k}": str(v) for k, v in params.items()})
    tracking.log_metrics(parent, [("best_value", best.value, best.number)])
    import tempfile
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    from mlflow.tracking import MlflowClient
    from optuna.visualization import matplotlib as ov

    plots = {"optimization_history": ov.plot_optimization_history, "param_importances": ov.plot_param_importances,
             "parallel_coordinate": ov.plot_parallel_coordinate}
    with tempfile.TemporaryDirectory() as tmp:
        for plot_name, fn in plots.items():
            try:
                fn(study).figure.savefig(Path(tmp) / f"{plot_name}.png", dpi=90, bbox_inches="tight")
            except Exception as exc:  # noqa: BLE001 - e.g. importances need >= 2 complete trials
                log.info("optuna plot %s skipped: %s", plot_name, exc)
        MlflowClient().log_artifacts(parent, tmp, artifact_path="optuna")
