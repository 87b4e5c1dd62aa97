"""LoRA / QLoRA fine-tune of the base chat model on a ChatML snapshot, resumable from S3 checkpoints.

    python -m tasks finetune --run-id R --input snapshot_uri=s3://ecb-platform/snapshots/<id> \
        [--input best_params='{"lora.r": 16, "training.learning_rate": 0.0003}']

Every `training.checkpoint_every` steps the adapter, optimizer, scheduler, RNG states and data position go to
s3://<bucket>/runs/<run>/finetune/checkpoint/. An Airflow retry of a killed task loads it and continues from that
step; a finished run (done.json present) is not trained again.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
import time
from pathlib import Path

from tasks import s3, tracking
from tasks.runner import StepContext, StepError
from tasks.training import TrainState

log = logging.getLogger("tasks.finetune")


def read_split(snapshot_uri: str, split: str) -> list[dict]:
    uri = s3.join(snapshot_uri, f"{split}.jsonl")
    if not s3.head(uri):
        raise StepError(f"snapshot split {uri} does not exist (is --input snapshot_uri a prepared snapshot?)")
    return [json.loads(line) for line in s3.get_bytes(uri).decode().splitlines() if line.strip()]


def apply_best_params(ctx: StepContext) -> dict:
    """HPO's chosen values become config overrides of this run (recorded, never written to a file in git)."""
    best = json.loads(ctx.inputs.get("best_params") or "{}")
    if best:
        ctx.config = ctx.config_with(best)
        log.info("using HPO's best parameters: %s", best)
    return best


def load_base(cfg, device: str, dtype):
    """Tokenizer + base model from model.base_model (HF id, local folder or s3:// prefix)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.model_source import check_chat_template, resolve_base_model

    path = resolve_base_model(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    check_chat_template(tokenizer, cfg.model.base_model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    kwargs = {"dtype": dtype, "attn_implementation": cfg.model.attn_implementation}
    if cfg.lora.quantization == "nf4":
        if device != "cuda":
            raise StepError("lora.quantization=nf4 (QLoRA) needs a CUDA GPU and bitsandbytes; this machine has none. "
                            "Set lora.quantization=none to train LoRA on CPU.")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True)
        kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if cfg.lora.quantization != "nf4":
        model.to(device)
    model.config.use_cache = False
    return tokenizer, model


def add_lora(model, cfg, seed: int):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.lora.quantization == "nf4":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.training.gradient_checkpointing)
    elif cfg.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(seed)  # LoRA A init is random: same seed, same starting adapter
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


# --- checkpoints ----------------------------------------------------------------------------------------------


def _rng_state() -> dict:
    import random

    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import random

    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(uri: str, model, opt, sched, state: TrainState, config_hash: str) -> None:
    import torch
    from peft import get_peft_model_state_dict

    buf = io.BytesIO()
    torch.save({"adapter": get_peft_model_state_dict(model), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "rng": _rng_state(), "state": state.to_dict()}, buf)
    s3.put_bytes(s3.join(uri, "state.pt"), buf.getvalue())
    # meta.json last: a checkpoint counts only once its state is fully written.
    s3.put_json(s3.join(uri, "meta.json"), {"step": state.step, "config_hash": config_hash})
    log.info("checkpoint saved at step %d (%.1f MB) to %s", state.step, buf.tell() / 1e6, uri)


def load_checkpoint(uri: str, model, opt, sched, config_hash: str) -> TrainState | None:
    import torch
    from peft import set_peft_model_state_dict

    if not s3.head(s3.join(uri, "meta.json")):
        return None
    meta = s3.get_json(s3.join(uri, "meta.json"))
    if meta["config_hash"] != config_hash:
        log.warning("ignoring checkpoint at step %d: it was made with other settings", meta["step"])
        return None
    ckpt = torch.load(io.BytesIO(s3.get_bytes(s3.join(uri, "state.pt"))), weights_only=False, map_location="cpu")
    set_peft_model_state_dict(model, ckpt["adapter"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    _set_rng_state(ckpt["rng"])
    log.info("resuming from checkpoint at step %d (%s)", meta["step"], uri)
    return TrainState(**ckpt["state"])


# --- outputs --------------------------------------------------------------------------------------------------


def save_adapter(model, tokenizer, cfg, out_uri: str, mlflow_run: str | None) -> list[str]:
    """Adapter + tokenizer + resolved config, side by side, uploaded under out_uri and logged as MLflow artifacts
    from the same folder; returns the file names."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (Path(tmp) / "ecb_config.json").write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
        names = sorted(p.name for p in Path(tmp).iterdir() if p.is_file())
        for name in names:
            s3.put_bytes(s3.join(out_uri, name), (Path(tmp) / name).read_bytes())
        if mlflow_run is not None:
            from mlflow.tracking import MlflowClient

            MlflowClient().log_artifacts(mlflow_run, tmp, artifact_path="adapter")
    return names


def record(ctx: StepContext, snapshot_id: str, status: str, **values) -> None:
    from tasks import db, schema

    row = {"run_id": ctx.run_id, "kind": "final", "snapshot_id": snapshot_id,
           "base_model": ctx.config.model.base_model, "status": status, **values}
    with db.engine().begin() as conn:
        db.upsert(conn, schema.training_runs, row, keys=("run_id", "kind"))


def peak_memory_mb(device: str) -> float:
    import resource

    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run(ctx: StepContext) -> dict:
    from tasks.training import encode_all, fit, make_optimizer, steps_per_epoch, total_steps, validation_loss

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

    from tasks.training import device_and_dtype

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
    pending: list[tuple[str, float, int]] = []
    t0, tokens0, slots0 = time.monotonic(), state.tokens, state.slots

    def on_step(st: TrainState, loss: float) -> bool:
        pending.extend([("train_loss", loss, st.step), ("learning_rate", sched.get_last_lr()[0], st.step)])
        if st.step % cfg.training.checkpoint_every == 0 and st.step < steps:
            tracking.log_metrics(mlflow_run, pending)
            pending.clear()
            save_checkpoint(ckpt_uri, model, opt, sched, st, config_hash)
            record(ctx, snapshot_id, "running", last_step=st.step)
        return False

    state = fit(model, train, cfg.training, steps, state, opt, sched, pad_id=tokenizer.pad_token_id,
                device=device, dtype=dtype, on_step=on_step)
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
    tracking.log_metrics(mlflow_run, pending + [(k, v, state.step) for k, v in metrics.items()])
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
