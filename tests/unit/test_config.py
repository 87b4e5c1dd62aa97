import pytest

from tasks.config import Config, ConfigError, iter_fields, load_config


def test_defaults_have_help_text_for_every_field():
    fields = list(iter_fields())
    assert len(fields) > 10
    for name, f, _ in fields:
        assert f.metadata.get("help"), f"{name} has no help text"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  max_rows: 50\n  test_fraction: 0.2\n")
    cfg = load_config(path, ["data.max_rows=7", "data.source=/tmp/x"])
    assert cfg.data.max_rows == 7
    assert cfg.data.test_fraction == 0.2
    assert cfg.data.source == "/tmp/x"


def test_int_accepted_for_float_field():
    assert load_config(overrides=["data.test_fraction=0"]).data.test_fraction == 0.0


def test_exponent_without_dot_is_a_float():
    assert load_config(overrides=["training.learning_rate=3e-4"]).training.learning_rate == 3e-4


@pytest.mark.parametrize("override, words", [
    ("data.max_rowz=3", ["unknown config field 'data.max_rowz'"]),
    ("data.max_rows=abc", ["data.max_rows", "expected int"]),
    ("data.test_fraction=0.9", ["data.test_fraction", "above the maximum 0.5"]),
    ("data.max_rows=-1", ["data.max_rows", "below the minimum 0"]),
    ("pipeline.retries=true", ["pipeline.retries", "expected int"]),
    ("nosection", ["section.field=value"]),
])
def test_bad_values_name_the_field(override, words):
    with pytest.raises(ConfigError) as exc:
        load_config(overrides=[override])
    for w in words:
        assert w in str(exc.value)


def test_bad_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_section_hash_changes_with_values():
    a, b = Config(), Config()
    assert a.section_hash("data") == b.section_hash("data")
    b.data.seed = 7
    assert a.section_hash("data") != b.section_hash("data")
    assert a.section_hash("storage") == b.section_hash("storage")


# Behaviour that used to be ECB_* environment switches: typed fields with help text and bounds.
FORMER_ENV_SWITCHES = {"storage.db_pool_size": 2, "chat.db_pool_size": 8, "storage.db_retry_s": 120.0,
                       "storage.s3_max_attempts": 12, "storage.s3_retry_s": 120.0,
                       "pipeline.mlflow_experiment": "ecommerce-chatbot", "pipeline.log_level": "INFO",
                       "pipeline.log_timestamps": True, "chat.port": 8000, "execution.gpu_pool_slots": 1}


def test_former_env_switches_are_config_fields():
    defaults = Config()
    fields = {name: f for name, f, _ in iter_fields()}
    for name, default in FORMER_ENV_SWITCHES.items():
        section, attr = name.split(".")
        assert getattr(getattr(defaults, section), attr) == default, name
        assert fields[name].metadata["help"], name


@pytest.mark.parametrize("override, words", [
    ("storage.s3_max_attempts=0", ["storage.s3_max_attempts", "below the minimum 1"]),
    ("storage.db_retry_s=-1", ["storage.db_retry_s", "below the minimum 0"]),
    ("pipeline.log_level=LOUD", ["pipeline.log_level", "not one of"]),
    ("pipeline.log_timestamps=0", ["pipeline.log_timestamps", "expected bool"]),
])
def test_former_env_switches_are_checked(override, words):
    with pytest.raises(ConfigError) as exc:
        load_config(overrides=[override])
    for w in words:
        assert w in str(exc.value)


def test_later_config_files_override_earlier_ones(tmp_path, monkeypatch):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("data:\n  max_rows: 50\n  seed: 3\n")
    b.write_text("data:\n  max_rows: 60\n")
    monkeypatch.setenv("ECB_CONFIG", f"{a}:{b}")
    cfg = load_config()
    assert (cfg.data.max_rows, cfg.data.seed) == (60, 3)
    assert load_config(f"{b}:{a}").data.max_rows == 50
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        load_config(f"{a}:{tmp_path / 'missing.yaml'}")


def test_yaml_files_list_only_real_overrides():
    import yaml

    from tasks.config import flatten
    from tests.conftest import REPO

    defaults = Config()
    for path in [*(REPO / "include" / "config").glob("*.yaml"), REPO / "tests" / "ecb_test_config.yaml"]:
        for name, value in flatten(yaml.safe_load(path.read_text()) or {}, depth=1).items():
            section, attr = name.split(".")
            assert getattr(getattr(defaults, section), attr) != value, f"{path.name}: {name} repeats the default"


def test_dev_stack_hands_the_chat_port_through_config():
    from tests.conftest import SETTINGS

    assert load_config().chat.port == SETTINGS["chat_port"] != 8000


def test_ecb_config_lists_every_field_and_the_environment(capsys):
    from tasks import env
    from tasks.devstack import cli

    assert cli.main(["config"]) == 0
    out = capsys.readouterr().out
    for name, _, _ in iter_fields():
        assert f"\n{name} = " in f"\n{out}", name
    assert cli.main(["config", "--env"]) == 0
    out = capsys.readouterr().out
    for name, var in env.VARS.items():
        assert f"{name} [{var.kind}]" in out
    assert env.get("AWS_SECRET_ACCESS_KEY") and env.get("AWS_SECRET_ACCESS_KEY") not in out  # secrets: set/unset only


def test_flatten_descends_as_deep_as_asked():
    from tasks.config import flatten

    tree = {"eval": {"weights": {"bleu1": 0.1}, "batch_size": 8}, "top": 1}
    assert flatten(tree, depth=1) == {"eval.weights": {"bleu1": 0.1}, "eval.batch_size": 8, "top": 1}
    assert flatten(tree) == {"eval.weights.bleu1": 0.1, "eval.batch_size": 8, "top": 1}
    assert flatten(tree, depth=0) == tree


def test_the_test_session_reads_the_test_config():
    """Every pytest process (each `make test` worker too) runs the steps with tests/ecb_test_config.yaml, then the
    stack's own file: a worker that inherited ECB_STACK_MANAGED=1 from the controller read the demo config."""
    import json
    import os

    from tasks.config import load_config
    from tests.conftest import REPO

    first, *rest = os.environ["ECB_CONFIG"].split(os.pathsep)
    assert first == str(REPO / "tests" / "ecb_test_config.yaml") and rest and rest[-1].endswith("stack-config.yaml")
    assert load_config().chat.max_new_tokens == 16 and load_config().hpo.trial_max_steps == 6
    # ... and its own stack: the state folder and S3 endpoint of this process, not the controller's
    from tasks.devstack import stack
    from tests.conftest import BEFORE, SETTINGS

    worker = os.environ.get("PYTEST_XDIST_WORKER")
    assert os.environ["ECB_STATE_DIR"].endswith(f"-{worker}") if worker else "-gw" not in os.environ["ECB_STATE_DIR"]
    shell = json.loads(os.environ[BEFORE])  # what the person's shell had before the test session set anything
    assert SETTINGS.get("external_s3") == (shell.get("ECB_S3_ENDPOINT_URL") or None)  # ours unless they chose one
    assert os.environ["ECB_S3_ENDPOINT_URL"] == (stack.s3_endpoint(SETTINGS) or "")
