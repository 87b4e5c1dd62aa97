"""One typed config for the whole platform.

Defaults live in the dataclasses below (each field has a help text), a YAML file may override them, and a run
overrides single fields with ``--set section.field=value``. Pure Python: the Airflow side imports this module to
build the trigger form, so it must never import torch, transformers, mlflow or airflow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "include" / "config" / "default.yaml"


# Sections whose values change what a trained model is; their hash decides whether a nightly run may stop early.
TRAINING_SECTIONS = ("data",)


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type or out of range; the message names the field."""


def opt(default: Any, help: str, *, minimum: float | None = None, maximum: float | None = None,
        choices: tuple | None = None, param: bool = False) -> Any:
    """A config field with its help text and bounds. ``param=True`` puts it on the Airflow trigger form."""
    meta = {"help": help, "minimum": minimum, "maximum": maximum, "choices": choices, "param": param}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class StorageConfig:
    bucket: str = opt("ecb-platform", "S3 bucket holding raw data, snapshots and run artifacts.")
    raw_prefix: str = opt("raw/", "Prefix inside the bucket that sync_raw_data mirrors the source into.")
    snapshot_prefix: str = opt("snapshots/", "Prefix for prepared ChatML snapshots (one folder per snapshot id).")
    runs_prefix: str = opt("runs/", "Prefix for per-run artifacts: resolved config, checkpoints, adapters.")


@dataclass
class DataConfig:
    source: str = opt("s3://ecb-landing/support-conversations/",
                      "Where raw conversations come from: an s3://bucket/prefix or a local folder.", param=True)
    file_patterns: list = opt([".csv", ".jsonl"], "File name endings that count as raw data; others are ignored.")
    instruction_column: str = opt("instruction", "Column holding the customer's message.")
    response_column: str = opt("response", "Column holding the agent's answer.")
    intent_column: str = opt("intent", "Column holding the intent label (used for stratified splits).")
    category_column: str = opt("category", "Column holding the category label.")
    flags_column: str = opt("flags", "Optional column with Bitext variation flags; kept as metadata.")
    system_prompt: str = opt(
        "You are a helpful, polite customer-support assistant for an online store. Answer clearly and "
        "give concrete next steps.",
        "System message placed first in every ChatML conversation.")
    validation_fraction: float = opt(0.1, "Share of each intent's distinct instructions put in validation.",
                                     minimum=0.0, maximum=0.5)
    test_fraction: float = opt(0.1, "Share of each intent's distinct instructions put in test.",
                               minimum=0.0, maximum=0.5)
    max_instruction_chars: int = opt(2000, "Instructions longer than this are quarantined (reason: too_long).",
                                     minimum=1)
    max_response_chars: int = opt(8000, "Responses longer than this are quarantined (reason: too_long).", minimum=1)
    max_rows: int = opt(0, "Keep at most this many rows after cleaning (0 = all); sampled per intent, seeded.",
                        minimum=0, param=True)
    seed: int = opt(42, "Seed for splitting and sampling; part of the snapshot id.")


@dataclass
class PipelineConfig:
    schedule: str = opt("@daily", "Cron or preset for nightly retraining (read when the DAG file is parsed).")
    retries: int = opt(2, "Airflow retries per task; a retry resumes from what the step already wrote.",
                       minimum=0, maximum=10)
    retry_delay_s: int = opt(30, "First retry delay in seconds (doubles each retry).", minimum=1)
    step_timeout_s: int = opt(6 * 3600, "A step command running longer than this is killed.", minimum=10)


@dataclass
class Config:
    storage: StorageConfig = field(default_factory=StorageConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def section_hash(self, *sections: str) -> str:
        """Stable short hash of the named sections (used in snapshot ids and change detection)."""
        payload = {s: dataclasses.asdict(getattr(self, s)) for s in sections}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def iter_fields(cls: type = Config, prefix: str = ""):
    """Yield (dotted name, dataclasses.Field, resolved type) for every leaf field."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            yield from iter_fields(hints[f.name], name + ".")
        else:
            yield name, f, hints[f.name]


def _coerce(name: str, value: Any, typ: Any, meta: dict) -> Any:
    base = typing.get_origin(typ) or typ
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if base is bool and not isinstance(value, bool) or base is not bool and isinstance(value, bool) \
            or not isinstance(value, base):
        raise ConfigError(f"config field '{name}': expected {base.__name__}, got {value!r}")
    if meta.get("minimum") is not None and value < meta["minimum"]:
        raise ConfigError(f"config field '{name}': {value!r} is below the minimum {meta['minimum']}")
    if meta.get("maximum") is not None and value > meta["maximum"]:
        raise ConfigError(f"config field '{name}': {value!r} is above the maximum {meta['maximum']}")
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"config field '{name}': {value!r} is not one of {list(meta['choices'])}")
    return value


def _apply(cfg: Config, name: str, value: Any) -> None:
    fields = {n: (f, t) for n, f, t in iter_fields()}
    if name not in fields:
        raise ConfigError(f"unknown config field '{name}' (known: {', '.join(sorted(fields))})")
    f, typ = fields[name]
    section, attr = name.rsplit(".", 1)
    obj = cfg
    for part in section.split("."):
        obj = getattr(obj, part)
    setattr(obj, attr, _coerce(name, value, typ, dict(f.metadata)))


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and not prefix.count("."):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def parse_override(text: str) -> tuple[str, Any]:
    """'data.max_rows=100' -> ('data.max_rows', 100); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.field=value")
    name, raw = text.split("=", 1)
    return name.strip(), yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Defaults <- YAML file (``ECB_CONFIG`` or include/config/default.yaml) <- overrides."""
    cfg = Config()
    path = Path(path or os.environ.get("ECB_CONFIG") or DEFAULT_CONFIG_PATH)
    if path.exists():
        tree = yaml.safe_load(path.read_text()) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        for name, value in _flatten(tree).items():
            _apply(cfg, name, value)
    elif path != DEFAULT_CONFIG_PATH:
        raise ConfigError(f"config file {path} does not exist")
    items = overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides or [])
    for name, value in items:
        _apply(cfg, name, value)
    return cfg


def config_from_dict(tree: dict) -> Config:
    cfg = Config()
    for name, value in _flatten(tree).items():
        _apply(cfg, name, value)
    return cfg
