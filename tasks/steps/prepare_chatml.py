"""Turn the synced raw files into a ChatML snapshot: train/validation/test JSONL plus a quarantine file.

    python -m tasks prepare_chatml --run-id R --input raw_manifest=s3://ecb-platform/raw/_manifests/<digest>.json

Snapshot id = hash(raw manifest digest, prep settings, prep code version), so the same input is prepared once and
every later run reuses it. Rows that cannot be used are kept aside in quarantine.jsonl with a reason, and the
snapshot manifest reconciles rows_in = rows_kept + rows_quarantined + rows_sampled_out.

With data.include_feedback the rated chat replies are added (tasks/data/feedback.py): thumbs-up pairs to train,
thumbs-down ones to review.jsonl and live.jsonl, counts under "feedback" in the manifest. Their digest is part of
the snapshot id, so the raw data is prepared first (the feedback is deduplicated against it) and the result is
reused when neither the raw data nor the feedback changed.
"""

from __future__ import annotations

import logging

from tasks.config import TRAINING_SECTIONS
from tasks.context import StepContext
from tasks.data import chatml, feedback
from tasks.data.snapshots import existing_snapshot, read_raw_files, snapshot_id, write_snapshot
from tasks.errors import StepError
from tasks.io import s3

log = logging.getLogger("tasks.steps.prepare_chatml")
def last_release() -> dict | None:
    """The newest release that reached the registry (what 'the current model was trained on')."""
    from sqlalchemy import select

    from tasks.io import db, schema

    r = schema.releases
    query = (select(r.c.run_id, r.c.snapshot_id, r.c.config_hash, r.c.registry_version)
             .where(r.c.registry_version.is_not(None), r.c.status != "failed")
             .order_by(r.c.created_at.desc()).limit(1))
    row = db.transaction(lambda conn: conn.execute(query).mappings().first(), what="look up the last release")
    return dict(row) if row else None


def record(ctx: StepContext, m: dict, data_cfg_hash: str) -> None:
    from sqlalchemy import update

    from tasks.io import db, schema

    row = {k: m[k] for k in ("snapshot_id", "raw_digest", "uri", "rows_in", "rows_kept", "rows_quarantined",
                             "rows_sampled_out", "n_train", "n_validation", "n_test", "created_by_run")}
    row.update(prep_config_hash=data_cfg_hash, quarantine_reasons=m["quarantine_reasons"])
    def write(conn) -> None:  # an upsert and an idempotent update: safe to run again after a lost connection
        db.upsert(conn, schema.snapshots, row, keys=("snapshot_id",), update=())
        conn.execute(update(schema.pipeline_runs).where(schema.pipeline_runs.c.run_id == ctx.run_id)
                     .values(snapshot_id=m["snapshot_id"]))

    db.transaction(write, what=f"record snapshot {m['snapshot_id']}")


def clean(ctx: StepContext, raw: dict, uri: str | None = None) -> chatml.PrepResult:
    try:
        result = chatml.prepare(read_raw_files(raw), ctx.config.data)
    except chatml.SchemaError as exc:
        raise StepError(str(exc)) from exc
    if result.rows_kept == 0:
        per_file = ", ".join(f"{name}: {st['rows_in']} rows, {st['quarantined']} quarantined"
                             for name, st in sorted(result.per_file.items()))
        raise StepError(f"no usable rows in {raw['n_objects']} raw file(s) ({per_file}): {result.rows_quarantined} "
                        f"quarantined ({result.reasons}); nothing written{f' to {uri}' if uri else ''}")
    return result


def prepare(ctx: StepContext, raw: dict, sid: str, uri: str, result: chatml.PrepResult | None = None,
            fb: feedback.FeedbackResult | None = None) -> dict:
    m = write_snapshot(sid, uri, result or clean(ctx, raw, uri), ctx, raw, fb)
    log.info("prepared snapshot %s: rows_in=%d kept=%d quarantined=%d sampled_out=%d -> train=%d validation=%d "
             "test=%d", sid, m["rows_in"], m["rows_kept"], m["rows_quarantined"], m["rows_sampled_out"],
             m["n_train"], m["n_validation"], m["n_test"])
    for reason, n in sorted(m["quarantine_reasons"].items()):
        log.info("quarantined %d row(s) with reason %s", n, reason)
    if fb is not None:
        log.info("train has %d raw + %d feedback records; %d thumbs-down replies in review.jsonl, %d prompts in the "
                 "live eval set live.jsonl", m["n_train"] - m["n_train_feedback"], m["n_train_feedback"],
                 m["n_review"], m["n_live"])
    return m


def run(ctx: StepContext) -> dict:
    cfg = ctx.config
    raw = s3.get_json(ctx.require_input("raw_manifest"))
    result, fb = None, None
    if cfg.data.include_feedback:
        result = clean(ctx, raw)
        fb = feedback.collect(cfg.data, result.splits)
        log.info("%s", feedback.describe(fb.counts))
    sid = snapshot_id(raw["digest"], cfg.data, fb and fb.digest)
    uri = s3.join(f"s3://{cfg.storage.bucket}", cfg.storage.snapshot_prefix, sid)
    if existing := existing_snapshot(sid):
        # Where it was written, which need not be this run's snapshot prefix (storage.* is not part of the id).
        uri = existing["uri"]
        log.info("snapshot %s already prepared by run %s from the same raw data and settings; reusing it (%s)",
                 sid, existing["created_by_run"], uri)
        m = s3.get_json(s3.join(uri, "manifest.json"))
    else:
        m = prepare(ctx, raw, sid, uri, result, fb)
    config_hash = cfg.section_hash(*TRAINING_SECTIONS)
    record(ctx, m, cfg.section_hash("data"))
    release = last_release()
    unchanged = bool(release and release["snapshot_id"] == sid and release["config_hash"] == config_hash)
    return {"snapshot_id": sid, "snapshot_uri": uri, "reused": bool(existing), "config_hash": config_hash,
            "unchanged_since_release": unchanged, "last_release": release,
            **{k: m[k] for k in ("rows_in", "rows_kept", "rows_quarantined", "n_train", "n_validation", "n_test")},
            **({"feedback": m["feedback"], "n_train_feedback": m["n_train_feedback"], "n_live": m["n_live"]}
               if "feedback" in m else {})}
