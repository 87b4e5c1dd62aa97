"""LoRA / QLoRA fine-tune of the base chat model on a ChatML snapshot, resumable from S3 checkpoints.

    python -m tasks finetune --run-id R --input snapshot_uri=s3://ecb-platform/snapshots/<id> \
        [--input best_params='{"lora.r": 16, "training.learning_rate": 0.0003}']

Every `training.checkpoint_every` steps the adapter, optimizer, scheduler, RNG states and data position go to
s3://<bucket>/runs/<run>/finetune/checkpoint/ (uploaded in the background while training goes on). An Airflow
retry of a killed task loads it and continues from that step; a finished run (done.json present) is not trained
again.
"""

from __future__ import annotations

import json
import logging
import time

from tasks.context import StepContext
from tasks.data.snapshots import read_split
from tasks.errors import StepError
from tasks.io import s3, tracking
from tasks.ml.checkpoints import CheckpointWriter, load_checkpoint, save_adapter
from tasks.ml.models import add_lora, load_base, peak_memory_mb
from tasks.ml.training import TrainState, device_and_dtype

log = logging.getLogger("tasks.steps.finetune")


def apply_best_params(ctx: StepContext) -> dict:
    """HPO's chosen values become config overrides of this run (recorded, never written to a file in git)."""
    best = json.loads(ctx.inputs.get("best_params") or "{}")
    if best:
        ctx.config = ctx.config_with(best)
        log.info("using HPO's best parameters: %s", best)
    return best


def record(ctx: StepContext, snapshot_id: str, status: str, **values) -> None:
    from tasks.io import db, schema

    row = {"run_id": ctx.run_id, "kind": "final", "snapshot_id": snapshot_id,
           "base_model": ctx.config.model.base_model, "status": status, **values}
    with db.engine().begin() as conn:
        db.upsert(conn, schema.training_runs, row, keys=("run_id", "kind"))


