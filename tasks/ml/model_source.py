"""Where the base chat model comes from: a local folder, an ``s3://`` prefix, a GGUF file, or a Hugging Face id.

``resolve_base_model(cfg.model)`` always returns a local directory that ``from_pretrained`` can read:

* a name ending in ``.gguf`` (a local file, an ``s3://`` object, or ``package:<module>/<file>.gguf`` inside an
  installed Python package) is converted once into a Hugging Face folder in the cache (``gguf_import``); an s3://
  object is first mirrored into the cache like a model folder's files (verified, reused while it matches);
* a local directory is used as it is;
* an ``s3://bucket/prefix/`` is synced once into ``<cache>/<sha256(uri)[:16]>/`` (cache = ``model.cache_dir``,
  ``$ECB_MODEL_CACHE`` or ``~/.cache/ecb/models``). Every object is downloaded to a temporary name, its size and
  checksum verified (single-part ETag == MD5; multipart ETags fall back to ``sha256sums.json`` beside the model,
  else to the size) and only then renamed into place. A ``.complete`` marker listing the objects (key, size, ETag,
  local MD5) is written last, so a later call downloads only objects whose listed ETag/size changed or whose local
  copy no longer matches the MD5 recorded when it was verified (a corrupted or edited cache file is fetched again);
* anything else is a Hugging Face id, looked up with ``huggingface_hub.snapshot_download``: the local HF cache
  first (``local_files_only=True``), the hub only when that misses and ``HF_HUB_OFFLINE`` is not set.

``upload_model_dir`` is the inverse (used by the demo base model step and to publish a model for offline use).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

from tasks import env
from tasks.errors import StepError
from tasks.io import s3
from tasks.ml import gguf_import
from tasks.ml.model_cache import LOCK, MARKER, cache_root, hash_file, locked

log = logging.getLogger("tasks.ml.model_source")

SHA256SUMS = "sha256sums.json"
_PART_SUFFIX = ".ecb-part"
# Files up to this size are uploaded in one PUT, so their ETag is their MD5 and a sync can verify them directly.
SINGLE_PART_LIMIT = 512 * 1024 * 1024


# --------------------------------------------------------------------------------------------------- helpers

def _prefix_uri(uri: str) -> str:
    """The URI of a 'folder': always ends with '/' so 'models/a' never also lists 'models/ab/...'."""
    return uri if uri.endswith("/") else uri + "/"


def cache_dir_for(uri: str, model_cfg=None) -> Path:
    """The local folder an s3:// model is synced into (a function of the normalised URI only)."""
    return cache_root(model_cfg) / hashlib.sha256(_prefix_uri(uri).encode()).hexdigest()[:16]


def _rel_path(key: str, prefix: str) -> str | None:
    """Object key -> path relative to the model folder; None for folder placeholders. Rejects keys that would
    escape the cache folder ('..', absolute parts)."""
    rel = key[len(prefix):]
    if not rel or rel.endswith("/"):
        return None
    if any(p in ("..", ".", "") for p in rel.split("/")) or "\\" in rel:
        raise StepError(f"model.base_model: object key {key!r} is not a safe relative path; refusing to sync it")
    return rel


def _read_marker(folder: Path) -> dict:
    try:
        marker = json.loads((folder / MARKER).read_text())
        return {o["rel"]: o for o in marker.get("objects", [])}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


# --------------------------------------------------------------------------------------------------- s3 sync

def _remote_listing(uri: str) -> list[dict]:
    bucket, prefix = s3.split_uri(uri)
    try:
        listed = list(s3.list_objects(uri))
    except Exception as exc:  # noqa: BLE001 - any client error becomes an actionable message; cause chained
        raise StepError(f"model.base_model={uri}: cannot list the S3 prefix ({type(exc).__name__}: {exc})") from exc
    objects = []
    for obj in listed:
        rel = _rel_path(obj["key"], prefix)
        if rel is not None and rel not in (MARKER, LOCK):
            objects.append({"rel": rel, "key": obj["key"], "size": obj["size"], "etag": obj["etag"]})
    return sorted(objects, key=lambda o: o["rel"])


def _local_ok(path: Path, obj: dict, known: dict | None) -> bool:
    """True when the cached file is the listed object: same listing entry as when it was verified, and the file
    still has the size and MD5 recorded then."""
    if not known or known.get("etag") != obj["etag"] or known.get("size") != obj["size"] or not known.get("md5"):
        return False
    if not path.is_file() or path.stat().st_size != obj["size"]:
        return False
    return hash_file(path, "md5")["md5"] == known["md5"]


