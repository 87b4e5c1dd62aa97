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
