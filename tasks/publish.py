"""Publish a released adapter to the Hugging Face Hub: adapter files + a generated model card, one commit, one tag.

    python -m tasks publish --run-id R --input adapter_uri=s3://.../finetune/adapter --input registry_version=3 \
        --input release_meta='{"snapshot_id": "...", "metrics": {...}, ...}' [--input repo_id=owner/name]

Repo id: ``--input repo_id`` or ``$ECB_HF_REPO_ID`` (default ``ecb/ecommerce-support-chatbot``). Token: ``$HF_TOKEN``
(the Airflow side puts the ``huggingface_default`` connection's password there); without one the step logs that
the push is skipped and succeeds. Endpoint: ``$HF_ENDPOINT`` when set (a private Hub mirror, or a test server).

The push is idempotent: a release is the tag ``v<registry_version>``. When the tag exists nothing is sent; otherwise
every file goes up in one commit (message ``Release v<version> (snapshot <id>)``) and the tag is put on it. A retry
after a commit whose tag failed sends the same bytes again, the Hub finds nothing changed, and the tag lands on the
existing commit. The card is deterministic (no timestamps), and no file is sent that contains a token or key from
the environment.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import yaml

from tasks.runner import StepError

log = logging.getLogger("tasks.publish")

DEFAULT_REPO_ID = "ecb/ecommerce-support-chatbot"
DEFAULT_LICENSE = "apache-2.0"
DEFAULT_TAGS = ["lora", "peft", "customer-support", "e-commerce", "chatbot", "ecb-platform"]
REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors")
# Environment values that must never leave in a published file (besides the Hub token passed in).
SECRET_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                   "ECB_CHAT_ADMIN_TOKEN", "AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__API_AUTH__JWT_SECRET")
MIN_SECRET_LEN = 6  # shorter values would match ordinary text; real tokens and keys are far longer
SKIP_REASON = "no Hugging Face token configured (HF_TOKEN / connection huggingface_default): skipping the push"

# (metric key, model-index type, display name), in the order of the card's model-index and evaluation table
CARD_METRICS = (
    ("bleu4", "bleu", "BLEU-4"),
    ("bleu1", "bleu", "BLEU-1"),
    ("bleu2", "bleu", "BLEU-2"),
    ("bleu3", "bleu", "BLEU-3"),
    ("rougeL_precision", "rouge", "ROUGE-L precision"),
    ("weighted_score", "custom", "Weighted score"),
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# --- model card -----------------------------------------------------------------------------------------------


def flat_metrics(metrics: Mapping | None) -> dict[str, float]:
    """Metric name -> float; accepts flat dicts and evaluate's manifest shape ({"scores": {...}, "weighted_score"})."""
    if not metrics:
        return {}
    merged = {**(metrics.get("scores") or {}), **{k: v for k, v in metrics.items() if k != "scores"}}
    out = {}
    for key, value in merged.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            continue
        out[key] = float(value)
    return out


