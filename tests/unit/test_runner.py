"""The step command contract: arguments in, one JSON manifest as the last stdout line out."""

import json
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
