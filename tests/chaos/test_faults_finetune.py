"""Fault: the fine-tune process SIGKILLed at three points; every rerun resumes from the last S3 checkpoint and the
finished adapter equals that of an uninterrupted run with the same seed.

The kills are real (SIGKILL to the step process, sent the moment it logs the line that marks the point), the
checkpoints real S3 objects in SeaweedFS. Kill points, in one chain of four processes (as an Airflow task and its
retries would run):
  1. right after the first checkpoint is written              -> the rerun resumes at step 10
  2. mid-way, right after the second checkpoint               -> the rerun resumes at step 20
  3. just before finishing: all 40 steps done, adapter unsaved -> the rerun resumes at step 30 (the last checkpoint)
"""

from __future__ import annotations

import json
import re
import time

import pytest

from tasks.io import s3
from tests.chaos.faults_pipeline import StepProcess, make_snapshot
from tests.conftest import run_step

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

STEPS, EVERY = 40, 10
# Adapter tensors of the resumed run vs the uninterrupted one. A resume restores the exact adapter, AdamW moments,
# scheduler and RNG state and replays the same seeded batches, so on one CPU machine the result is bit-identical
# (measured max |diff| = 0.0). The bound leaves room only for float32 reduction-order noise on other hardware
# (weights are O(1e-2); one ulp there is ~1e-9) and is far below what one skipped or repeated step changes (~1e-3).
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def snapshot(services):
    return make_snapshot("chaos-ft-snapshot")["snapshot_uri"]


def finetune_args(snapshot, base):
    return ["--set", f"model.base_model={base}", "--input", f"snapshot_uri={snapshot}",
            "--set", f"training.max_steps={STEPS}", "--set", f"training.checkpoint_every={EVERY}"]


def resumed_at(stderr: str) -> int | None:
    m = re.search(r"resuming from checkpoint at step (\d+)", stderr)
    return int(m.group(1)) if m else None


def adapter_tensors(adapter_uri: str, tmp_path, name: str) -> dict:
    from safetensors.torch import load_file

    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(s3.get_bytes(s3.join(adapter_uri, "adapter_model.safetensors")))
    return load_file(str(path))


def test_finetune_killed_three_times_resumes_and_matches_uninterrupted(mlflow_server, snapshot, tiny_base_model,
                                                                       uid, tmp_path):
    args = finetune_args(snapshot, tiny_base_model)
    t0 = time.monotonic()
    ref = json.loads(run_step("finetune", f"ft-ref-{uid}", *args).stdout.splitlines()[-1])
    assert ref["metrics"]["steps"] == STEPS and ref["metrics"]["resumed_from_step"] == 0
    t_ref = time.monotonic() - t0

    run_id = f"ft-kill-{uid}"
    base = f"s3://ecb-platform/runs/{run_id}/finetune"
    # checkpoints upload in the background: "uploaded" is logged once meta.json is written (the checkpoint counts)
    kill_points = [(f"checkpoint of step {EVERY} uploaded", "after the first checkpoint"),
                   (f"checkpoint of step {2 * EVERY} uploaded", "mid-way"),
                   (f"step {STEPS}/{STEPS} ", "just before finishing")]
    resumes, killed_at = [], []
    for i, (line, _) in enumerate(kill_points):
        proc = StepProcess("finetune", run_id, args)
        proc.kill_when(line)
        if i:
            resumes.append(resumed_at(proc.stderr))
        killed_at.append(s3.get_json(s3.join(base, "checkpoint", "meta.json"))["step"])
        assert not s3.head(s3.join(base, "done.json")) and not s3.head(s3.join(base, "adapter",
                                                                                "adapter_model.safetensors"))
    final = run_step("finetune", run_id, *args)
    resumes.append(resumed_at(final.stderr))
    m = json.loads(final.stdout.splitlines()[-1])

    # Each rerun resumed from the checkpoint the killed process left: 10, 20, then 30 (the kill at step 40 lost
    # steps 31..40, which the last rerun trained again).
    assert killed_at == [EVERY, 2 * EVERY, 3 * EVERY]
    assert resumes == killed_at, (resumes, killed_at)
    assert m["metrics"]["resumed_from_step"] == 3 * EVERY and m["metrics"]["steps"] == STEPS

    ref_w = adapter_tensors(ref["adapter_uri"], tmp_path, "ref")
    got_w = adapter_tensors(m["adapter_uri"], tmp_path, "resumed")
    assert ref_w.keys() == got_w.keys() and ref_w
    diff = max(float((ref_w[k].float() - got_w[k].float()).abs().max()) for k in ref_w)
    scale = max(float(v.float().abs().max()) for v in ref_w.values())
    print(f"\nFINETUNE-KILL: killed at checkpoints {killed_at}, resumed at {resumes}; adapter max |diff| {diff:.3g} "
          f"(max |w| {scale:.3g}, tolerance {TOLERANCE}); uninterrupted run {t_ref:.0f}s, "
          f"whole test {time.monotonic() - t0:.0f}s")
    assert diff <= TOLERANCE
    # The validation loss of both runs agrees as well (same weights, same batches).
    assert abs(m["metrics"]["val_loss"] - ref["metrics"]["val_loss"]) <= 1e-5
