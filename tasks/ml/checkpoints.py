"""Resumable fine-tune state in S3 (adapter, optimizer, scheduler, RNG states, data position) and the final
adapter folder. A checkpoint counts only once its meta.json, written last, is there."""

from __future__ import annotations

import io
import json
import logging
import tempfile
import time
from pathlib import Path

from tasks.io import s3
from tasks.ml.training import TrainState

log = logging.getLogger("tasks.ml.checkpoints")


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


def checkpoint_bytes(model, opt, sched, state: TrainState) -> bytes:
    """The resumable state, serialized now (the next optimizer step changes the tensors in place)."""
    import torch
    from peft import get_peft_model_state_dict

    buf = io.BytesIO()
    torch.save({"adapter": get_peft_model_state_dict(model), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "rng": _rng_state(), "state": state.to_dict()}, buf)
    return buf.getvalue()


def upload_checkpoint(uri: str, data: bytes, step: int, config_hash: str) -> None:
    s3.put_bytes(s3.join(uri, "state.pt"), data)
    # meta.json last: a checkpoint counts only once its state is fully written.
    s3.put_json(s3.join(uri, "meta.json"), {"step": step, "config_hash": config_hash})


class CheckpointWriter:
    """Checkpoints uploaded off the training thread. ``save`` serializes the state at once and hands the upload
    (state.pt, then meta.json) to one background thread, so training goes on while S3 takes the bytes. At most one
    upload is in flight: a save waits for the previous upload before it serializes (so memory holds one serialized
    checkpoint, and checkpoints land in step order). An upload error is raised by the next ``save`` or by
    ``close``, so the step fails (and its retry resumes from the last complete checkpoint) instead of finishing
    with a checkpoint that is not there. ``on_saved(step)`` runs on the upload thread once a checkpoint counts."""

    def __init__(self, uri: str, config_hash: str, on_saved=None):
        from concurrent.futures import ThreadPoolExecutor

        self.uri, self.config_hash, self.on_saved = uri, config_hash, on_saved
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-upload")
        self._pending = None
        self.saved_steps: list[int] = []

    def save(self, model, opt, sched, state: TrainState) -> None:
        self.wait()
        started = time.monotonic()
        data = checkpoint_bytes(model, opt, sched, state)
        log.info("checkpoint at step %d: %.1f MB serialized in %.2fs; uploading in the background", state.step,
                 len(data) / 1e6, time.monotonic() - started)
        self._pending = self._pool.submit(self._upload, data, state.step)

    def _upload(self, data: bytes, step: int) -> None:
        started = time.monotonic()
        upload_checkpoint(self.uri, data, step, self.config_hash)
        self.saved_steps.append(step)
        log.info("checkpoint of step %d uploaded in %.1fs to %s", step, time.monotonic() - started, self.uri)
        if self.on_saved is not None:
            self.on_saved(step)

    def wait(self) -> None:
        """Until the upload in flight is done; raises its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


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
