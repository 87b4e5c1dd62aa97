"""The model card (README.md) of a release on the Hugging Face Hub: Hub metadata and model-index in the YAML front
matter, then training data, procedure, evaluation against the champion and the gate's decision. Deterministic: the
same release metadata always gives the same bytes, so a retried push commits nothing new. The markdown lives in
templates/model_card.md (string.Template, ``$name`` placeholders); this module computes the pieces that fill it."""

from __future__ import annotations

import json
import math
import re
import string
from collections.abc import Mapping
from importlib import resources

import yaml

from tasks.config import flatten

DEFAULT_LICENSE = "apache-2.0"
DEFAULT_TAGS = ["lora", "peft", "customer-support", "e-commerce", "chatbot", "ecb-platform"]
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
# The card's markdown (front matter delimiters included), with $name placeholders that model_card() fills in.
MODEL_CARD_TEMPLATE = string.Template(
    (resources.files("tasks.release") / "templates" / "model_card.md").read_text(encoding="utf-8"))


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


def _cell(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text.replace("|", "\\|").replace("\n", " ")


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _table(header: list[str], lines: list[str], empty: str) -> str:
    """A markdown table, or the sentence ``empty`` when there are no rows."""
    return "\n".join([*header, *lines]) if lines else empty


def is_hub_model_id(name: str) -> bool:
    """'owner/name' (a Hub id), as opposed to a local folder or an s3:// prefix."""
    return bool(name) and "://" not in name and not name.startswith((".", "/", "~")) and bool(_HUB_ID.match(name))


def _base_source_note(meta: dict) -> str:
    """A paragraph naming where the base weights came from and their licence, when the release meta knows."""
    source, license_ = meta.get("base_model_source"), meta.get("base_model_license")
    if not source and not license_:
        return ""
    origin = f"imported from `{source}`" if source else "not recorded"
    return f"\n\nBase model weights: {origin}; licence: {license_ or 'unknown'}."


def model_card(meta: dict) -> str:
    """The README.md of a release: YAML front matter (Hub metadata + model-index) and the markdown body.

    Meta keys: repo_id, base_model, registry_version, snapshot_id, rows (split -> count), hyperparameters (dict,
    may be nested), metrics (candidate), champion_metrics (dict or None), gate_summary, datasets (list), license;
    run_id (the DAG run) and gate_decision_id (the gate_decisions row), as the chat service's /api/model shows them;
    optional: tag (default ``v<registry_version>``), dataset ({name, type}), system_prompt, private,
    base_model_source and base_model_license (where the base weights came from, e.g. an imported GGUF file).
    Deterministic: the same meta gives the same bytes.
    """
    repo_id = meta["repo_id"]
    model_name = repo_id.rsplit("/", 1)[-1]
    version = meta.get("registry_version", "?")
    tag = meta.get("tag") or f"v{version}"
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
            "name": model_name,
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
    hp = flatten(meta.get("hyperparameters") or {})
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
    gate_id = meta.get("gate_decision_id")
    lineage = [("DAG run id (Airflow)", meta.get("run_id")), ("gate decision id", gate_id),
               ("model registry version", version), ("data snapshot", snapshot_id), ("Hub tag", tag)]
    lineage_lines = [f"| {name} | `{_cell(value)}` |" if value not in (None, "") else f"| {name} | not recorded |"
                     for name, value in lineage]
    system_prompt = meta.get("system_prompt") or ("You are a helpful, polite customer-support assistant for an "
                                                  "online store.")

    # string.Template substitutes once: a "$" or "{...}" inside a value stays literal.
    return MODEL_CARD_TEMPLATE.substitute(
        front_matter=header,
        title=model_name,
        version=version,
        tag=tag,
        repo_id=repo_id,
        base_text=base_text,
        snapshot_id=snapshot_id,
        base_source_note=_base_source_note(meta),
        datasets_note=f" Datasets: {', '.join(f'`{d}`' for d in datasets)}." if datasets else "",
        rows_table=_table(["| split | conversations |", "|---|---:|"], row_lines, "Row counts were not recorded."),
        hyperparameters_table=_table(["| hyper-parameter | value |", "|---|---|"], hp_lines,
                                     "Hyper-parameters were not recorded."),
        evaluation_table=_table(["| metric | candidate (this release) | champion | delta |", "|---|---:|---:|---:|"],
                                eval_lines, "No evaluation metrics were recorded."),
        champion_note="" if champion else "There was no champion to compare with (first release).\n\n",
        gate=gate,
        lineage_table="\n".join(["| lineage | value |", "|---|---|", *lineage_lines]),
        snippet_base=snippet_base,
        system_prompt_json=json.dumps(system_prompt),
    )
