"""Optuna HPO: one study per DAG run in the Postgres optuna database; the steps plan_hpo, hpo_trial (one mapped
Airflow task per trial) and select_best use the pieces here.

A trial trains briefly on a subset, reports (negated) validation loss on the same validation conversations for every
trial to the pruner every hpo.report_every steps (``pruning_callback``; a pruned trial stops there), and is scored
with the same weighted BLEU/ROUGE score as the quality gate on a validation subset. A crashed or pruned trial is told
to the study and the task still succeeds, so one bad trial never fails the DAG.
"""

from __future__ import annotations

import logging
import math
import random
import statistics

from tasks import env
from tasks.context import StepContext
from tasks.data.snapshots import read_split
from tasks.io import s3, tracking

log = logging.getLogger("tasks.ml.hpo")
# Batch of the validation loss a trial reports to the pruner. Fixed, and every trial_eval_rows conversation is used:
# the pruner compares trials at the same step, so they must be measured on the same conversations (the trial's own
# sampled batch size once chose how many of them the first two batches held).
REPORT_BATCH = 8
# search-space field in HpoConfig -> config field the value overrides
SPACE = {"lora_r": "lora.r", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
         "learning_rate": "training.learning_rate", "weight_decay": "training.weight_decay",
         "batch_size": "training.batch_size", "warmup_ratio": "training.warmup_ratio"}


def storage():
    import optuna

    url = env.require("ECB_OPTUNA_DB_URL", "HPO needs the Postgres optuna database")
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


def existing_trial(study, slot: str):
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
    from tasks.ml import generation, metrics
    from tasks.ml.models import add_lora, load_base
    from tasks.ml.training import TrainState, device_and_dtype, encode_all, fit, make_optimizer

    cfg = ctx.config_with(overrides)
    hcfg = ctx.config.hpo
    cfg.training.max_steps = hcfg.trial_max_steps
    snapshot_uri = ctx.require_input("snapshot_uri")
    device, dtype = device_and_dtype(cfg.training)
    tokenizer, model = load_base(cfg, device, dtype)
    train = encode_all(tokenizer, subset(read_split(snapshot_uri, "train"), hcfg.trial_train_rows, 0),
                       cfg.model.max_seq_len)
    val_records = subset(read_split(snapshot_uri, "validation"), hcfg.trial_eval_rows, 1)
    val = encode_all(tokenizer, val_records, cfg.model.max_seq_len)
    model = add_lora(model, cfg, cfg.training.seed)
    opt, sched = make_optimizer(model, cfg.training, hcfg.trial_max_steps)

    on_step = pruning_callback(trial, hcfg, lambda: report_loss(model, val, tokenizer.pad_token_id, device))
    state = fit(model, train, cfg.training, hcfg.trial_max_steps, TrainState(), opt, sched,
                pad_id=tokenizer.pad_token_id, device=device, dtype=dtype, on_step=on_step)
    trial.set_user_attr("steps", state.step)
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


def report_loss(model, val: list, pad_id: int, device) -> float:
    """The validation loss a trial reports: every one of ``val`` in batches of REPORT_BATCH, whatever the trial's
    batch size."""
    from tasks.ml.training import validation_loss

    return validation_loss(model, val, REPORT_BATCH, math.ceil(len(val) / REPORT_BATCH), pad_id, device)


def pruning_callback(trial, hcfg, loss_of):
    """``on_step`` for training.fit: every hpo.report_every steps before the last, report the negated validation
    loss (``loss_of()``; the study maximizes) and raise optuna.TrialPruned, saying why, when the pruner says stop."""
    import optuna

    def on_step(st, losses) -> bool:
        if st.step % hcfg.report_every or st.step >= hcfg.trial_max_steps:
            return False
        vl = loss_of()
        trial.report(-vl, st.step)
        if not trial.should_prune():
            log.info("trial %d step %d: validation loss %.4f, goes on", trial.number, st.step, vl)
            return False
        trial.set_user_attr("steps", st.step)
        raise optuna.TrialPruned(f"after {st.step} of {hcfg.trial_max_steps} steps: {_why(trial, hcfg, vl, st.step)}")

    return on_step


def _why(trial, hcfg, loss: float, step: int) -> str:
    """The pruning decision in numbers: this trial's loss against the complete trials' at the same step."""
    import optuna

    done = [-t.intermediate_values[step] for t in trial.study.get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)) if step in t.intermediate_values]
    if not done:
        return f"validation loss {loss:.4f} at step {step}; the {hcfg.pruner} pruner stopped it"
    median = statistics.median(done)
    if hcfg.pruner == "median":
        return (f"validation loss {loss:.4f} at step {step} is worse than the median {median:.4f} of "
                f"{len(done)} complete trial(s) at that step")
    return (f"validation loss {loss:.4f} at step {step}; the {hcfg.pruner} pruner stopped it (median of "
            f"{len(done)} complete trial(s) at that step: {median:.4f})")


def record_trial(ctx: StepContext, name: str, frozen) -> dict:
    from tasks.io import db, schema

    row = {"run_id": ctx.run_id, "study_name": name, "trial_number": frozen.number, "state": frozen.state.name,
           "params": {SPACE.get(k, k): v for k, v in frozen.params.items()}, "value": frozen.value,
           "error": frozen.user_attrs.get("error"), "mlflow_run_id": frozen.user_attrs.get("mlflow_run_id")}
    with db.engine().begin() as conn:
        db.upsert(conn, schema.hpo_trials, row, keys=("study_name", "trial_number"))
    return {"study": name, "trial": frozen.number, "state": frozen.state.name, "value": frozen.value,
            "params": row["params"], "error": row["error"], "steps": frozen.user_attrs.get("steps")}


def record_study(ctx: StepContext, name: str, counts: dict, best, params: dict) -> None:
    from sqlalchemy import update

    from tasks.io import db, schema

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
