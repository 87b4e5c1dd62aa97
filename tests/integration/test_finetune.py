"""The fine-tune step on the tiny demo-style base model, on CPU, against real S3, Postgres and MLflow."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from sqlalchemy import select

from tasks.io import db, s3, schema
from tests.conftest import REPO, prepared_snapshot, run_step, step_manifest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def snapshot(services):
    """A prepared ChatML snapshot of generated demo conversations, made by the real sync + prep steps."""
    return prepared_snapshot("finetune-tests", 240, seed=21)


def finetune_args(snapshot, base, max_steps, *extra):
    return ["--set", f"model.base_model={base}", "--input", f"snapshot_uri={snapshot}",
            "--set", f"training.max_steps={max_steps}", *extra]


def test_finetune_trains_every_lora_weight_and_lowers_the_loss(mlflow_server, snapshot, tiny_base_model, uid):
    import torch
    from safetensors.torch import load_file

    r = run_step("finetune", f"ft-{uid}", *finetune_args(snapshot, tiny_base_model, 30))
    m = json.loads(r.stdout.splitlines()[-1])
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "ecb_config.json"} <= set(m["files"])
    # The loss fell, measured where it means something: on held-out conversations, same batches before and after.
    # (Per-step training losses of length-grouped batches swing with batch length; they are logged, not compared.)
    assert m["metrics"]["val_loss"] < m["metrics"]["val_loss_before"] - 0.05
    assert m["metrics"]["steps"] == 30 and m["metrics"]["tokens_per_s"] > 0
    assert "step 30/30" in r.stderr  # the progress line

    weights = load_file(_download(m["adapter_uri"], "adapter_model.safetensors"))
    lora_b = {k: v for k, v in weights.items() if "lora_B" in k}
    assert lora_b and len(lora_b) == len([k for k in weights if "lora_A" in k])
    assert all(torch.count_nonzero(v) == v.numel() for v in lora_b.values())  # B starts at zero: all trained
    init = _initial_lora_a(tiny_base_model)
    for key, value in weights.items():
        if "lora_A" in key:
            assert not torch.equal(value, init[key]), f"{key} did not change"

    with db.engine().connect() as conn:
        row = conn.execute(select(schema.training_runs).where(schema.training_runs.c.run_id == f"ft-{uid}")).one()
    assert row.status == "finished" and row.last_step == 30 and row.adapter_uri == m["adapter_uri"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    run = client.get_run(m["mlflow_run_id"])
    assert run.data.params["lora.r"] == "16" and run.data.params["snapshot_id"] == m["snapshot_id"]
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 30
    assert {"tokens_per_s", "peak_memory_mb", "val_loss"} <= set(run.data.metrics)
    assert "adapter/adapter_model.safetensors" in [a.path for a in client.list_artifacts(run.info.run_id, "adapter")]

    again = json.loads(run_step("finetune", f"ft-{uid}", *finetune_args(snapshot, tiny_base_model, 30))
                       .stdout.splitlines()[-1])
    assert again["mlflow_run_id"] == m["mlflow_run_id"]  # a retry of a finished step trains nothing new


def _download(uri, name):
    path = REPO / ".ecb-test" / f"{os.getpid()}-{name}"
    path.write_bytes(s3.get_bytes(s3.join(uri, name)))
    return str(path)


def _initial_lora_a(base):
    """LoRA A matrices as the step initialises them (same seed, same config)."""
    from peft import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from tasks.config import load_config
    from tasks.ml import models

    cfg = load_config()
    model = models.add_lora(AutoModelForCausalLM.from_pretrained(base), cfg, cfg.training.seed)
    return {k.replace(".default", ""): v for k, v in get_peft_model_state_dict(model).items()}


def test_killed_finetune_resumes_from_its_checkpoint(mlflow_server, snapshot, tiny_base_model, uid):
    run_id = f"resume-{uid}"
    args = finetune_args(snapshot, tiny_base_model, 80, "--set", "training.checkpoint_every=10")
    argv = [sys.executable, "-m", "tasks", "finetune", "--run-id", run_id, *args]
    meta = f"s3://ecb-platform/runs/{run_id}/finetune/checkpoint/meta.json"
    proc = subprocess.Popen(argv, cwd=REPO, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600  # generous: on 2 loaded cores the first checkpoint took over 240 s once
    while not s3.head(meta) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "the step finished before it could be killed; make it longer"
    assert s3.head(meta), "no checkpoint within 600 s"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = s3.get_json(meta)["step"]
    assert 0 < killed_at < 80

    r = run_step("finetune", run_id, *args)
    resumed = int(r.stderr.split("resuming from checkpoint at step ")[1].split()[0])
    assert resumed >= killed_at
    m = json.loads(r.stdout.splitlines()[-1])
    assert m["metrics"]["resumed_from_step"] == resumed and m["metrics"]["steps"] == 80


@pytest.mark.parametrize("args, words", [
    (["--set", "lora.quantization=nf4"], ["lora.quantization=nf4", "CUDA"]),
    (["--set", "training.batch_size=4096"], ["fewer than one batch", "training.batch_size=4096"]),
])
def test_bad_settings_fail_with_the_field_named(services, snapshot, tiny_base_model, uid, args, words):
    r = run_step("finetune", f"bad-{uid}", *finetune_args(snapshot, tiny_base_model, 2, *args), check=False)
    assert r.returncode == 2 and r.stdout == ""
    for w in words:
        assert w in r.stderr


def test_missing_snapshot_fails_naming_it(services, tiny_base_model, uid):
    missing = f"s3://ecb-platform/snapshots/does-not-exist-{uid}"
    r = run_step("finetune", f"nosnap-{uid}", *finetune_args(missing, tiny_base_model, 2), check=False)
    assert r.returncode == 2 and f"does-not-exist-{uid}/train.jsonl does not exist" in r.stderr


def test_crashing_trial_is_recorded_as_fail_and_does_not_fail_the_task(mlflow_server, snapshot, uid):
    """A trial whose base model cannot load crashes; the study records FAIL with the error, the step exits 0,
    and select_best then refuses to choose from zero complete trials."""
    import optuna

    from tasks.ml import hpo

    run_id, broken = f"crash-{uid}", f"/nonexistent/model-{uid}"
    plan = step_manifest("plan_hpo", run_id)
    out = step_manifest("hpo_trial", run_id, "--set", f"model.base_model={broken}", "--input",
                        f"study={plan['study']}", "--input", "slot=0", "--input", f"snapshot_uri={snapshot}")
    assert out["state"] == "FAIL" and broken in out["error"]
    study = optuna.load_study(study_name=plan["study"], storage=hpo.storage())
    assert [t.state.name for t in study.trials] == ["FAIL"]
    with db.engine().connect() as conn:
        row = conn.execute(select(schema.hpo_trials).where(schema.hpo_trials.c.study_name == plan["study"])).one()
    assert row.state == "FAIL" and broken in row.error
    again = step_manifest("hpo_trial", run_id, "--set", f"model.base_model={broken}", "--input",
                          f"study={plan['study']}", "--input", "slot=0", "--input", f"snapshot_uri={snapshot}")
    assert again["trial"] == out["trial"]  # a retry of the same slot does not ask for a second trial
    r = run_step("select_best", run_id, "--input", f"study={plan['study']}", check=False)
    assert r.returncode == 2 and "no complete trial" in r.stderr and broken in r.stderr
