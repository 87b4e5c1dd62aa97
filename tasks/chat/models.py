"""Which model the service serves, and loading it: the registry's champion (adapter merged into its base) by default.

``chat.model_uri`` may name ``models:/<name>@<alias>``, ``models:/<name>/<version>`` or a local Hugging Face model
folder (development and tests). The lineage shown by ``/api/model`` comes from the registered version's tags (DAG
run id, dataset snapshot, gate decision id) and the gate decision row in Postgres.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from tasks.chat import static_cache
from tasks.chat.engine import ModelHandle
from tasks.chat.serving import Target
from tasks.release.registry import serving_uri

log = logging.getLogger("tasks.chat.models")
MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))$")


class ModelNotFound(RuntimeError):
    pass


def _registry_version(uri: str) -> dict:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from tasks.release import registry

    m = MODELS_URI.match(uri)
    if not m:
        raise ModelNotFound(f"model uri {uri!r} is neither models:/name@alias, models:/name/N nor a folder")
    client = MlflowClient()
    try:
        mv = (client.get_model_version_by_alias(m["name"], m["alias"]) if m["alias"]
              else client.get_model_version(m["name"], m["version"]))
    except MlflowException as exc:
        raise ModelNotFound(f"{uri}: {exc.message if hasattr(exc, 'message') else exc}") from exc
    info = registry.version_info(mv)
    info.update(name=m["name"], alias=m["alias"], gate_decision_id=(mv.tags or {}).get("gate_decision_id"))
    return info


def _gate_decision(decision_id) -> dict | None:
    if not decision_id:
        return None
    try:
        from sqlalchemy import select

        from tasks.io import db, schema

        g = schema.gate_decisions
        with db.engine().connect() as conn:
            row = conn.execute(select(g.c.id, g.c.release, g.c.forced, g.c.score_delta, g.c.summary)
                               .where(g.c.id == int(decision_id))).mappings().first()
        return dict(row) if row else None
    except Exception as exc:  # lineage is informative; a missing row must not stop serving
        log.warning("gate decision %s not readable: %s", decision_id, type(exc).__name__)
        return None


def plan(cfg) -> list:
    """What the service should serve, from the registry's aliases: the champion first, then the candidate when one
    is set with a canary share (``chat.model_uri``, when set, names the one model to serve instead). Versions are
    pinned (``models:/name/N``), so an alias moving while the models load cannot mix two states."""
    from tasks.release import registry

    if cfg.chat.model_uri:
        return [Target("champion", cfg.chat.model_uri)]
    name = cfg.release.registered_model
    found = registry.aliases(name)
    if "champion" not in found:
        raise ModelNotFound(f"registered model {name!r} has no champion alias (aliases: {found or 'none'})")
    out = [Target("champion", f"models:/{name}/{found['champion']}", found["champion"], name)]
    candidate = found.get("candidate")
    if candidate and candidate != found["champion"]:
        tags = registry.version_tags(name, candidate) or {}
        share = float(tags.get(registry.CANARY_SHARE_TAG) or 0)
        if share > 0:
            out.append(Target("candidate", f"models:/{name}/{candidate}", candidate, name, share))
        else:
            log.warning("alias candidate -> version %s has no canary share tag: not served", candidate)
    return out


def load(cfg, uri: str | None = None) -> ModelHandle:
    """Load the model named by uri (default: the configured one) onto the best device, adapter merged."""
    from tasks.ml import models

    uri = uri or serving_uri(cfg)
    started = time.monotonic()
    if Path(uri).is_dir():
        tokenizer, model = models.load_local(cfg_for_base(cfg, uri))
        info = {"uri": uri, "name": None, "alias": None, "version": f"local:{Path(uri).name}", "base_model": uri,
                "run_id": None, "snapshot_id": None, "gate_decision": None}
    else:
        reg = _registry_version(uri)
        tokenizer, model = models.load_for_inference(cfg_for_base(cfg, reg["base_model"]), reg["adapter_uri"])
        info = {"uri": uri, "name": reg["name"], "alias": reg["alias"], "version": reg["version"],
                "base_model": reg["base_model"], "adapter_uri": reg["adapter_uri"], "run_id": reg["run_id"],
                "snapshot_id": reg["snapshot_id"], "gate_decision": _gate_decision(reg["gate_decision_id"])}
    info.update(base_provenance(model, cfg_for_base(cfg, info["base_model"])))
    handle = ModelHandle(tokenizer, model, str(info["version"]), info)
    handle.decoder = static_cache.build(model, cfg.chat, rows=cfg.chat.max_batch_size,
                                        width=cfg.chat.context_tokens or handle.context_tokens)
    log.info("loaded model %s (version %s) in %.1fs", uri, info["version"], time.monotonic() - started)
    return handle


def base_provenance(model, cfg) -> dict:
    """/api/model's base_model_source and base_model_license: from ecb_source.json in the folder the base weights
    were loaded from (an imported GGUF records both; ``name_or_path`` survives the adapter merge), else the base
    model as configured and model.base_model_license (None: unknown)."""
    from tasks.ml.gguf_import import source_info

    found = source_info(getattr(model, "name_or_path", None)) or {}
    return {"base_model_source": found.get("source") or cfg.model.base_model,
            "base_model_license": found.get("license") or cfg.model.base_model_license or None}


def cfg_for_base(cfg, base_model: str | None):
    """The service's config with the base model of the version being loaded."""
    import copy

    out = copy.deepcopy(cfg)
    if base_model:
        out.model.base_model = base_model
    return out
