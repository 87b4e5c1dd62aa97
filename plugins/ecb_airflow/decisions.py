"""The DAG's two decisions, as pure functions of step manifests: go on to train, and release or not.

Each returns its answer and the one sentence the task logs, so the rule is unit-tested without Airflow.
"""

from __future__ import annotations

RELEASE_TASK = "register_model"
SKIP_TASK = "skip_release"


def keep_training(prep: dict, force_retrain: bool) -> tuple[bool, str]:
    """Whether the run trains after ``prepare_chatml`` (its manifest ``prep``): not when the snapshot and training
    config equal those of the released model, unless ``force_retrain`` is set."""
    release = prep.get("last_release")
    if force_retrain:
        return True, f"Continuing: force_retrain is set (snapshot {prep['snapshot_id']})."
    if prep["unchanged_since_release"]:
        return False, (f"Stopping early: snapshot {prep['snapshot_id']} and config hash {prep['config_hash']} equal "
                       f"those of release {release['registry_version']} (run {release['run_id']}); "
                       "set force_retrain to train anyway.")
    last = f"snapshot {release['snapshot_id']}, config {release['config_hash']}" if release else "none yet"
    return True, (f"Continuing: snapshot {prep['snapshot_id']} / config {prep['config_hash']} differ from the last "
                  f"release ({last}).")


def gate_branch(decision: dict) -> tuple[str, str]:
    """The task the run follows after the ``quality_gate`` step (its manifest ``decision``), and why."""
    branch = RELEASE_TASK if decision["release"] else SKIP_TASK
    return branch, f"Gate decision {decision['decision_id']} -> {branch}: {decision['summary']}"
