"""s3:// base models against real S3 (SeaweedFS): upload, verified sync, reuse, repair; the demo base model step."""

import hashlib
import json
import os

import pytest

from tasks.config import ModelConfig, load_config
from tasks.context import StepContext
from tasks.errors import StepError
from tasks.io import s3
from tasks.ml import model_source

pytestmark = pytest.mark.integration

BUCKET = "ecb-platform"


def fake_model(folder, big: int = 0) -> dict[str, bytes]:
    files = {
        "config.json": json.dumps({"model_type": "llama", "hidden_size": 8}).encode(),
        "model.safetensors": os.urandom(200_000),
        "tokenizer.json": b'{"version": "1.0"}',
        "nested/extra.txt": "ünïcödé\n".encode(),
    }
    if big:
        files["big.bin"] = os.urandom(big)
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return files


def tree(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and p.name not in (model_source.MARKER, model_source.LOCK)}


def mtimes(folder) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def model_uri(services, uid, tmp_path):
    s3.ensure_bucket(BUCKET)
    src = tmp_path / "src"
    files = fake_model(src)
    uri = f"s3://{BUCKET}/test-models/{uid}/m/"
    uploaded = model_source.upload_model_dir(src, uri)
    return uri, files, uploaded


def test_upload_then_resolve_gives_identical_files(model_uri, tmp_path):
    uri, files, uploaded = model_uri
    assert sorted(u["key"].rsplit("/m/", 1)[1] for u in uploaded) == sorted(files)
    for u in uploaded:
        data = files[u["key"].rsplit("/m/", 1)[1]]
        assert u["size"] == len(data) and u["md5"] == hashlib.md5(data).hexdigest()  # noqa: S324
    sums = s3.get_json(uri + model_source.SHA256SUMS)
    assert sums == {rel: hashlib.sha256(d).hexdigest() for rel, d in files.items()}

    cfg = ModelConfig(base_model=uri.rstrip("/"), cache_dir=str(tmp_path / "cache"))  # no trailing slash: same
    local = model_source.resolve_base_model(cfg)
    assert local.startswith(str(tmp_path / "cache"))
    got = tree(model_source.Path(local))
    assert got.pop(model_source.SHA256SUMS) and got == files
    marker = json.loads((model_source.Path(local) / model_source.MARKER).read_text())
    assert {o["rel"] for o in marker["objects"]} == set(files) | {model_source.SHA256SUMS}


def test_second_resolve_downloads_nothing(model_uri, tmp_path):
    uri, _, _ = model_uri
    cfg = ModelConfig(base_model=uri, cache_dir=str(tmp_path / "cache"))
    folder, first = model_source.sync_s3_model(uri, cfg)
    assert first["downloaded"] == 5
    before, marker = mtimes(folder), (folder / model_source.MARKER).read_bytes()
    folder2, second = model_source.sync_s3_model(uri, cfg)
    assert folder2 == folder and second == {"downloaded": 0, "reused": 5, "bytes": 0}
    assert model_source.resolve_base_model(cfg) == str(folder)
    assert mtimes(folder) == before and (folder / model_source.MARKER).read_bytes() == marker


def test_corrupted_cache_file_is_downloaded_again(model_uri, tmp_path):
    uri, files, _ = model_uri
    cfg = ModelConfig(base_model=uri, cache_dir=str(tmp_path / "cache"))
    folder, _ = model_source.sync_s3_model(uri, cfg)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[1234] ^= 0xFF  # same size, one byte different
    weights.write_bytes(bytes(data))
    (folder / "tokenizer.json").unlink()  # and one file gone
    _, stats = model_source.sync_s3_model(uri, cfg)
    assert stats["downloaded"] == 2
    assert weights.read_bytes() == files["model.safetensors"]
    assert (folder / "tokenizer.json").read_bytes() == files["tokenizer.json"]


def test_changed_or_removed_remote_objects_are_followed(model_uri, tmp_path):
    uri, files, _ = model_uri
    cfg = ModelConfig(base_model=uri, cache_dir=str(tmp_path / "cache"))
    folder, _ = model_source.sync_s3_model(uri, cfg)
    s3.put_bytes(uri + "tokenizer.json", b'{"version": "2.0"}')
    bucket, prefix = s3.split_uri(uri)
    s3.client().delete_object(Bucket=bucket, Key=prefix + "nested/extra.txt")
    _, stats = model_source.sync_s3_model(uri, cfg)
    assert stats["downloaded"] == 1
    assert (folder / "tokenizer.json").read_bytes() == b'{"version": "2.0"}'
    assert not (folder / "nested").exists()
    assert (folder / "model.safetensors").read_bytes() == files["model.safetensors"]