def _flatten(tree: Mapping, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _cell(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text.replace("|", "\\|").replace("\n", " ")


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def is_hub_model_id(name: str) -> bool:
    """'owner/name' (a Hub id), as opposed to a local folder or an s3:// prefix."""
    return bool(name) and "://" not in name and not name.startswith((".", "/", "~")) and bool(_HUB_ID.match(name))


def model_card(meta: dict) -> str:
    """The README.md of a release: YAML front matter (Hub metadata + model-index) and the markdown body.

    Meta keys: repo_id, base_model, registry_version, snapshot_id, rows (split -> count), hyperparameters (dict,
    may be nested), metrics (candidate), champion_metrics (dict or None), gate_summary, datasets (list), license;
    optional: dataset ({name, type}), system_prompt, private. Deterministic: the same meta gives the same bytes.
    """
    repo_id = meta.get("repo_id") or DEFAULT_REPO_ID
    version = meta.get("registry_version", "?")
    base_model = str(meta.get("base_model") or "")
    snapshot_id = meta.get("snapshot_id") or "unknown"
    datasets = list(meta.get("datasets") or [])
    candidate = flat_metrics(meta.get("metrics"))
    champion = flat_metrics(meta.get("champion_metrics")) if meta.get("champion_metrics") else None
    dataset = dict(meta.get("dataset") or {"name": f"ECB support conversations (snapshot {snapshot_id})",
                                          "type": datasets[0] if datasets else "ecb-support-conversations"})
    dataset.setdefault("split", "test")

    front: dict = {}
    if is_hub_model_id(base_model):
        front["base_model"] = base_model
    front.update({
        "library_name": "peft",
        "pipeline_tag": "text-generation",
        "license": meta.get("license") or DEFAULT_LICENSE,
        "language": ["en"],
        "tags": list(meta.get("tags") or DEFAULT_TAGS),
        "datasets": datasets,
        "model-index": [{
            "name": repo_id.rsplit("/", 1)[-1],
            "results": [{
                "task": {"type": "text-generation", "name": "Text Generation"},
                "dataset": dataset,
                "metrics": [{"type": mtype, "name": name, "value": candidate[key]}
                            for key, mtype, name in CARD_METRICS if key in candidate],
            }],
        }],
    })
    header = yaml.safe_dump(front, sort_keys=False, allow_unicode=True, default_flow_style=False)

    rows = {str(k): v for k, v in (meta.get("rows") or {}).items()}
    row_lines = [f"| {_cell(split)} | {_cell(n)} |" for split, n in rows.items()]
    if rows and all(isinstance(n, int) for n in rows.values()):
        row_lines.append(f"| **total** | {sum(rows.values())} |")
    hp = _flatten(meta.get("hyperparameters") or {})
    hp_lines = [f"| `{_cell(k)}` | {_cell(v)} |" for k, v in hp.items()]

    eval_lines = []
    for key, _, name in CARD_METRICS:
        if key not in candidate:
            continue
        champ = champion.get(key) if champion else None
        delta = "—" if champ is None else f"{candidate[key] - champ:+.4f}"
        eval_lines.append(f"| {name} | {_num(candidate[key])} | {_num(champ)} | {delta} |")
    gate = (meta.get("gate_summary") or "No gate decision was recorded for this release.").strip()
    base_text = f"[`{base_model}`](https://huggingface.co/{base_model})" if is_hub_model_id(base_model) \
        else "the platform's base chat model" + (f" (`{base_model}`)" if base_model else "")
    snippet_base = base_model if is_hub_model_id(base_model) else "<base model id or path>"
    system_prompt = meta.get("system_prompt") or ("You are a helpful, polite customer-support assistant for an "
                                                  "online store.")

    body = [
        f"# {repo_id.rsplit('/', 1)[-1]} — release v{version}",
        "",
        f"A LoRA adapter for {base_text} that answers e-commerce customer-support questions (orders, "
        "cancellations, refunds, delivery, payments, accounts). It was fine-tuned, evaluated and released by the ECB "
        f"platform: registry version **{version}**, trained on data snapshot `{snapshot_id}`. Git tag of this "
        f"release: `v{version}`.",
        "",
        "## Training data",
        "",
        f"Snapshot `{snapshot_id}`: support conversations (customer message, agent answer, intent and category "
        "labels) converted to ChatML (system prompt, user, assistant) and split per intent so that the same "
        "customer message never lands in two splits."
        + (f" Datasets: {', '.join(f'`{d}`' for d in datasets)}." if datasets else ""),
        "",
        *(["| split | conversations |", "|---|---:|", *row_lines] if row_lines else ["Row counts were not recorded."]),
        "",
        "## Training procedure",
        "",
        "LoRA (PEFT) fine-tune of the base chat model on the training split, loss on the assistant tokens, AdamW "
        "with linear warm-up and decay. Hyper-parameters (after the Optuna search, when one ran):",
        "",
        *(["| hyper-parameter | value |", "|---|---|", *hp_lines] if hp_lines
          else ["Hyper-parameters were not recorded."]),
        "",
        "## Evaluation",
        "",
        "Greedy decoding on the snapshot's test split, scored against the reference answers: corpus BLEU-1..4 "
        "(sacrebleu, 0..1), mean ROUGE-L precision, and the platform's weighted score of those metrics. The "
        "champion is the model in production before this release.",
        "",
        *(["| metric | candidate (this release) | champion | delta |", "|---|---:|---:|---:|", *eval_lines]
          if eval_lines else ["No evaluation metrics were recorded."]),
        "",
        *([] if champion else ["There was no champion to compare with (first release).", ""]),
        f"**Gate decision:** {gate}",
        "",
        "## Intended use",
        "",
        "Drafting answers to customer-support messages of an online store, in English, with a human agent or "
        "business rules in the loop. The adapter learned the tone and structure of support answers; it does not know "
        "any real order, account, price or policy.",
        "",
        "## Limitations",
        "",
        "- Answers may state order numbers, deadlines, fees or policies that sound plausible but are made up: check "
        "them against the shop's systems before sending.",
        "- Trained on English, mostly templated support conversations; other languages, rare intents and long, "
        "multi-issue messages are handled worse.",
        "- BLEU and ROUGE measure overlap with reference answers, not correctness or helpfulness.",
        "- Not meant for legal, medical or financial advice, nor for decisions about customers without review.",
        "",
        "## How to use",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{snippet_base}")',
        f'model = PeftModel.from_pretrained(base, "{repo_id}", revision="v{version}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}", revision="v{version}")',
        "",
        "messages = [",
        f"    {{\"role\": \"system\", \"content\": {json.dumps(system_prompt)}}},",
        '    {"role": "user", "content": "I want to cancel my order, how do I do that?"},',
        "]",
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
        "return_dict=True)",
        "output = model.generate(**inputs, max_new_tokens=160, do_sample=False)",
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
        "",
    ]
    return f"---\n{header}---\n\n" + "\n".join(body)


def assert_no_secrets(text: str, secrets: Iterable[str | None], where: str = "text") -> None:
    """Raise ValueError when ``text`` contains any of ``secrets`` (values shorter than MIN_SECRET_LEN are ignored).

    The message names ``where`` but never the secret.
    """
    for secret in secrets:
        if secret and len(secret) >= MIN_SECRET_LEN and secret in text:
            raise ValueError(f"{where} contains a secret value (a token or key); refusing to publish it")


def env_secrets() -> list[str]:
    return [v for name in SECRET_ENV_VARS if (v := os.environ.get(name, "").strip())]


# --- push -----------------------------------------------------------------------------------------------------


def _read_files(adapter_dir: Path) -> dict[str, bytes]:
    files = {p.relative_to(adapter_dir).as_posix(): p.read_bytes()
             for p in sorted(adapter_dir.rglob("*")) if p.is_file()}
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        raise StepError(f"adapter folder {adapter_dir} lacks {', '.join(missing)} (have: {sorted(files)}); "
                        "is it a finetune output?")
    if "README.md" in files:
        log.debug("replacing the adapter folder's README.md with the release's model card")
    return files


def _status(exc) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def push_release(adapter_dir: Path, repo_id: str, version: str, meta: dict, token: str,
                 endpoint: str | None = None) -> dict:
    """Push ``adapter_dir`` + the model card to ``repo_id`` as one commit tagged ``v{version}``; idempotent.

    Returns {"status": "pushed" | "exists", "repo_id", "revision" (commit oid), "tag", "files" (sorted)}.
    Raises StepError for Hub failures (a rejected token says so) and ValueError when a file holds a secret.
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    adapter_dir = Path(adapter_dir)
    tag = f"v{version}"
    meta = {**meta, "repo_id": repo_id, "registry_version": version}
    files = _read_files(adapter_dir)
    files["README.md"] = model_card(meta).encode()
    secrets = [token, *env_secrets()]
    for name, data in sorted(files.items()):
        assert_no_secrets(data.decode("utf-8", errors="replace"), secrets, where=f"file {name} of release {tag}")

    api = HfApi(endpoint=endpoint, token=token)
    where = f"{repo_id} on {api.endpoint}"
    try:
        api.create_repo(repo_id, exist_ok=True, private=meta.get("private"))
        existing = _tag_target(api, repo_id, tag)
        if existing:
            log.info("release %s already on %s (commit %s): nothing to push", tag, where, existing)
            return {"status": "exists", "repo_id": repo_id, "revision": existing, "tag": tag,
                    "files": sorted(api.list_repo_files(repo_id, revision=existing))}
        log.info("pushing release %s to %s: %d files in one commit", tag, where, len(files))
        snapshot_id = meta.get("snapshot_id") or "unknown"
        info = api.create_commit(
            repo_id, [CommitOperationAdd(path_in_repo=n, path_or_fileobj=d) for n, d in sorted(files.items())],
            commit_message=f"Release v{version} (snapshot {snapshot_id})",
            commit_description=f"Registry version {version} of the ECB support chatbot adapter.")
        try:
            api.create_tag(repo_id, tag=tag, revision=info.oid, tag_message=f"Release v{version}")
        except HfHubHTTPError as exc:
            if _status(exc) != 409:
                raise
            # another run tagged the release between our check and our tag: report what the tag points at
            existing = _tag_target(api, repo_id, tag)
            log.warning("release %s was tagged concurrently on %s (commit %s)", tag, where, existing)
            return {"status": "exists", "repo_id": repo_id, "revision": existing, "tag": tag,
                    "files": sorted(api.list_repo_files(repo_id, revision=existing))}
    except OfflineModeIsEnabled as exc:
        raise StepError(f"cannot push release {tag} to {where}: HF_HUB_OFFLINE is set in this environment; unset it "
                        "for the publish step") from exc
    except HfHubHTTPError as exc:
        status = _status(exc)
        if status in (401, 403):
            raise StepError(f"the Hugging Face Hub rejected the token (HTTP {status}) for {where}: check HF_TOKEN / "
                            "the huggingface_default connection (it needs write access to the repo)") from exc
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StepError(f"Hugging Face Hub request failed while pushing release {tag} to {where} "
                        f"(HTTP {status}): {first_line}") from exc
    log.info("pushed release %s to %s: commit %s, files %s", tag, where, info.oid, ", ".join(sorted(files)))
    return {"status": "pushed", "repo_id": repo_id, "revision": info.oid, "tag": tag, "files": sorted(files)}


def _tag_target(api, repo_id: str, tag: str) -> str | None:
    return next((t.target_commit for t in api.list_repo_refs(repo_id).tags if t.name == tag), None)


# --- step -----------------------------------------------------------------------------------------------------


def download_adapter(adapter_uri: str, dest: Path) -> list[str]:
    """Copy every object under the adapter prefix into ``dest`` (keeping sub-folders); returns the names."""
    from tasks import s3

    names = s3.download_prefix(adapter_uri, dest)
    if not names:
        raise StepError(f"no adapter files under {adapter_uri} (is --input adapter_uri the finetune manifest's "
                        "adapter_uri?)")
    return names


def default_hyperparameters(cfg) -> dict:
    if cfg is None:
        return {}
    return {"model.max_seq_len": cfg.model.max_seq_len, "lora.r": cfg.lora.r, "lora.alpha": cfg.lora.alpha,
            "lora.dropout": cfg.lora.dropout, "lora.target_modules": list(cfg.lora.target_modules),
            "lora.quantization": cfg.lora.quantization, "training.learning_rate": cfg.training.learning_rate,
            "training.weight_decay": cfg.training.weight_decay, "training.warmup_ratio": cfg.training.warmup_ratio,
            "training.epochs": cfg.training.epochs, "training.max_steps": cfg.training.max_steps,
            "training.batch_size": cfg.training.batch_size, "training.seed": cfg.training.seed}


def _input(ctx, key: str) -> str:
    value = (getattr(ctx, "inputs", None) or {}).get(key)
    if value in (None, ""):
        raise StepError(f"step {getattr(ctx, 'step', 'publish')} needs --input {key}=... "
                        f"(got inputs: {sorted(getattr(ctx, 'inputs', None) or {})})")
    return str(value)


def run(ctx) -> dict:
    adapter_uri = _input(ctx, "adapter_uri")
    version = _input(ctx, "registry_version")
    try:
        meta = json.loads(ctx.inputs.get("release_meta") or "{}")
    except json.JSONDecodeError as exc:
        raise StepError(f"--input release_meta is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise StepError(f"--input release_meta must be a JSON object, got {type(meta).__name__}")
    repo_id = ctx.inputs.get("repo_id") or os.environ.get("ECB_HF_REPO_ID") or DEFAULT_REPO_ID
    token = os.environ.get("HF_TOKEN", "").strip()
    if not token:
        log.info(SKIP_REASON)
        return {"status": "skipped", "reason": SKIP_REASON, "repo_id": repo_id, "registry_version": version}

    cfg = getattr(ctx, "config", None)
    if cfg is not None:
        meta.setdefault("base_model", cfg.model.base_model)
        meta.setdefault("system_prompt", cfg.data.system_prompt)
    meta.setdefault("hyperparameters", default_hyperparameters(cfg))
    meta.setdefault("snapshot_id", "unknown")
    endpoint = os.environ.get("HF_ENDPOINT") or None
    with tempfile.TemporaryDirectory(prefix="ecb-publish-") as tmp:
        names = download_adapter(adapter_uri, Path(tmp))
        log.info("downloaded %d adapter files from %s", len(names), adapter_uri)
        try:
            result = push_release(Path(tmp), repo_id, version, meta, token, endpoint)
        except ValueError as exc:
            raise StepError(str(exc)) from exc
    return {**result, "registry_version": version, "adapter_uri": adapter_uri}
