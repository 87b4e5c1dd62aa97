"""ChatML snapshots in S3: their content-derived id, writing one (manifest last), finding and reading one.

    s3://<bucket>/snapshots/<snapshot_id>/{train,validation,test}.jsonl, quarantine.jsonl, config.json, manifest.json
    (with data.include_feedback also review.jsonl and live.jsonl, see tasks/data/feedback.py)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging

from tasks.context import StepContext
from tasks.data import chatml
from tasks.data.feedback import FeedbackResult
from tasks.errors import StepError
from tasks.io import s3

log = logging.getLogger("tasks.data.snapshots")
PREP_VERSION = "2"  # bump when cleaning/splitting code changes what a snapshot contains
LIVE, REVIEW = "live", "review"  # the feedback files: held-out live eval set, thumbs-down replies for people


def snapshot_id(raw_digest: str, data_cfg, feedback_digest: str | None = None) -> str:
    """hash(raw data, prep settings, prep code version[, the feedback the snapshot includes]).

    Without feedback the payload is exactly what it was before data.include_feedback existed, so switching it off
    (the default) keeps every snapshot id; with it, the digest of the written feedback records is part of the id:
    new usable feedback makes a new snapshot, no new feedback reuses the last one."""
    prep = {k: v for k, v in dataclasses.asdict(data_cfg).items() if k != "source"}  # content, not location
    payload = {"raw": raw_digest, "prep": prep, "version": PREP_VERSION}
    if data_cfg.include_feedback:
        if feedback_digest is None:
            raise ValueError("data.include_feedback is on: the snapshot id needs the feedback digest")
        payload["feedback"] = feedback_digest
    else:
        del prep["include_feedback"]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def existing_snapshot(sid: str) -> dict | None:
    from sqlalchemy import select

    from tasks.io import db, schema

    query = select(schema.snapshots).where(schema.snapshots.c.snapshot_id == sid)
    row = db.transaction(lambda conn: conn.execute(query).mappings().first(), what=f"look up snapshot {sid}")
    if row and s3.head(s3.join(row["uri"], "manifest.json")):
        return dict(row)
    return None


def read_raw_files(manifest: dict) -> list[tuple[str, bytes]]:
    files = []
    for obj in manifest["objects"]:
        try:
            files.append((obj["rel"], s3.get_bytes(obj["raw_uri"])))
        except Exception as exc:  # noqa: BLE001 - name the object; the cause is chained
            raise StepError(f"cannot read raw file {obj['raw_uri']}: {exc}") from exc
    log.info("read %d raw file(s), %d bytes", len(files), sum(len(data) for _, data in files))
    return files


def write_snapshot(sid: str, uri: str, result: chatml.PrepResult, ctx: StepContext, raw: dict,
                   feedback: FeedbackResult | None = None) -> dict:
    """Write the splits (train plus feedback's thumbs-up records), the quarantine, the feedback files and, last,
    the manifest."""
    splits = dict(result.splits)
    if feedback is not None:
        splits["train"] = [*splits["train"], *feedback.train]  # train only: never validation or test
        s3.put_bytes(s3.join(uri, f"{REVIEW}.jsonl"), chatml.splits_to_jsonl(feedback.review), "application/jsonl")
        s3.put_bytes(s3.join(uri, f"{LIVE}.jsonl"), chatml.splits_to_jsonl(feedback.live), "application/jsonl")
    for split in chatml.SPLITS:
        s3.put_bytes(s3.join(uri, f"{split}.jsonl"), chatml.splits_to_jsonl(splits[split]), "application/jsonl")
    s3.put_bytes(s3.join(uri, "quarantine.jsonl"), chatml.quarantine_to_jsonl(result.quarantine), "application/jsonl")
    s3.put_json(s3.join(uri, "config.json"), ctx.config.to_dict())
    manifest = {
        "snapshot_id": sid, "uri": uri, "raw_manifest_uri": raw["manifest_uri"], "raw_digest": raw["digest"],
        "rows_in": result.rows_in, "rows_kept": result.rows_kept, "rows_quarantined": result.rows_quarantined,
        "rows_sampled_out": result.rows_sampled_out, "quarantine_reasons": result.reasons,
        "per_file": result.per_file, "unknown_columns": result.unknown_columns,
        **{f"n_{s}": len(splits[s]) for s in chatml.SPLITS}, "prep_version": PREP_VERSION,
        "created_by_run": ctx.run_id,
    }
    if feedback is not None:  # absent without feedback: such a manifest is byte-for-byte what it always was
        manifest.update(feedback=feedback.counts, feedback_digest=feedback.digest, n_train_feedback=len(feedback.train),
                        n_live=len(feedback.live), n_review=len(feedback.review))
    # manifest.json last: its presence marks the snapshot complete, so a killed run is redone, not reused.
    s3.put_json(s3.join(uri, "manifest.json"), manifest)
    return manifest


def read_split(snapshot_uri: str, split: str) -> list[dict]:
    """The ChatML records of one split of a prepared snapshot."""
    uri = s3.join(snapshot_uri, f"{split}.jsonl")
    if not s3.head(uri):
        raise StepError(f"snapshot split {uri} does not exist (is --input snapshot_uri a prepared snapshot?)")
    return [json.loads(line) for line in s3.get_bytes(uri).decode().splitlines() if line.strip()]


def read_live(snapshot_uri: str) -> list[dict]:
    """The live eval set (prompts whose reply got a thumbs-down); empty for a snapshot made without feedback."""
    return read_split(snapshot_uri, LIVE) if s3.head(s3.join(snapshot_uri, f"{LIVE}.jsonl")) else []
