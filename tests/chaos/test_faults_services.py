"""Faults in the real services under the data steps: SeaweedFS killed for 10 s mid-step, PostgreSQL restarted
mid-step and mid-transaction, a bucket or the state folder not writable.

Each fault is injected into the real server process of the test stack (SIGKILL to the `weed server` process group,
`pg_ctl stop -m fast`), at the moment the step logs a chosen line; nothing is patched. The steps must ride out the
outage with their own retries (botocore standard retries in tasks/io/s3.py, db.transaction in tasks/io/db.py) and leave
exactly what an undisturbed run leaves.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
import time

import pytest
from sqlalchemy import func, select, text

from tasks.demo import datagen
from tasks.devstack import stack
from tasks.io import db, s3, schema
from tests.conftest import REPO, SETTINGS, step_manifest

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

OUTAGE_S = 10


def source_files() -> dict[str, bytes]:
    return {f"part-{i}.csv": datagen.to_csv_bytes(datagen.generate_rows(150, seed=300 + i)) for i in range(6)}


def fresh_snapshot(uid: str) -> list[str]:
    """A data.seed of the test's own: the seed is part of the snapshot id, so prepare_chatml really prepares instead
    of reusing a snapshot that an earlier session left in the same stack."""
    return ["--set", f"data.seed={int(uid[:7], 16)}"]


def objects_under(*prefixes: str) -> dict[str, tuple[int, str]]:
    """key -> (size, sha256) of every object under the s3:// prefixes."""
    out = {}
    for prefix in prefixes:
        bucket = s3.split_uri(prefix)[0]
        for o in s3.list_objects(prefix):
            data = s3.get_bytes(f"s3://{bucket}/{o['key']}")
            out[f"{bucket}/{o['key']}"] = (len(data), hashlib.sha256(data).hexdigest())
    return out


def delete_under(*prefixes: str) -> None:
    for prefix in prefixes:
        bucket = s3.split_uri(prefix)[0]
        keys = [{"Key": o["key"]} for o in s3.list_objects(prefix)]
        if keys:
            s3.client().delete_objects(Bucket=bucket, Delete={"Objects": keys})
    assert not objects_under(*prefixes)


def count(table, **where) -> int:
    cond = [getattr(table.c, k) == v for k, v in where.items()]
    with db.engine().connect() as conn:
        return conn.execute(select(func.count()).select_from(table).where(*cond)).scalar()


def result_of(step) -> dict:
    r = step.wait()
    assert r.returncode == 0, f"{step.step} failed under the fault:\n{r.stderr[-4000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def without(d: dict, *keys: str) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


# --------------------------------------------------------------------------------------------------- S3