def _download(bucket: str, obj: dict, dest: Path, sha256sums: dict) -> dict:
    """Download one object to ``dest`` (atomically) and verify it; returns the marker entry."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + _PART_SUFFIX)
    uri = f"s3://{bucket}/{obj['key']}"
    try:
        s3.client().download_file(bucket, obj["key"], str(tmp))
    except Exception as exc:  # noqa: BLE001
        tmp.unlink(missing_ok=True)
        raise StepError(f"model.base_model: cannot download {uri} ({type(exc).__name__}: {exc})") from exc
    size = tmp.stat().st_size
    digests = hash_file(tmp, "md5", "sha256")
    problem, checked = None, "size"
    if size != obj["size"]:
        problem = f"size {size} != listed {obj['size']}"
    elif "-" not in obj["etag"]:
        checked = "md5"
        if digests["md5"] != obj["etag"].lower():
            problem = f"md5 {digests['md5']} != ETag {obj['etag']}"
    elif obj["rel"] in sha256sums:
        checked = "sha256"
        if digests["sha256"] != sha256sums[obj["rel"]]:
            problem = f"sha256 {digests['sha256']} != {SHA256SUMS} entry {sha256sums[obj['rel']]}"
    if problem:
        tmp.unlink(missing_ok=True)
        raise StepError(f"model.base_model: {uri} failed verification after download ({problem}); the object "
                        "changed during the sync or the transfer is corrupt -- rerun the step")
    os.replace(tmp, dest)
    return {"rel": obj["rel"], "key": obj["key"], "size": obj["size"], "etag": obj["etag"],
            "md5": digests["md5"], "sha256": digests["sha256"], "verified_by": checked}


def _load_sha256sums(bucket: str, objects: list[dict]) -> dict:
    entry = next((o for o in objects if o["rel"] == SHA256SUMS), None)
    if entry is None:
        return {}
    try:
        sums = json.loads(s3.get_bytes(f"s3://{bucket}/{entry['key']}"))
    except Exception as exc:  # noqa: BLE001
        log.warning("cannot read %s (%s); multipart objects are checked by size only", entry["key"], exc)
        return {}
    return sums if isinstance(sums, dict) else {}


def sync_s3_model(uri: str, model_cfg=None) -> tuple[Path, dict]:
    """Mirror an s3:// model prefix into the cache. Returns (folder, stats with downloaded/reused counts)."""
    uri = _prefix_uri(uri)
    bucket, _ = s3.split_uri(uri)
    folder = cache_dir_for(uri, model_cfg)
    objects = _remote_listing(uri)
    if not any(o["rel"] == "config.json" for o in objects):
        what = f"{len(objects)} object(s)" if objects else "no objects"
        raise StepError(f"model.base_model={uri}: the prefix holds {what} and no config.json -- it is not a model "
                        "in Hugging Face format (upload one with tasks.ml.model_source.upload_model_dir)")
    with locked(folder):
        known = _read_marker(folder)
        todo = [o for o in objects if not _local_ok(folder / o["rel"], o, known.get(o["rel"]))]
        if not todo:
            log.info("model %s: cache %s is complete and matches the listing; nothing to download", uri, folder)
            return folder, {"downloaded": 0, "reused": len(objects), "bytes": 0}
        (folder / MARKER).unlink(missing_ok=True)  # incomplete from here until the new marker is written
        needs_sums = any("-" in o["etag"] for o in todo)
        sha256sums = _load_sha256sums(bucket, objects) if needs_sums else {}
        t0, done = time.monotonic(), 0
        entries = {rel: known[rel] for rel in known}
        for obj in todo:
            entries[obj["rel"]] = _download(bucket, obj, folder / obj["rel"], sha256sums)
            done += obj["size"]
            log.info("downloaded %s (%d bytes, verified by %s)", obj["key"], obj["size"],
                     entries[obj["rel"]]["verified_by"])
        wanted = {o["rel"] for o in objects}
        for path in sorted(folder.rglob("*"), reverse=True):  # files removed remotely (or stale parts) go too
            rel = path.relative_to(folder).as_posix()
            if path.is_file() and rel not in wanted and rel not in (MARKER, LOCK):
                path.unlink()
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        marker = {"uri": uri, "synced_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "objects": [entries[o["rel"]] for o in objects]}
        tmp = folder / (MARKER + _PART_SUFFIX)
        tmp.write_text(json.dumps(marker, indent=2, sort_keys=True))
        os.replace(tmp, folder / MARKER)  # last: its presence means every listed file is verified
        log.info("model %s: downloaded %d of %d object(s), %.1f MB in %.1fs into %s", uri, len(todo), len(objects),
                 done / 1e6, time.monotonic() - t0, folder)
        return folder, {"downloaded": len(todo), "reused": len(objects) - len(todo), "bytes": done}


# --------------------------------------------------------------------------------------------------- hub

def _hub_offline() -> bool:
    return env.get("HF_HUB_OFFLINE").lower() in ("1", "true", "yes", "on")


def _from_hub(repo_id: str, revision: str | None) -> tuple[str | None, list[str]]:
    """(local snapshot folder or None, what was tried)."""
    from huggingface_hub import snapshot_download

    tried = []
    try:
        return snapshot_download(repo_id, revision=revision, local_files_only=True), tried
    except Exception as exc:  # noqa: BLE001 - not cached, invalid id, ...: recorded and reported together
        tried.append(f"local Hugging Face cache ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
    if _hub_offline():
        tried.append("the Hugging Face hub (skipped: HF_HUB_OFFLINE is set)")
        return None, tried
    try:
        return snapshot_download(repo_id, revision=revision), tried
    except Exception as exc:  # noqa: BLE001
        tried.append(f"the Hugging Face hub ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
    return None, tried


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def resolve_base_model(model_cfg) -> str:
    """A local directory holding ``model_cfg.base_model`` (see the module docstring for the cases)."""
    name = (model_cfg.base_model or "").strip()
    if not name:
        raise StepError("model.base_model is empty: set it to a Hugging Face id, a local folder, an s3:// prefix or a "
                        ".gguf file")
    if gguf_import.is_gguf(name):
        return str(_import_gguf(name, model_cfg))
    if name.startswith("s3://"):
        folder, _ = sync_s3_model(name, model_cfg)
        return str(folder)
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise StepError(f"model.base_model={name!r} is a file, not a model folder (expected a folder with "
                        "config.json, the weights and the tokenizer files)")
    tried = [f"local folder {str(path)!r} (does not exist)"]
    if not _looks_like_path(name):
        folder, hub_tried = _from_hub(name, getattr(model_cfg, "revision", None) or None)
        if folder:
            return str(folder)
        tried += [f"Hugging Face id {name!r} at revision {model_cfg.revision!r}: {t}" for t in hub_tried]
    raise StepError(f"model.base_model={name!r} could not be resolved; tried: " + "; ".join(tried)
                    + ". Set model.base_model to an existing local folder, an s3:// prefix holding the model "
                      "(see upload_model_dir), or a Hugging Face id that is in the local cache or reachable.")


# --------------------------------------------------------------------------------------------------- gguf

def _gguf_file(name: str, model_cfg) -> Path:
    if name.startswith(gguf_import.PACKAGE_PREFIX):
        return gguf_import.package_file(name)
    if name.startswith("s3://"):
        return sync_s3_file(name, model_cfg)
    path = Path(name).expanduser()
    if not path.is_file():
        raise StepError(f"model.base_model={name!r}: no such GGUF file")
    return path


def _gguf_settings(name: str, model_cfg) -> dict:
    return {"source": name, "dtype": getattr(model_cfg, "gguf_dtype", "float32"),
            "license": getattr(model_cfg, "base_model_license", "")}


def _import_gguf(name: str, model_cfg) -> Path:
    return gguf_import.import_gguf(_gguf_file(name, model_cfg), cache_root(model_cfg),
                                   **_gguf_settings(name, model_cfg))


def sync_s3_file(uri: str, model_cfg=None) -> Path:
    """One s3:// object mirrored into the cache (``<cache>/<sha256(uri)[:16]>/<name>``), verified like a model
    folder's files and reused while the object's listing and the local copy still match the marker."""
    bucket, key = s3.split_uri(uri)
    obj = next((o for o in s3.list_objects(uri) if o["key"] == key), None)
    if obj is None:
        raise StepError(f"model.base_model={uri}: no such S3 object")
    obj = {"rel": key.rsplit("/", 1)[-1], "key": key, "size": obj["size"], "etag": obj["etag"]}
    folder = cache_dir_for(uri, model_cfg)
    with locked(folder):
        if not _local_ok(folder / obj["rel"], obj, _read_marker(folder).get(obj["rel"])):
            (folder / MARKER).unlink(missing_ok=True)
            entry = _download(bucket, obj, folder / obj["rel"], {})
            tmp = folder / (MARKER + _PART_SUFFIX)
            tmp.write_text(json.dumps({"uri": uri, "objects": [entry]}, indent=2, sort_keys=True))
            os.replace(tmp, folder / MARKER)
    return folder / obj["rel"]


def base_model_source(model_cfg) -> dict | None:
    """``ecb_source.json`` of the base model (source, licence, dtype, ...), None for one not imported from a GGUF
    file. Converts and downloads no model for it: a GGUF source is described from its conversion in the cache, or
    from the file itself when it was never converted here; an s3:// prefix is asked for that one object."""
    name = (model_cfg.base_model or "").strip()
    if gguf_import.is_gguf(name):
        return gguf_import.describe(_gguf_file(name, model_cfg), cache_root(model_cfg),
                                    **_gguf_settings(name, model_cfg))
    if name.startswith("s3://"):
        uri = _prefix_uri(name) + gguf_import.SOURCE_FILE
        return s3.get_json(uri) if s3.head(uri) else None
    return gguf_import.source_info(Path(name).expanduser()) if name else None


# --------------------------------------------------------------------------------------------------- upload

def upload_model_dir(local_dir: str | os.PathLike, s3_prefix: str, *,
                     single_part_limit: int = SINGLE_PART_LIMIT) -> list[dict]:
    """Upload every file under ``local_dir`` to ``s3_prefix`` and write ``sha256sums.json`` beside them.

    Returns one ``{"key", "size", "md5", "sha256"}`` per model file (``key`` is the object key in the bucket;
    sha256sums.json itself is not listed). Files up to ``single_part_limit`` bytes go up in one PUT (ETag == MD5,
    checked after the upload); bigger ones are multipart and are verified on download through sha256sums.json.
    Our own cache bookkeeping files (.complete, .lock, an old sha256sums.json) are not uploaded.
    """
    from boto3.s3.transfer import TransferConfig

    root = Path(local_dir)
    if not root.is_dir():
        raise StepError(f"upload_model_dir: {root} is not a folder")
    prefix_uri = _prefix_uri(s3_prefix)
    bucket, prefix = s3.split_uri(prefix_uri)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name not in (MARKER, LOCK, SHA256SUMS)
                   and not p.name.endswith(_PART_SUFFIX))
    if not files:
        raise StepError(f"upload_model_dir: {root} holds no files")
    # S3 parts must be >= 5 MiB (but the last); a smaller limit only moves the threshold (tests use that).
    transfer = TransferConfig(multipart_threshold=single_part_limit,
                              multipart_chunksize=max(5 * 1024 * 1024, min(64 * 1024 * 1024, single_part_limit)))
    client = s3.client()
    uploaded = []
    for path in files:
        rel = path.relative_to(root).as_posix()
        digests = hash_file(path, "md5", "sha256")
        key = prefix + rel
        client.upload_file(str(path), bucket, key, Config=transfer)
        uploaded.append({"key": key, "size": path.stat().st_size, **digests})
    sums = {u["key"][len(prefix):]: u["sha256"] for u in uploaded}
    s3.put_bytes(prefix_uri + SHA256SUMS, json.dumps(sums, indent=2, sort_keys=True).encode(), "application/json")
    listed = {o["key"]: o for o in s3.list_objects(prefix_uri)}
    for u in uploaded:
        obj = listed.get(u["key"])
        if obj is None or obj["size"] != u["size"] or ("-" not in obj["etag"] and obj["etag"].lower() != u["md5"]):
            raise StepError(f"upload_model_dir: s3://{bucket}/{u['key']} does not match {root / u['key'][len(prefix):]}"
                            f" after upload (listed: {obj}); rerun the upload")
    log.info("uploaded %d file(s), %.1f MB, from %s to %s", len(uploaded), sum(u["size"] for u in uploaded) / 1e6,
             root, prefix_uri)
    return uploaded


# --------------------------------------------------------------------------------------------------- checks

def check_chat_template(tokenizer, where: str) -> None:
    """Fine-tuning, evaluation and serving all format conversations with the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise StepError(f"the tokenizer loaded from {where} has no chat template; set model.base_model to a chat "
                        "model whose tokenizer_config.json (or chat_template.jinja) defines one, e.g. "
                        "TinyLlama/TinyLlama-1.1B-Chat-v1.0 or the demo base model built by build_demo_model")


__all__ = ["LOCK", "MARKER", "SHA256SUMS", "base_model_source", "cache_dir_for", "cache_root", "check_chat_template",
           "hash_file", "resolve_base_model", "sync_s3_file", "sync_s3_model", "upload_model_dir"]
