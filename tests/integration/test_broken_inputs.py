"""Data safety: a generated corpus of broken inputs through the real sync_raw_data and prepare_chatml steps.

Every file either fails the step with an error naming it, or reconciles rows_in = rows_kept + rows_quarantined with
a reason per quarantined row; every input row is found in exactly one place (a split or the quarantine), checked
against the objects the step wrote, not only against its counters. The corpus is tests/chaos/broken_corpus.py.
"""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest
from sqlalchemy import select

from tasks.config import DataConfig
from tasks.data import chatml
from tasks.io import db, s3, schema
from tests.chaos.broken_corpus import build
from tests.conftest import run_step

pytestmark = pytest.mark.integration

CORPUS = build(seed=7)


def upload(prefix: str, files: dict[str, bytes]) -> str:
    source = f"s3://ecb-landing/{prefix}/"
    for name, data in files.items():
        s3.put_bytes(source + name, data)
    return source


def lines(uri: str) -> list[dict]:
    return [json.loads(x) for x in s3.get_bytes(uri).decode("utf-8").splitlines()]


@pytest.mark.parametrize("name", sorted(CORPUS.unusable()))
def test_each_unusable_file_fails_alone_naming_itself(name):
    with pytest.raises(chatml.SchemaError) as exc:
        chatml.prepare([(name, CORPUS.files[name])], DataConfig())
    assert str(exc.value).startswith(f"{name}: ") and CORPUS.expected[name].error in str(exc.value)


def test_broken_corpus_through_the_steps(services, uid):
    started = time.monotonic()
    # data.seed is part of the snapshot id: a seed of its own makes this run prepare the corpus, never reuse a
    # snapshot an earlier session left in the same stack (counts and quarantine do not depend on the seed).
    common = ["--set", f"storage.raw_prefix=raw-broken-{uid}/", "--set", f"storage.snapshot_prefix=snap-broken-{uid}/",
              "--set", f"data.seed={int(uid[:7], 16)}"]

    # 1. Everything at once: the step fails, and its error names every unusable file (and only those).
    source = upload(f"broken-all-{uid}", CORPUS.files)
    sync = json.loads(run_step("sync_raw_data", f"all-{uid}", "--set", f"data.source={source}", *common)
                      .stdout.splitlines()[-1])
    assert (sync["n_objects"], sync["n_ignored"]) == (len(CORPUS.expected), len(CORPUS.ignored))
    assert s3.get_json(sync["manifest_uri"])["ignored"] == CORPUS.ignored
    r = run_step("prepare_chatml", f"all-{uid}", "--set", f"data.source={source}", *common,
                 "--input", f"raw_manifest={sync['manifest_uri']}", check=False)
    assert r.returncode == 2 and r.stdout == ""
    assert f"{len(CORPUS.unusable())} of {len(CORPUS.expected)} raw files are unusable" in r.stderr
    for name, expect in CORPUS.expected.items():
        if expect.error:
            assert f"{name}: " in r.stderr and expect.error in r.stderr, name
        else:
            assert f"{name}: " not in r.stderr, name
    assert "Traceback" not in r.stderr

    # 2. The usable files (what an operator keeps after reading that error): a snapshot that accounts for every row.
    source = upload(f"broken-usable-{uid}", {**CORPUS.usable(), **{n: CORPUS.files[n] for n in CORPUS.ignored}})
    sync = json.loads(run_step("sync_raw_data", f"usable-{uid}", "--set", f"data.source={source}", *common)
                      .stdout.splitlines()[-1])
    r = run_step("prepare_chatml", f"usable-{uid}", "--set", f"data.source={source}", *common,
                 "--input", f"raw_manifest={sync['manifest_uri']}")
    m = json.loads(r.stdout.splitlines()[-1])
    assert m["reused"] is False
    totals = CORPUS.totals()
    assert (m["rows_in"], m["rows_kept"], m["rows_quarantined"]) == \
        (totals["rows_in"], totals["rows_kept"], totals["rows_quarantined"]) == (192, 155, 37)

    manifest = s3.get_json(s3.join(m["snapshot_uri"], "manifest.json"))
    assert manifest["rows_sampled_out"] == 0
    assert manifest["per_file"] == {name: {"rows_in": e.rows_in, "kept": e.kept, "quarantined": len(e.quarantined),
                                           "sampled_out": 0}
                                    for name, e in CORPUS.expected.items() if e.error is None}

    # Every quarantined row is the planted one, with the planted reason and a detail.
    quarantine = lines(s3.join(m["snapshot_uri"], "quarantine.jsonl"))
    got = {(q["source"], q["row"]): q["reason"] for q in quarantine}
    want = {(name, row): reason for name, e in CORPUS.expected.items() if e.error is None
            for row, reason in e.quarantined.items()}
    assert got == want and len(quarantine) == len(want)
    assert all(q["reason"] in chatml.REASONS and q["detail"] for q in quarantine)
    assert manifest["quarantine_reasons"] == dict(sorted(Counter(want.values()).items()))
    assert max(len(json.dumps(q["raw"])) for q in quarantine) < 2 * chatml.RAW_FIELD_LIMIT + 200  # raw is capped

    # Zero rows unaccounted for: kept (source, row) pairs plus quarantined ones are exactly 1..rows_in of each file.
    splits = {s: lines(s3.join(m["snapshot_uri"], f"{s}.jsonl")) for s in chatml.SPLITS}
    kept = [(rec["source"], rec["row"]) for rows in splits.values() for rec in rows]
    assert len(kept) == len(set(kept)) == m["rows_kept"]
    assert not set(kept) & set(got)
    for name, e in CORPUS.expected.items():
        if e.error is None:
            assert sorted(row for src, row in [*kept, *got] if src == name) == e.rows, name

    # What reached the training data is clean: no control tokens, no markup, no NUL, no script content.
    texts = [msg["content"] for rows in splits.values() for rec in rows for msg in rec["messages"][1:]]
    assert not [t for t in texts if chatml.control_tokens(t)]
    assert not [t for t in texts if "<script" in t or "<p>" in t or "<br" in t or "\x00" in t or "alert(" in t]
    assert any("is 3 < 4 and does the <Order> tab | list | work?" in t for t in texts)  # near misses are kept
    assert any("Café ¡Hola!" in t for t in texts) and any("😀👨\u200d👩\u200d👧" in t for t in texts)

    with db.engine().connect() as conn:
        row = conn.execute(select(schema.snapshots).where(schema.snapshots.c.snapshot_id == m["snapshot_id"])).one()
    assert (row.rows_in, row.rows_kept, row.rows_quarantined) == (192, 155, 37)
    print(f"\nbroken corpus: {json.dumps(totals)} reasons={manifest['quarantine_reasons']} "
          f"per_file={json.dumps(manifest['per_file'])} took {time.monotonic() - started:.1f}s")