def test_s3_killed_for_10s_during_sync_and_prepare(services, uid, seaweedfs, background_step):
    source = f"s3://ecb-landing/s3chaos-{uid}/"
    for name, data in source_files().items():
        s3.put_bytes(source + name, data)
    raw, snap = f"raw-s3chaos-{uid}/", f"snap-s3chaos-{uid}/"
    common = ["--set", f"data.source={source}", "--set", f"storage.raw_prefix={raw}",
              "--set", f"storage.snapshot_prefix={snap}", *fresh_snapshot(uid)]
    outputs = [f"s3://ecb-platform/{raw}", f"s3://ecb-platform/{snap}"]

    # The undisturbed run.
    calm_sync = step_manifest("sync_raw_data", f"calm-{uid}", *common)
    calm_prep = step_manifest("prepare_chatml", f"calm-{uid}", *common,
                              "--input", f"raw_manifest={calm_sync['manifest_uri']}")
    assert calm_prep["reused"] is False
    calm_objects = objects_under(*outputs)
    calm_snapshot_manifest = s3.get_json(s3.join(calm_prep["snapshot_uri"], "manifest.json"))
    assert len(calm_objects) == 6 + 1 + 6  # raw files, raw manifest; 3 splits, quarantine, config, manifest
    delete_under(*outputs)  # the disturbed run has to do everything again

    # The same steps with S3 killed for 10 s in the middle of each: after the first copy, and after prep has
    # read its input (so every write of the snapshot meets the outage).
    t0 = time.monotonic()
    sync = background_step("sync_raw_data", f"storm-{uid}", *common)
    sync.on_line("copied s3://", lambda: seaweedfs.outage(OUTAGE_S))
    storm_sync = result_of(sync)
    sync_s = time.monotonic() - t0
    t0 = time.monotonic()
    prep = background_step("prepare_chatml", f"storm-{uid}", *common,
                           "--input", f"raw_manifest={storm_sync['manifest_uri']}")
    prep.on_line("read 6 raw file(s)", lambda: seaweedfs.outage(OUTAGE_S))
    storm_prep = result_of(prep)
    prep_s = time.monotonic() - t0

    assert seaweedfs.kills == 2 and min(seaweedfs.outage_s) >= OUTAGE_S
    assert sync_s > OUTAGE_S and prep_s > OUTAGE_S  # the steps really waited the outage out
    assert sync.stderr.count("copied s3://") == 6
    failed_attempts = [x for x in sync.stderr.splitlines() + prep.stderr.splitlines() if "failed (attempt" in x]
    assert failed_attempts, "no S3 call met the outage"
    # Same objects, byte for byte (raw copies, the raw manifest, splits, quarantine, config, snapshot manifest
    # except the run that created it), same step manifests, same rows.
    storm_objects = objects_under(*outputs)
    snap_manifest_key = s3.split_uri(s3.join(calm_prep["snapshot_uri"], "manifest.json"))
    snap_manifest_key = f"{snap_manifest_key[0]}/{snap_manifest_key[1]}"
    assert without(storm_objects, snap_manifest_key) == without(calm_objects, snap_manifest_key)
    storm_snapshot_manifest = s3.get_json(s3.join(storm_prep["snapshot_uri"], "manifest.json"))
    assert storm_snapshot_manifest["created_by_run"] == f"storm-{uid}"
    assert without(storm_snapshot_manifest, "created_by_run") == without(calm_snapshot_manifest, "created_by_run")
    assert without(storm_sync, "run_id") == without(calm_sync, "run_id")
    assert without(storm_prep, "run_id") == without(calm_prep, "run_id")
    assert storm_prep["reused"] is False and storm_prep["rows_in"] == 900
    assert s3.get_bytes(f"s3://ecb-platform/runs/storm-{uid}/config.json") == \
        s3.get_bytes(f"s3://ecb-platform/runs/calm-{uid}/config.json")
    for run in (f"calm-{uid}", f"storm-{uid}"):
        assert count(schema.raw_manifests, run_id=run) == count(schema.pipeline_runs, run_id=run) == 1
    assert count(schema.snapshots, snapshot_id=calm_prep["snapshot_id"]) == 1
    print(f"\nS3 outages survived: {seaweedfs.kills} (down {', '.join(f'{s:.1f}' for s in seaweedfs.outage_s)} s); "
          f"sync took {sync_s:.1f} s, prepare {prep_s:.1f} s; {len(failed_attempts)} failed S3 attempts retried; "
          f"{len(storm_objects)} objects identical")


# --------------------------------------------------------------------------------------------------- PostgreSQL


