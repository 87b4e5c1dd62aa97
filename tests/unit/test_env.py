"""tasks/env.py: the one registry of the environment variables the container side reads."""

import re

import pytest

from tasks import env
from tasks.errors import StepError
from tests.conftest import REPO

TASKS = REPO / "tasks"


def test_unregistered_name_raises():
    for read in (env.get, lambda name: env.require(name, "why")):
        with pytest.raises(LookupError, match="ECB_NOT_A_VARIABLE is not registered in tasks/env.py"):
            read("ECB_NOT_A_VARIABLE")


def test_require_says_why_and_get_strips(monkeypatch):
    monkeypatch.delenv("ECB_OPTUNA_DB_URL", raising=False)
    with pytest.raises(StepError, match="ECB_OPTUNA_DB_URL is not set: HPO needs it"):
        env.require("ECB_OPTUNA_DB_URL", "HPO needs it")
    monkeypatch.setenv("ECB_OPTUNA_DB_URL", "  postgresql://h/optuna \n")
    assert env.require("ECB_OPTUNA_DB_URL", "x") == "postgresql://h/optuna"
    monkeypatch.setenv("HF_ENDPOINT", "   ")
    assert env.get("HF_ENDPOINT", "fallback") == "fallback"


def test_every_variable_has_a_known_kind_and_help():
    assert len(env.VARS) > 10
    for name, var in env.VARS.items():
        assert var.kind in env.KINDS, name
        assert var.help.strip(), name
    kinds = {var.kind for var in env.VARS.values()}
    assert kinds == set(env.KINDS)


def test_secret_values_are_the_set_secrets_only(monkeypatch):
    for name, var in env.VARS.items():
        if var.kind == env.SECRET:
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value_123")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-value-456")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")  # an endpoint, not a secret
    assert sorted(env.secret_values()) == ["aws-secret-value-456", "hf_secret_value_123"]


def test_export_returns_what_restores_it(monkeypatch):
    monkeypatch.setenv("ECB_USE_AWS", "1")
    monkeypatch.delenv("ECB_AIRFLOW_PORT", raising=False)
    previous = env.export({"ECB_USE_AWS": None, "ECB_AIRFLOW_PORT": "9090"})
    assert (env.get("ECB_USE_AWS"), env.get("ECB_AIRFLOW_PORT")) == ("", "9090")
    assert env.child({"X_EXTRA": "y"})["ECB_AIRFLOW_PORT"] == "9090"
    env.export(previous)
    assert (env.get("ECB_USE_AWS"), env.get("ECB_AIRFLOW_PORT")) == ("1", "")


def _sources():
    return [(p, p.read_text()) for p in sorted(TASKS.rglob("*.py"))]


def test_only_tasks_env_reads_the_environment():
    """The done-when check of the registry: behaviour is config, so nothing else in tasks/ touches os.environ."""
    offenders = [f"{p.relative_to(REPO)}:{n}: {line.strip()}" for p, text in _sources() if p != TASKS / "env.py"
                 for n, line in enumerate(text.splitlines(), 1) if re.search(r"os\.environ|getenv|putenv", line)]
    assert offenders == []


def test_every_name_read_in_tasks_is_registered():
    read = {m.group(2) for _, text in _sources()
            for m in re.finditer(r"env\.(get|require)\(\s*[\"']([A-Z][A-Z0-9_]*)[\"']", text)}
    assert read, "found no env.get/env.require calls"
    assert read - set(env.VARS) == set()
