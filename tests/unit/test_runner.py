"""The step command contract: arguments in, one JSON manifest as the last stdout line out."""

import json
import re
import subprocess
import sys

import pytest

from ecb_airflow.steps import LocalStepOperator, parse_manifest
from tests.conftest import REPO


def test_help_lists_steps_without_heavy_imports():
    code = ("import sys; from tasks import runner; runner.build_parser(); "
            "print(sorted(m for m in ('torch', 'mlflow', 'transformers') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.stdout.strip() == "[]"


def test_config_error_exits_2_and_names_the_field():
    r = subprocess.run([sys.executable, "-m", "tasks", "sync_raw_data", "--set", "data.max_rows=-5"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2
    assert "data.max_rows" in r.stderr and "below the minimum" in r.stderr
    assert r.stdout == ""  # no manifest on failure


def test_manifest_is_last_stdout_line(tmp_path):
    src = tmp_path / "src"
    r = subprocess.run([sys.executable, "-m", "tasks", "generate_demo_data", "--run-id", "t1", "--input",
                        f"dest={src}", "--input", "rows=50"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    manifest = json.loads(r.stdout.strip().splitlines()[-1])
    assert manifest["step"] == "generate_demo_data" and manifest["run_id"] == "t1"
    assert manifest["rows"] == 50
    assert (src / "demo_support_conversations.csv").exists()


def test_parse_manifest_takes_last_json_object():
    lines = ["INFO something\n", '{"a": 1}\n', "noise\n", '{"b": 2}\n', "\n"]
    assert parse_manifest(lines) == {"b": 2}
    with pytest.raises(ValueError):
        parse_manifest(["no json here"])


def test_operator_command_passes_params_and_inputs():
    op = LocalStepOperator(task_id="prepare_chatml", step="prepare_chatml", inputs={"raw_manifest": "s3://b/m.json"})
    argv = op.command("manual__1", {"force_retrain": True, "data.max_rows": 10, "data.source": "/d"})
    assert argv[1:6] == ["-m", "tasks", "prepare_chatml", "--run-id", "manual__1"]
    assert "data.max_rows=10" in argv and 'data.source="/d"' in argv
    assert "raw_manifest=s3://b/m.json" in argv
    assert not any("force_retrain" in a for a in argv)  # run switches are not config


def _sync_against_dead_s3(*sets: str) -> subprocess.CompletedProcess:
    """sync_raw_data with nothing listening on the S3 endpoint: it fails at its first call (check_bucket)."""
    import os

    from tasks.devstack.stack import free_port

    argv = [sys.executable, "-m", "tasks", "sync_raw_data", "--run-id", "dead-s3"]
    for s in sets:
        argv += ["--set", s]
    env = {**os.environ, "ECB_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)


def test_set_storage_retry_budget_reaches_the_s3_helpers():
    r = _sync_against_dead_s3("storage.s3_retry_s=1", "storage.s3_max_attempts=1")
    assert r.returncode == 2, r.stderr
    assert "cannot check bucket s3://ecb-platform: S3 unreachable for 1 s, each try making 1 attempts" in r.stderr
    assert "trying again for up to 1 s more" in r.stderr


def test_runner_honours_log_timestamps_and_level():
    stamped = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ERROR tasks: step sync_raw_data failed: "
    r = _sync_against_dead_s3("storage.s3_retry_s=0", "storage.s3_max_attempts=1")
    assert re.search(stamped, r.stderr, re.M), r.stderr
    r = _sync_against_dead_s3("storage.s3_retry_s=1", "storage.s3_max_attempts=1", "pipeline.log_timestamps=false",
                              "pipeline.log_level=ERROR")
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("ERROR tasks: step sync_raw_data failed: cannot check bucket"), r.stderr
    assert not any(line.startswith("WARNING") for line in lines)  # the retry warnings are below ERROR


def test_configure_io_gives_the_helpers_this_runs_settings():
    from tasks.config import Config, StorageConfig, load_config
    from tasks.io import db, s3, tracking
    from tasks.runner import configure_io

    try:
        configure_io(load_config(overrides=["storage.s3_retry_s=7", "storage.s3_max_attempts=3",
                                            "storage.db_retry_s=9", "storage.db_pool_size=4",
                                            "pipeline.mlflow_experiment=exp-x"]))
        assert (s3.retry_seconds(), s3.max_attempts(), db.retry_seconds()) == (7.0, 3, 9.0)
        assert db._settings["pool_size"] == 4 and tracking._settings["experiment"] == "exp-x"
    finally:
        configure_io(Config())
    assert (s3.retry_seconds(), s3.max_attempts()) == (StorageConfig().s3_retry_s, StorageConfig().s3_max_attempts)


def test_chat_app_uses_its_own_pool_size():
    from tasks.chat import create_app
    from tasks.config import Config, load_config
    from tasks.io import db

    def no_model(cfg, uri):
        raise RuntimeError("no model in this test")

    try:
        create_app(load_config(overrides=["chat.db_pool_size=5", "storage.db_pool_size=3"]), loader=no_model,
                   wait_for_model=True)
        assert db._settings["pool_size"] == 5
    finally:
        cfg = Config()
        db.configure(pool_size=cfg.storage.db_pool_size, retry_s=cfg.storage.db_retry_s)