def run(ctx: StepContext) -> dict:
    from tasks.ml.training import encode_all, fit, make_optimizer, steps_per_epoch, total_steps, validation_loss

    best = apply_best_params(ctx)
    cfg = ctx.config
    snapshot_uri = ctx.require_input("snapshot_uri")
    snapshot_id = snapshot_uri.rstrip("/").rsplit("/", 1)[-1]
    base = s3.join(f"s3://{cfg.storage.bucket}", cfg.storage.runs_prefix, s3.safe_key(ctx.run_id), "finetune")
    ckpt_uri, out_uri = s3.join(base, "checkpoint"), s3.join(base, "adapter")
    config_hash = cfg.section_hash("model", "lora", "training") + snapshot_id
    done = s3.get_json(s3.join(base, "done.json")) if s3.head(s3.join(base, "done.json")) else None
    if done and done["config_hash"] == config_hash:
        log.info("fine-tune of run %s already finished with these settings; returning its result", ctx.run_id)
        return done["manifest"]

    device, dtype = device_and_dtype(cfg.training)
    tokenizer, model = load_base(cfg, device, dtype)
    train = encode_all(tokenizer, read_split(snapshot_uri, "train"), cfg.model.max_seq_len)
    val = encode_all(tokenizer, read_split(snapshot_uri, "validation"), cfg.model.max_seq_len)
    if len(train) < cfg.training.batch_size:
        raise StepError(f"training split of snapshot {snapshot_id} has {len(train)} usable conversations, fewer "
                        f"than one batch (training.batch_size={cfg.training.batch_size})")
    model = add_lora(model, cfg, cfg.training.seed)
    steps = total_steps(len(train), cfg.training, steps_per_epoch(train, cfg.training, device))
    opt, sched = make_optimizer(model, cfg.training, steps)
    state = load_checkpoint(ckpt_uri, model, opt, sched, config_hash) or TrainState()
    resumed_from = state.step
    if state.val_loss_before is None and val:
        state.val_loss_before = validation_loss(model, val, cfg.training.batch_size, cfg.training.eval_batches,
                                                tokenizer.pad_token_id, device)
    mlflow_run = tracking.find_or_create_run(f"finetune-{ctx.run_id}", {"ecb.run_id": ctx.run_id,
                                                                         "ecb.kind": "finetune"})
    tracking.log_params(mlflow_run, {**tracking.flatten(cfg.to_dict()), "snapshot_id": snapshot_id,
                                     "hpo.best_params": json.dumps(best)})
    record(ctx, snapshot_id, "running", mlflow_run_id=mlflow_run, last_step=state.step,
           params={"best_params": best, "steps": steps})
    log.info("fine-tuning %s on %d conversations (%d validation), %d steps, device %s, dtype %s, LoRA r=%d "
             "alpha=%d on %s; %s", cfg.model.base_model, len(train), len(val), steps, device, dtype, cfg.lora.r,
             cfg.lora.alpha, ",".join(cfg.lora.target_modules),
             f"resuming at step {resumed_from}" if resumed_from else "starting at step 0")
    logged = len(state.losses)  # a resumed run logged these to MLflow before its checkpoint
    t0, tokens0, slots0 = time.monotonic(), state.tokens, state.slots
    # Checkpoints upload in the background; the row says a step only once its checkpoint counts.
    writer = CheckpointWriter(ckpt_uri, config_hash,
                              on_saved=lambda step: record(ctx, snapshot_id, "running", last_step=step))

    def new_losses(st: TrainState) -> list[tuple[str, float, int]]:
        nonlocal logged
        rows, logged = st.losses[logged:], len(st.losses)
        return [(k, v, step) for step, loss, lr in rows for k, v in (("train_loss", loss), ("learning_rate", lr))]

    def on_step(st: TrainState, losses) -> bool:
        if st.step % cfg.training.checkpoint_every == 0 and st.step < steps:
            losses.flush()  # the checkpoint holds every loss so far
            tracking.log_metrics(mlflow_run, new_losses(st))
            writer.save(model, opt, sched, st)
        return False

    try:
        state = fit(model, train, cfg.training, steps, state, opt, sched, pad_id=tokenizer.pad_token_id,
                    device=device, dtype=dtype, on_step=on_step)
    finally:
        writer.close()
    elapsed = time.monotonic() - t0
    tok_s = (state.tokens - tokens0) / max(elapsed, 1e-9)
    val_loss = validation_loss(model, val, cfg.training.batch_size, cfg.training.eval_batches,
                               tokenizer.pad_token_id, device) if val else float("nan")
    # mean of the first / last five steps: single length-grouped batches differ too much to compare one by one
    first, last = (sum(x[1] for x in part) / len(part) for part in (state.losses[:5], state.losses[-5:]))
    metrics = {"val_loss": val_loss, "val_loss_before": state.val_loss_before, "train_loss_first": first,
               "train_loss_last": last, "tokens_per_s": tok_s,
               "padding_waste": 1 - (state.tokens - tokens0) / max(state.slots - slots0, 1),
               "peak_memory_mb": peak_memory_mb(device), "steps": state.step, "resumed_from_step": resumed_from}
    tracking.log_metrics(mlflow_run, new_losses(state) + [(k, v, state.step) for k, v in metrics.items()])
    files = save_adapter(model, tokenizer, cfg, out_uri, mlflow_run)
    log.info("fine-tune done: %d steps (resumed from %d), train loss %.4f -> %.4f, validation loss %.4f -> %.4f, "
             "%.0f tokens/s, peak memory %.0f MB; adapter at %s", state.step, resumed_from, first, last,
             state.val_loss_before or float("nan"), val_loss, tok_s,
             metrics["peak_memory_mb"], out_uri)
    manifest = {"adapter_uri": out_uri, "snapshot_id": snapshot_id, "base_model": cfg.model.base_model,
                "mlflow_run_id": mlflow_run, "metrics": metrics, "files": files, "best_params": best}
    record(ctx, snapshot_id, "finished", adapter_uri=out_uri, mlflow_run_id=mlflow_run, last_step=state.step,
           metrics=metrics)
    s3.put_json(s3.join(base, "done.json"), {"config_hash": config_hash, "manifest": manifest})
    return manifest