def test_postgres_restart_mid_transaction_reruns_it_once(services, uid, postgres):
    table = f"chaos_tx_{uid}"
    with db.engine().begin() as conn:
        conn.execute(text(f"CREATE TABLE {table} (n integer NOT NULL)"))  # no key: a double write would show
    attempts = []
    in_flight = threading.Event()

    def write(conn):
        attempts.append(time.monotonic())
        conn.execute(text(f"INSERT INTO {table} SELECT generate_series(1, 500)"))
        in_flight.set()
        conn.execute(text("SELECT pg_sleep(3)"))  # the restart lands here, inside the open transaction
        conn.execute(text(f"INSERT INTO {table} SELECT generate_series(501, 1000)"))
        return "done"

    restarter = threading.Thread(target=lambda: (in_flight.wait(30), postgres.restart(down_s=3)))
    restarter.start()
    try:
        assert db.transaction(write, what="chaos transaction") == "done"
    finally:
        restarter.join(60)
    assert postgres.restarts == 1 and len(attempts) >= 2
    with db.engine().connect() as conn:
        n, total = conn.execute(text(f"SELECT count(*), sum(n) FROM {table}")).one()
        conn.execute(text(f"DROP TABLE {table}"))
        conn.commit()
    assert (n, total) == (1000, 1000 * 1001 // 2)  # every row once: the lost attempt left nothing behind
    print(f"\nPostgreSQL restarted mid-transaction: {len(attempts)} attempts, {n} rows, none lost or doubled")


def test_postgres_restarted_during_sync_and_prepare(services, uid, postgres, background_step):
    source = f"s3://ecb-landing/pgchaos-{uid}/"
    for name, data in source_files().items():
        s3.put_bytes(source + name, data)
    common = ["--set", f"data.source={source}", "--set", f"storage.raw_prefix=raw-pgchaos-{uid}/",
              "--set", f"storage.snapshot_prefix=snap-pgchaos-{uid}/", *fresh_snapshot(uid)]
    run = f"pg-{uid}"
    # Postgres goes down while the step copies files, and comes back 5 s later; the step's only write to it,
    # the manifest record, is attempted while it is down.
    sync = background_step("sync_raw_data", run, *common)
    sync.on_line("copied s3://", lambda: postgres.restart(down_s=5))
    synced = result_of(sync)
    prep = background_step("prepare_chatml", run, *common, "--input", f"raw_manifest={synced['manifest_uri']}")
    # prep has already looked up the snapshot on a pooled connection; the restart kills that connection.
    prep.on_line("read 6 raw file(s)", lambda: postgres.restart(down_s=5))
    prepared = result_of(prep)
    assert postgres.restarts == 2
    retried = [line for line in sync.stderr.splitlines() + prep.stderr.splitlines() if "retrying in" in line]
    assert retried, "the steps never met the outage"
    with db.engine().connect() as conn:
        rm = conn.execute(select(schema.raw_manifests).where(schema.raw_manifests.c.run_id == run)).one()
        pr = conn.execute(select(schema.pipeline_runs).where(schema.pipeline_runs.c.run_id == run)).one()
        sn = conn.execute(select(schema.snapshots)
                          .where(schema.snapshots.c.snapshot_id == prepared["snapshot_id"])).all()
    assert (rm.digest, rm.n_objects, rm.n_copied) == (synced["digest"], 6, 6)
    assert pr.snapshot_id == prepared["snapshot_id"]
    assert len(sn) == 1 and (sn[0].rows_in, sn[0].rows_kept) == (prepared["rows_in"], prepared["rows_kept"])
    assert prepared["rows_in"] == 900 and prepared["reused"] is False
    print(f"\nPostgreSQL restarts survived by the steps: {postgres.restarts}; retries logged: {len(retried)}; "
          "rows: 1 raw_manifests, 1 pipeline_runs, 1 snapshots")


# --------------------------------------------------------------------------------------------------- not writable


def weed_shell(*commands: str) -> str:
    r = subprocess.run([str(stack.BIN / "weed"), "shell", f"-master=127.0.0.1:{SETTINGS['master_port']}",
                        f"-filer=127.0.0.1:{SETTINGS['filer_port']}"], input="\n".join([*commands, "exit", ""]),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout


def run_sync(run_id: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import sys

    return subprocess.run([sys.executable, "-m", "tasks", "sync_raw_data", "--run-id", run_id, *args],
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=REPO, timeout=300)


def assert_clear_failure(r: subprocess.CompletedProcess, *phrases: str) -> str:
    line = next((x for x in r.stderr.splitlines() if "step sync_raw_data failed:" in x), "")
    assert r.returncode == 2 and r.stdout == "", r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    for phrase in phrases:
        assert phrase in line, (phrase, line)
    return line


def test_bucket_not_writable_fails_naming_it(services, uid):
    source = f"s3://ecb-landing/rochaos-{uid}/"
    s3.put_bytes(source + "a.csv", datagen.to_csv_bytes(datagen.generate_rows(20, seed=9)))
    common = ["--set", f"data.source={source}", "--set", f"storage.raw_prefix=raw-rochaos-{uid}/"]
    errors = []

    # 1. Credentials that may read and list but not write (a real SeaweedFS identity): AccessDenied, no retries.
    user, key, secret = f"ro{uid}", f"RO{uid.upper()}KEY", f"ro-secret-{uid}-0123456789"
    weed_shell(f"s3.configure -user={user} -access_key={key} -secret_key={secret} -actions=Read,List -apply")
    try:
        env = {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}
        r = run_sync(f"ro-{uid}", *common, env=env)
        for _ in range(20):  # the S3 gateway picks new identities up from the filer within a few seconds
            if "InvalidAccessKeyId" not in r.stderr:
                break
            time.sleep(1)
            r = run_sync(f"ro-{uid}", *common, env=env)
        errors.append(assert_clear_failure(r, f"s3://ecb-platform/raw-rochaos-{uid}/a.csv",
                                           "bucket ecb-platform is not writable with these credentials",
                                           "AccessDenied"))
    finally:
        weed_shell(f"s3.configure -user={user} -delete -apply")

    # 2. A bucket made read-only on the server (filer path config). SeaweedFS answers 500, which is retried like any
    #    5xx; with 3 attempts the step gives up quickly and names the object it could not write.
    bucket = f"ecb-ro-{uid}"
    s3.ensure_bucket(bucket)
    weed_shell(f"fs.configure -locationPrefix=/buckets/{bucket}/ -readOnly -apply")
    try:
        r = run_sync(f"ro2-{uid}", *common, "--set", f"storage.bucket={bucket}", "--set", "storage.s3_max_attempts=3")
        errors.append(assert_clear_failure(r, f"s3://{bucket}/raw-rochaos-{uid}/a.csv", "InternalError 3 times",
                                           f"is bucket {bucket} read-only or full?"))
    finally:
        weed_shell(f"fs.configure -locationPrefix=/buckets/{bucket}/ -delete -apply")

    # 3. A bucket that does not exist.
    r = run_sync(f"ro3-{uid}", *common, "--set", f"storage.bucket=ecb-missing-{uid}")
    errors.append(assert_clear_failure(r, f"bucket ecb-missing-{uid} does not exist"))
    print("\n" + "\n".join(errors))


def test_state_folder_not_writable_fails_naming_it(tmp_path):
    """`ecb stack up` as root without CAP_DAC_OVERRIDE (so file modes apply, as for any other user)."""
    ro = tmp_path / "state"
    ro.mkdir()
    ro.chmod(0o555)
    base_env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", str(stack.BIN / "ecb"), "stack", "up",
           "--no-airflow", "--no-mlflow"]
    lines = []
    for folder in (ro, ro / "nested"):  # the folder itself read-only; a folder that cannot be created
        r = subprocess.run(cmd, env={**base_env, "ECB_STATE_DIR": str(folder)}, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert f"error: state folder {folder} is not writable (Permission denied" in r.stderr, r.stderr
        lines.append(r.stderr.strip())
    assert not any(ro.iterdir())
    print("\n" + "\n".join(lines))


def test_s3_that_never_comes_back_fails_naming_the_object(uid):
    """Nothing listening on the endpoint at all: the step retries for storage.s3_retry_s, then names what it tried."""
    port = stack.free_port()
    t0 = time.monotonic()
    r = run_sync(f"gone-{uid}", "--set", f"data.source=s3://ecb-landing/gone-{uid}/", "--set", "storage.s3_retry_s=4",
                 "--set", "storage.s3_max_attempts=2", env={"ECB_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
    took = time.monotonic() - t0
    line = assert_clear_failure(r, "cannot check bucket s3://ecb-platform", "S3 unreachable for", f"127.0.0.1:{port}")
    assert 4 <= took < 60, took
    print(f"\n{line} ({took:.1f} s)")
