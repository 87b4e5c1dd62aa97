"""resolve_base_model without services: local folders, the Hugging Face cache, clear errors; chat-template check."""

import types

import pytest

from tasks.config import ModelConfig
from tasks.errors import StepError
from tasks.ml import model_source


def cfg(name: str, **kw) -> ModelConfig:
    return ModelConfig(base_model=name, **kw)


def test_local_directory_is_returned_as_is(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert model_source.resolve_base_model(cfg(str(tmp_path))) == str(tmp_path)


def test_home_relative_directory_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "mymodel").mkdir()
    assert model_source.resolve_base_model(cfg("~/mymodel")) == str(tmp_path / "mymodel")


def test_unknown_hub_id_offline_names_the_field(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(StepError) as err:
        model_source.resolve_base_model(cfg("ecb-test-org/no-such-model-3f9a"))
    msg = str(err.value)
    assert "model.base_model" in msg and "ecb-test-org/no-such-model-3f9a" in msg
    assert "local Hugging Face cache" in msg and "HF_HUB_OFFLINE" in msg


def test_missing_local_path_is_not_looked_up_on_the_hub(monkeypatch, tmp_path):
    import huggingface_hub

    def boom(*a, **k):
        raise AssertionError("a path must not reach snapshot_download")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", boom)
    with pytest.raises(StepError, match=r"model\.base_model=.*does not exist"):
        model_source.resolve_base_model(cfg(str(tmp_path / "nope" / "model")))


def test_file_and_empty_value_are_errors(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(StepError, match="is a file, not a model folder"):
        model_source.resolve_base_model(cfg(str(f)))
    with pytest.raises(StepError, match="model.base_model is empty"):
        model_source.resolve_base_model(cfg("  "))


def test_hub_id_resolves_from_the_local_hf_cache(monkeypatch, tmp_path):
    """A snapshot already in the HF cache is used without any network access."""
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--ecb-test--cached-model"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    got = model_source.resolve_base_model(cfg("ecb-test/cached-model", revision="main"))
    assert got == str(snap)


def test_cache_dir_choice(monkeypatch, tmp_path):
    monkeypatch.setenv("ECB_MODEL_CACHE", str(tmp_path / "env"))
    a = model_source.cache_dir_for("s3://b/models/x")
    assert a == model_source.cache_dir_for("s3://b/models/x/")  # the trailing slash does not matter
    assert a.parent == tmp_path / "env"
    assert model_source.cache_dir_for("s3://b/models/y/") != a
    explicit = model_source.cache_dir_for("s3://b/models/x/", cfg("s3://b/models/x/", cache_dir=str(tmp_path / "c")))
    assert explicit.parent == tmp_path / "c" and explicit.name == a.name
    monkeypatch.delenv("ECB_MODEL_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert model_source.cache_root() == tmp_path / "home" / ".cache" / "ecb" / "models"


def test_unsafe_object_keys_are_refused():
    assert model_source._rel_path("m/sub/a.json", "m/") == "sub/a.json"
    assert model_source._rel_path("m/sub/", "m/") is None
    for key in ("m/../etc/passwd", "m//abs", "m/a/./b"):
        with pytest.raises(StepError, match="not a safe relative path"):
            model_source._rel_path(key, "m/")


def test_missing_chat_template_is_an_actionable_error():
    with pytest.raises(StepError) as err:
        model_source.check_chat_template(types.SimpleNamespace(chat_template=None), "s3://b/models/plain/")
    assert "has no chat template" in str(err.value) and "model.base_model" in str(err.value)
    assert "s3://b/models/plain/" in str(err.value)
    model_source.check_chat_template(types.SimpleNamespace(chat_template="{{ x }}"), "here")  # no error
