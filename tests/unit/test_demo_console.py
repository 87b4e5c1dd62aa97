"""`make demo`'s console: which run it follows and the task lines it prints (the pure parts of tasks/devstack/cli.py;
the whole demo runs against the real stack in `make demo`)."""

from __future__ import annotations

from tasks.devstack import cli


def test_the_run_that_trains_is_followed_first():
    runs = [{"run_id": "manual__2", "state": "queued", "run_after": "2026-12-07T10:01:00"},
            {"run_id": "scheduled__1", "state": "running", "start_date": "2026-12-07T10:00:05"},
            {"run_id": "manual__0", "state": "success"}]
    assert [r["run_id"] for r in cli.active_runs(runs)] == ["scheduled__1", "manual__2"]
    assert cli.active_runs([{"run_id": "a", "state": "failed"}]) == []


def test_task_progress_prints_changed_states_only():
    rows = [{"task_id": "sync_raw_data", "state": "success", "map_index": -1},
            {"task_id": "hpo_trial", "state": "running", "map_index": 0},
            {"task_id": "hpo_trial", "state": None, "map_index": 1}]
    states, lines = cli.task_progress({}, rows)
    assert lines == ["    sync_raw_data: success", "    hpo_trial[0]: running"]  # no state yet: not printed
    rows[1]["state"] = "success"
    states, lines = cli.task_progress(states, rows)
    assert lines == ["    hpo_trial[0]: success"] and states["hpo_trial[0]"] == "success"
    assert cli.task_progress(states, rows)[1] == []
