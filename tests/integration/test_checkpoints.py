"""Fine-tune checkpoints uploaded off the training thread (tasks.ml.checkpoints.CheckpointWriter), against real S3."""

import threading

import pytest

from tasks.io import s3

pytestmark = pytest.mark.integration


def lora_model(base: str):
    from transformers import AutoModelForCausalLM

    from tasks.config import load_config
    from tasks.ml import models
    from tasks.ml.training import make_optimizer

    cfg = load_config()
    model = models.add_lora(AutoModelForCausalLM.from_pretrained(base), cfg, seed=0)
    opt, sched = make_optimizer(model, cfg.training, 10)
    return model, opt, sched


def train_one_step(model, opt, sched) -> None:
    import torch

    ids = torch.arange(2, 34).view(2, 16)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)


def test_uploads_run_in_the_background_in_step_order_and_resume_exactly(services, tiny_base_model, uid):
    import torch
    from peft import get_peft_model_state_dict

    from tasks.ml.checkpoints import CheckpointWriter, load_checkpoint
    from tasks.ml.training import TrainState

    s3.ensure_bucket("ecb-platform")
    uri = f"s3://ecb-platform/tests/checkpoints-{uid}"
    model, opt, sched = lora_model(str(tiny_base_model))
    saved = []
    writer = CheckpointWriter(uri, "hash-1", on_saved=lambda step: saved.append((step, threading.current_thread())))
    state = TrainState()
    for step in (1, 2):
        train_one_step(model, opt, sched)
        state.step, state.losses = step, [*state.losses, (step, 1.0 / step, 1e-3)]
        writer.save(model, opt, sched, state)
    writer.close()
    assert [step for step, _ in saved] == [1, 2] and writer.saved_steps == [1, 2]
    assert all(t is not threading.main_thread() and t.name.startswith("checkpoint-upload") for _, t in saved)
    assert s3.get_json(f"{uri}/meta.json") == {"step": 2, "config_hash": "hash-1"}

    fresh, fresh_opt, fresh_sched = lora_model(str(tiny_base_model))
    resumed = load_checkpoint(uri, fresh, fresh_opt, fresh_sched, "hash-1")
    assert resumed.step == 2 and resumed.losses == state.losses
    want, got = get_peft_model_state_dict(model), get_peft_model_state_dict(fresh)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert fresh_sched.last_epoch == sched.last_epoch == 2
    assert load_checkpoint(uri, fresh, fresh_opt, fresh_sched, "other-settings") is None


def test_a_failed_upload_fails_the_next_save_or_close(services, tiny_base_model):
    from tasks.ml.checkpoints import CheckpointWriter
    from tasks.ml.training import TrainState

    model, opt, sched = lora_model(str(tiny_base_model))
    writer = CheckpointWriter("s3://Not_A_Valid_Bucket/ckpt", "h")  # S3 refuses the name: every upload fails
    writer.save(model, opt, sched, TrainState(step=1))  # returns: the upload runs in the background
    with pytest.raises(s3.S3Error, match="Not_A_Valid_Bucket/ckpt/state.pt"):
        writer.save(model, opt, sched, TrainState(step=2))  # ... and its failure stops the next checkpoint
    writer = CheckpointWriter("s3://Not_A_Valid_Bucket/ckpt", "h")
    writer.save(model, opt, sched, TrainState(step=1))
    with pytest.raises(s3.S3Error, match="Not_A_Valid_Bucket"):
        writer.close()
    assert writer.saved_steps == []
