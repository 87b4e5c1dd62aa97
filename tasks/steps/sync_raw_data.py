"""Mirror the raw support conversations into the platform's raw area, incrementally.

    python -m tasks sync_raw_data --run-id R [--set data.source=s3://bucket/prefix/ | /local/folder]

An object is copied only when its checksum (S3 ETag, or the MD5 of a local file, which is what S3 reports for a
single-part upload) differs from the one recorded on the copy. The manifest (keys, sizes, checksums and a digest
over them) goes to S3 and to Postgres ``raw_manifests``; re-running for the same run id rewrites the same rows.
"""

from __future__ import annotations

import logging

from tasks.config import TRAINING_SECTIONS
from tasks.context import StepContext
from tasks.data.raw import copy_one, list_source, manifest_digest
from tasks.errors import StepError
from tasks.io import s3

log = logging.getLogger("tasks.steps.sync_raw_data")
def record(ctx: StepContext, manifest: dict) -> None:
    from tasks.io import db, schema

    def write(conn) -> None:  # upserts on run_id: safe to run again after a lost connection
        db.upsert(conn, schema.pipeline_runs, {"run_id": ctx.run_id, "config": ctx.config.to_dict(),
                                               "config_hash": ctx.config.section_hash(*TRAINING_SECTIONS)},
                  keys=("run_id",))
        db.upsert(conn, schema.raw_manifests, {
            "run_id": ctx.run_id, "source": manifest["source"], "manifest_uri": manifest["manifest_uri"],
            "digest": manifest["digest"], "n_objects": manifest["n_objects"], "n_bytes": manifest["n_bytes"],
            "n_copied": manifest["n_copied"], "objects": manifest["objects"]}, keys=("run_id",))

    db.transaction(write, what=f"record raw manifest of run {ctx.run_id}")


def run(ctx: StepContext) -> dict:
    cfg = ctx.config
    raw_root = f"s3://{cfg.storage.bucket}/{cfg.storage.raw_prefix}"
    s3.check_bucket(cfg.storage.bucket)
    ignored: list[str] = []
    objects = list_source(cfg.data.source, cfg.data.file_patterns, ignored)
    if ignored:
        log.warning("ignored %d file(s) in %s not ending in %s: %s", len(ignored), cfg.data.source,
                    cfg.data.file_patterns, ", ".join(ignored[:20]) + (" ..." if len(ignored) > 20 else ""))
    if not objects:
        raise StepError(f"data.source {cfg.data.source} holds no files ending in {cfg.data.file_patterns}"
                        + (f" (ignored: {', '.join(ignored[:20])})" if ignored else ""))
    copied = 0
    for obj in objects:
        obj["raw_uri"] = s3.join(raw_root, obj["rel"])
        if copy_one(obj, obj["raw_uri"]):
            copied += 1
            log.info("copied %s -> %s (%d bytes)", obj["uri"], obj["raw_uri"], obj["size"])
    digest = manifest_digest(objects)
    manifest = {"source": cfg.data.source, "digest": digest, "n_objects": len(objects),
                "n_bytes": sum(o["size"] for o in objects), "n_copied": copied, "ignored": ignored,
                "objects": [{k: o[k] for k in ("rel", "raw_uri", "size", "etag")} for o in objects]}
    # Content-addressed copy (shared by every run that saw the same data) plus the run's own pointer.
    manifest["manifest_uri"] = s3.join(raw_root, "_manifests", f"{digest}.json")
    s3.put_json(manifest["manifest_uri"], manifest)
    save_run_config(ctx)
    record(ctx, manifest)
    log.info("sync done: %d objects (%d bytes) in the manifest, %d copied, %d unchanged; digest %s",
             len(objects), manifest["n_bytes"], copied, len(objects) - copied, digest[:12])
    return {**{k: manifest[k] for k in ("manifest_uri", "digest", "n_objects", "n_bytes", "n_copied")},
            "n_ignored": len(ignored)}


def save_run_config(ctx: StepContext) -> str:
    """The resolved config, saved once per run beside the run's artifacts (same content on every retry)."""
    uri = s3.join(f"s3://{ctx.config.storage.bucket}", ctx.config.storage.runs_prefix, s3.safe_key(ctx.run_id),
                  "config.json")
    s3.put_json(uri, ctx.config.to_dict())
    return uri

