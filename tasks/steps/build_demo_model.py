"""Build the small Llama-architecture demo base model from a snapshot's training split and store it in S3.

    python -m tasks build_demo_model --run-id R --input snapshot_uri=s3://ecb-platform/snapshots/<id>/ \
        [--input dest=s3://ecb-platform/models/base/demo-llama/] [--input size=demo|tiny] [--input steps=N] \
        [--input seed=0]

Idempotent: a model with the same fingerprint (train.jsonl bytes, settings, seed) under dest is reused as it is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import tempfile

from tasks.context import StepContext
from tasks.demo.model import (
    DEMO_VERSION,
    FINGERPRINT_FILE,
    build_local,
    existing_build,
    fingerprint,
    parse_chatml,
    remove_stale,
    settings_for,
)
from tasks.errors import StepError
from tasks.io import s3
from tasks.ml.model_source import SHA256SUMS, upload_model_dir

log = logging.getLogger("tasks.steps.build_demo_model")


def run(ctx: StepContext) -> dict:
    inputs = ctx.inputs or {}
    snapshot_uri = ctx.require_input("snapshot_uri")
    dest = (inputs.get("dest") or f"s3://{ctx.config.storage.bucket}/models/base/demo-llama/").strip()
    if not dest.startswith("s3://"):
        raise StepError(f"build_demo_model: dest must be an s3:// prefix, got {dest!r}")
    dest = dest if dest.endswith("/") else dest + "/"
    seed = ctx.int_input("seed")
    settings = settings_for((inputs.get("size") or "demo").strip(), steps=ctx.int_input("steps"),
                            seed=seed)
    train_uri = s3.join(snapshot_uri, "train.jsonl")
    try:
        train = s3.get_bytes(train_uri)
    except Exception as exc:  # noqa: BLE001 - name the object, chain the cause
        raise StepError(f"build_demo_model: cannot read {train_uri} ({type(exc).__name__}: {exc}); run "
                        "prepare_chatml first and pass its snapshot_uri") from exc
    fp = fingerprint(train, settings)
    existing = existing_build(dest)
    if existing and existing.get("fingerprint") == fp and existing.get("manifest") and s3.head(dest + "config.json"):
        log.info("%s already holds demo model %s (built by run %s from the same data and settings); reusing it",
                 dest, fp, existing.get("created_by_run"))
        return {**existing["manifest"], "reused": True}
    records = parse_chatml(train, train_uri)
    with tempfile.TemporaryDirectory(prefix="ecb-demo-model-") as tmp:
        built = build_local(records, tmp, settings)
        if existing:  # a different model is there: unmark it before overwriting, so a crash never looks complete
            s3.client().delete_object(Bucket=s3.split_uri(dest)[0], Key=s3.split_uri(dest)[1] + FINGERPRINT_FILE)
        files = upload_model_dir(tmp, dest)
    bucket, prefix = s3.split_uri(dest)
    removed = remove_stale(dest, {f["key"] for f in files} | {prefix + SHA256SUMS})
    stats = built["pretrain"]
    manifest = {
        "base_model_uri": dest, "fingerprint": fp, "params": built["params"], "vocab_size": built["vocab_size"],
        "pretrain_loss": stats["final_loss"], "pretrain_first_loss": stats["first_loss"],
        "pretrain_steps": stats["steps"], "pretrain_seconds": stats["seconds"],
        "pretrain_tokens_per_s": stats["tokens_per_s"], "size": dataclasses.asdict(settings),
        "train_uri": train_uri, "n_conversations": len(records), "files": len(files), "reused": False,
    }
    s3.put_json(dest + FINGERPRINT_FILE, {"fingerprint": fp, "manifest": manifest, "created_by_run": ctx.run_id,
                                          "train_sha256": hashlib.sha256(train).hexdigest(),
                                          "demo_version": DEMO_VERSION})
    log.info("demo base model %s written to %s (%d files, %d stale object(s) removed)", fp, dest, len(files), removed)
    return manifest