def test_multipart_objects_are_verified_with_sha256sums(services, uid, tmp_path):
    s3.ensure_bucket(BUCKET)
    src = tmp_path / "src"
    files = fake_model(src, big=6 * 1024 * 1024)
    uri = f"s3://{BUCKET}/test-models/{uid}/mp/"
    model_source.upload_model_dir(src, uri, single_part_limit=5 * 1024 * 1024)
    etags = {o["key"].rsplit("/", 1)[-1]: o["etag"] for o in s3.list_objects(uri)}
    cfg = ModelConfig(base_model=uri, cache_dir=str(tmp_path / "cache"))
    folder, _ = model_source.sync_s3_model(uri, cfg)
    assert (folder / "big.bin").read_bytes() == files["big.bin"]
    marker = {o["rel"]: o for o in json.loads((folder / model_source.MARKER).read_text())["objects"]}
    if "-" not in etags["big.bin"]:
        pytest.skip(f"this S3 server gives multipart uploads a plain ETag ({etags['big.bin']})")
    assert marker["big.bin"]["verified_by"] == "sha256" and marker["config.json"]["verified_by"] == "md5"
    # a wrong checksum in sha256sums.json must stop the sync instead of accepting the file
    sums = s3.get_json(uri + model_source.SHA256SUMS)
    sums["big.bin"] = "0" * 64
    s3.put_json(uri + model_source.SHA256SUMS, sums)
    (folder / "big.bin").unlink()
    with pytest.raises(StepError, match="big.bin failed verification"):
        model_source.sync_s3_model(uri, cfg)
    assert not (folder / model_source.MARKER).exists()


def test_empty_prefix_names_the_field(services, uid, tmp_path):
    s3.ensure_bucket(BUCKET)
    cfg = ModelConfig(base_model=f"s3://{BUCKET}/test-models/{uid}/nothing/", cache_dir=str(tmp_path))
    with pytest.raises(StepError, match=r"model\.base_model=s3://.*no objects and no config\.json"):
        model_source.resolve_base_model(cfg)


def test_demo_model_step_builds_once_and_loads_like_a_hub_model(services, uid, tmp_path):
    """tiny size: build, upload, reuse on the second run, then resolve and load it with the Auto classes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.demo import datagen
    from tasks.demo import model as demo_model
    from tasks.steps import build_demo_model

    s3.ensure_bucket(BUCKET)
    rows = datagen.generate_rows(120, seed=1)
    system = "You are a support agent."
    train = "".join(json.dumps({"messages": [{"role": "system", "content": system},
                                             {"role": "user", "content": r["instruction"]},
                                             {"role": "assistant", "content": r["response"]}]}) + "\n"
                    for r in rows).encode()
    snapshot = f"s3://{BUCKET}/test-snapshots/{uid}/"
    s3.put_bytes(snapshot + "train.jsonl", train)
    dest = f"s3://{BUCKET}/test-models/{uid}/demo/"
    ctx = StepContext("build_demo_model", f"run-{uid}", load_config(), inputs={
        "snapshot_uri": snapshot, "dest": dest, "size": "tiny", "steps": "5"})
    first = build_demo_model.run(ctx)
    assert first["base_model_uri"] == dest and not first["reused"] and first["pretrain_steps"] == 5
    assert first["vocab_size"] > 259 and first["params"] > 0
    stored = s3.get_json(dest + demo_model.FINGERPRINT_FILE)
    assert stored["fingerprint"] == first["fingerprint"]

    again = build_demo_model.run(ctx)
    assert again == {**first, "reused": True}

    local = model_source.resolve_base_model(ModelConfig(base_model=dest, cache_dir=str(tmp_path / "cache")))
    tok = AutoTokenizer.from_pretrained(local)
    model_source.check_chat_template(tok, local)
    model = AutoModelForCausalLM.from_pretrained(local)
    assert model.config.vocab_size == len(tok) == first["vocab_size"]
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    assert model.generate(**prompt, max_new_tokens=3, do_sample=False).shape[1] > prompt["input_ids"].shape[1]

    # other settings -> another fingerprint -> rebuilt in place
    ctx.inputs["steps"] = "6"
    third = build_demo_model.run(ctx)
    assert third["fingerprint"] != first["fingerprint"] and not third["reused"] and third["pretrain_steps"] == 6
    missing = StepContext("build_demo_model", "r", load_config(), inputs={"snapshot_uri": snapshot + "nope/",
                                                                          "dest": dest})
    with pytest.raises(StepError, match="cannot read .*train.jsonl"):
        build_demo_model.run(missing)
