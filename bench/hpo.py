"""`python -m bench hpo`: the wall time HPO trials take with the project's median pruner and without pruning.

The same trials run in two studies in this process, each on optuna's in-memory storage: one with the pruner the
steps use (``tasks.ml.hpo.pruner``: median, 2 startup trials, no warm-up steps), one with none. Every trial is
``tasks.ml.hpo.train_and_score``, the hpo_trial step's own function (load the base, add LoRA, train on a subset with
the pruning callback, report the validation loss every ``hpo.report_every`` steps, score the merged model by
generation); only the snapshot read is swapped for the conversations of the other suites, and nothing goes to
MLflow or Postgres. The parameters are enqueued, not sampled, so both studies run the same trials: two with sane
learning rates, then diverging ones (what pruning is for). Trials alternate between the studies, so if the budget
runs out both have run the same trials. Reported: wall time, trials complete / pruned, optimizer steps trained,
the best score, and one row per trial.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

from bench.common import Budget, conversations, free_memory, model_dir

log = logging.getLogger("bench.hpo")
PARAMS = {"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "weight_decay": 0.0, "warmup_ratio": 0.0}
SANE_LR, DIVERGING_LR = (1e-3, 5e-4), (0.5, 0.3)


def sizes(device: str, smoke: bool) -> dict:
    if device == "cuda":
        return {"trial_max_steps": 16, "report_every": 4, "trial_train_rows": 256, "trial_eval_rows": 32,
                "max_new_tokens": 48, "batch_size": 16, "diverging": 2}
    if smoke:
        return {"trial_max_steps": 4, "report_every": 2, "trial_train_rows": 32, "trial_eval_rows": 8,
                "max_new_tokens": 8, "batch_size": 8, "diverging": 1}
    return {"trial_max_steps": 6, "report_every": 2, "trial_train_rows": 64, "trial_eval_rows": 8,
            "max_new_tokens": 16, "batch_size": 8, "diverging": 2}


def run_trial(study, ctx, hcfg) -> dict:
    """One trial as the hpo_trial step runs it (ask, train_and_score, tell), without MLflow and the results DB."""
    import optuna

    from tasks.ml import hpo

    t = study.ask(hpo.distributions(hcfg))
    overrides = {hpo.SPACE[k]: v for k, v in t.params.items()}
    t0 = time.perf_counter()
    note = ""
    try:
        value = hpo.train_and_score(ctx, t, overrides, None)
        study.tell(t, value)
    except optuna.TrialPruned as exc:
        study.tell(t, state=optuna.trial.TrialState.PRUNED)
        note = str(exc)
    frozen = study.trials[t.number]
    free_memory()
    return {"trial": t.number, "learning_rate": overrides["training.learning_rate"], "state": frozen.state.name,
            "steps": frozen.user_attrs.get("steps"), "seconds": time.perf_counter() - t0, "value": frozen.value,
            "note": note}


def summary(label: str, trials: list[dict], max_steps: int, base: float | None) -> dict:
    wall = sum(t["seconds"] for t in trials)
    done = [t["value"] for t in trials if t["state"] == "COMPLETE"]
    return {"pruner": label, "trials": len(trials), "complete": len(done),
            "pruned": sum(t["state"] == "PRUNED" for t in trials),
            "steps trained": sum(t["steps"] or 0 for t in trials), "of steps": max_steps * len(trials),
            "wall s": wall, "x no pruning": wall / base if base else 1.0,
            "best score": max(done) if done else "-"}


def main(args) -> dict:
    import optuna

    from tasks.config import load_config
    from tasks.context import StepContext
    from tasks.ml import hpo

    device, smoke = args.device, getattr(args, "smoke", False)
    budget, save = getattr(args, "budget", None) or Budget(0), getattr(args, "save", None) or (lambda result: None)
    n = sizes(device, smoke)
    base, model_desc = model_dir(device, Path(args.work), smoke)
    records, source = conversations(n["trial_train_rows"] * 2)
    splits = {"validation": records[::10], "train": [r for i, r in enumerate(records) if i % 10]}
    overrides = [f"model.base_model={base}", f"hpo.trial_max_steps={n['trial_max_steps']}",
                 f"hpo.report_every={n['report_every']}", f"hpo.trial_train_rows={n['trial_train_rows']}",
                 f"hpo.trial_eval_rows={n['trial_eval_rows']}", f"eval.max_new_tokens={n['max_new_tokens']}",
                 f"hpo.batch_size=[{n['batch_size']}]", "hpo.learning_rate=[1.0e-4, 1.0]"]
    cfg = load_config(None, overrides)
    ctx = StepContext("hpo_trial", "bench-hpo", cfg, overrides=overrides, inputs={"snapshot_uri": "bench:in-process"})
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    studies = {"median (the steps' pruner)": hpo.pruner(SimpleNamespace(pruner="median")),
               "none": optuna.pruners.NopPruner()}
    studies = {label: optuna.create_study(direction="maximize", pruner=p) for label, p in studies.items()}
    rates = [*SANE_LR, *DIVERGING_LR[:n["diverging"]]]
    for study in studies.values():
        for lr in rates:
            study.enqueue_trial({**PARAMS, "batch_size": n["batch_size"], "learning_rate": lr})
    trials: dict[str, list] = {label: [] for label in studies}
    info = {"model": model_desc, "data": source, "sizes": n, "learning_rates": rates,
            "train_rows": len(splits["train"]), "validation_rows": len(splits["validation"])}

    def result() -> dict:
        base_s = sum(t["seconds"] for t in trials["none"]) or None
        rows = [summary(label, trials[label], n["trial_max_steps"], base_s) for label in studies]
        diverging = [t for t in trials["median (the steps' pruner)"] if t["learning_rate"] in DIVERGING_LR]
        return {"rows": rows, "trials": trials, **info,
                "diverging_trials_pruned": bool(diverging) and all(t["state"] == "PRUNED" for t in diverging)}

    slowest = 0.0
    with mock.patch.object(hpo, "read_split", lambda uri, split: splits[split]):
        for i in range(len(rates)):
            if not budget.allows(2.2 * slowest + 5):  # one trial in each study, a margin for the slowest
                info["skipped"] = budget.skipped(f"trials {i}..{len(rates) - 1}", 2.2 * slowest)["skipped"]
                log.warning("hpo: %s", info["skipped"])
                break
            for label in ("none", "median (the steps' pruner)"):
                trials[label].append(run_trial(studies[label], ctx, cfg.hpo))
                slowest = max(slowest, trials[label][-1]["seconds"])
            save(result())
    out = result()
    for label, ts in trials.items():
        for t in ts:
            print(f"  {label}: trial {t['trial']} lr {t['learning_rate']:g} {t['state']} after {t['steps']} steps "
                  f"in {t['seconds']:.1f}s {t['note']}", flush=True)
    return out
