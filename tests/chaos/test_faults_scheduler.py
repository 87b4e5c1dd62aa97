"""Faults through the real Airflow stack (api-server, scheduler, dag-processor, triggerer; LocalExecutor):

1. The scheduler is SIGKILLed (its whole process group: scheduler, executor workers, task supervisors) while
   `finetune` runs, and started again: the run completes, every step ran, and no task ever had two processes at
   once (a monitor samples the step processes every 0.25 s; Airflow's try history agrees).
2. Secrets canary: the same run has a planted Hugging Face token (`hf_CANARY...`, the connection
   `huggingface_default`, pushing to the local Hub endpoint tests/hub_server.py) and the stack's generated S3
   secret and PostgreSQL password; afterwards none of them is in the task logs, the service logs, the step
   manifests (XCom, rendered fields, S3 objects of the run), the platform rows, MLflow (params, tags, metrics,
   artifacts, registered version) or the files committed to the Hub (model card included).

Small settings: the test config (tests/ecb_test_config.yaml), the tiny base model, HPO off, 40 fine-tune steps.
The stack's processes get shorter failure-detection settings than Airflow's defaults (see FAST_RECOVERY) so the
recovery takes about a minute instead of five.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tasks.config import load_config
from tasks.demo import datagen
from tasks.devstack import stack
from tasks.io import db, s3, schema
from tests.chaos.faults_pipeline import iter_files, kill_group, scan_for, scan_texts, wait_until
from tests.conftest import SETTINGS
from tests.hub_server import HubServer

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.timeout(2700)]

DAG_ID = "ecommerce_chatbot_training"
# Failure detection after a scheduler crash (Airflow defaults in brackets): a scheduler job is dead after 10 s
# without heartbeat [30], its orphaned task instances are looked for every 15 s [300], and a task instance that
# stopped heartbeating is failed (and retried) after 60 s [300]. Manual runs only (no @daily run in between).
FAST_RECOVERY = {
    "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD": "10",
    "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "15",
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "60",
    "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
}


# A step process of the killed try must be gone this soon after the kill: well inside the 10 s after which the
# restarted scheduler may declare the old one dead and retry its tasks.
ORPHAN_GRACE_S = 5.0


class StepMonitor:
    """Samples `python -m tasks <step> --run-id <run>` processes: pid -> [step, start, last seen alive]."""

    def __init__(self, run_id: str, every: float = 0.25):
        self.run_id, self.every = run_id, every
        self.procs: dict[int, list] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        import psutil

        while not self._stop.is_set():
            now = time.time()
            for p in psutil.process_iter(["pid", "cmdline", "create_time"]):
                cmd = p.info["cmdline"] or []
                if "tasks" in cmd and "--run-id" in cmd and self.run_id in cmd:
                    i = cmd.index("tasks")
                    entry = self.procs.setdefault(p.info["pid"], [cmd[i + 1], p.info["create_time"], now])
                    entry[2] = now
            self._stop.wait(self.every)

    def alive(self) -> dict[int, str]:
        import psutil

        return {pid: e[0] for pid, e in self.procs.items() if psutil.pid_exists(pid)}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def overlaps(self) -> list[tuple]:
        """Pairs of processes of the same step that were alive at the same time."""
        by_step: dict[str, list] = {}
        for pid, (name, start, last) in self.procs.items():
            by_step.setdefault(name, []).append((start, last, pid))
        out = []
        for name, spans in by_step.items():
            spans.sort()
            out += [(name, a, b) for a, b in zip(spans, spans[1:], strict=False) if b[0] < a[1]]
        return out


@pytest.fixture
def hub(monkeypatch, uid):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with HubServer(token=f"hf_CANARY{uid}x7Kq2Zp9Lw4Rt8Yb") as server:
        yield server


@pytest.fixture
def airflow_stack(services, mlflow_server, hub, monkeypatch):
    """The real Airflow services of the embedded stack, with the Hub connection holding the canary token."""
    conn = {"conn_type": "generic", "password": hub.token, "extra": {"endpoint": hub.url}}
    for key, value in {**FAST_RECOVERY, "AIRFLOW_CONN_HUGGINGFACE_DEFAULT": json.dumps(conn),
                       "HF_HUB_OFFLINE": "0"}.items():
        monkeypatch.setenv(key, value)
    stack.airflow_up(SETTINGS)
    engine = create_engine(stack.db_url(SETTINGS, "airflow").replace("postgresql://", "postgresql+psycopg2://", 1))
    yield engine
    for proc in (*stack.AIRFLOW_PROCS.values(), getattr(stack, "CHAT", None)):  # CHAT: deploy_chat_service's
        if proc is not None:
            proc.stop(timeout=20)
    engine.dispose()


def q(engine, sql: str, **params) -> list:
    with engine.connect() as c:
        return list(c.execute(text(sql), params).mappings())


def tries(engine, run_id: str) -> list[dict]:
    """Every try of every task instance of the run: the history table plus the current row."""
    cols = "task_id, map_index, try_number, state, start_date, end_date, pid, hostname"
    sql = f"SELECT {cols} FROM {{t}} WHERE dag_id = :d AND run_id = :r"
    return [dict(r) for t in ("task_instance_history", "task_instance")
            for r in q(engine, sql.format(t=t), d=DAG_ID, r=run_id)]


def test_scheduler_killed_mid_run_recovers_and_no_secret_leaks(airflow_stack, hub, tiny_base_model, uid, tmp_path):
    engine, run_id = airflow_stack, f"chaos-sched-{uid}"
    name, repo_id = f"chaos-sched-{uid}", f"chaos/support-{uid}"
    src = tmp_path / "landing"
    src.mkdir()
    datagen.write_csv(datagen.generate_rows(400, seed=31), src / "demo.csv")
    conf = {"data.source": str(src), "model.base_model": str(tiny_base_model), "hpo.enabled": False,
            "release.registered_model": name, "release.hub_repo_id": repo_id, "training.max_steps": 40,
            "training.checkpoint_every": 10, "eval.max_examples": 40}
    wait_until(lambda: q(engine, "SELECT 1 FROM dag WHERE dag_id = :d", d=DAG_ID), "the DAG to be parsed", 300, 2)
    monitor = StepMonitor(run_id)
    t0 = time.monotonic()
    r = stack.airflow_cli(SETTINGS, "dags", "trigger", DAG_ID, "--run-id", run_id, "--conf", json.dumps(conf),
                          check=False)
    assert r.returncode == 0, r.stderr[-2000:]

    # Kill 1: the fine-tune (a step that logs every second) has written its first checkpoint.
    ckpt = f"s3://ecb-platform/runs/{run_id}/finetune/checkpoint/meta.json"
    wait_until(lambda: s3.head(ckpt) or run_state(engine, run_id) in ("success", "failed"),
               "the fine-tune's first checkpoint", 1200, 1)
    kills = [kill_and_restart(engine, run_id, monitor, "finetune after its first checkpoint")]
    # Kill 2: register_model has copied the adapter into the pyfunc model (MLflow's "Downloading artifacts" bar) and
    # is now silent for tens of seconds (requirements inference, upload): its task runner, blocked on the step's
    # output, has no line to write that would tell it its supervisor is gone.
    wait_until(lambda: "Downloading artifacts" in task_log(run_id, "register_model")
               or run_state(engine, run_id) in ("success", "failed"), "register_model to log the model", 1200, 0.2)
    kills.append(kill_and_restart(engine, run_id, monitor, "register_model while it logs the model"))

    state = wait_until(lambda: run_state(engine, run_id) in ("success", "failed") and run_state(engine, run_id),
                       "the run to finish after the scheduler restarts", 1800, 3)
    t_total = time.monotonic() - t0
    time.sleep(1)
    monitor.stop()
    all_tries = tries(engine, run_id)
    final = {t["task_id"]: t for t in q(engine, "SELECT task_id, state, try_number FROM task_instance "
                                                "WHERE dag_id = :d AND run_id = :r", d=DAG_ID, r=run_id)}
    print(f"\nSCHEDULER-KILL: run {state} after {len(kills)} scheduler kills, {t_total:.0f}s in all")
    for k in kills:
        k["lived"] = {f"{step} {pid}": round(monitor.procs[pid][2] - k["t"], 1) for pid, step in k["alive"].items()}
        print(f"  kill at {k['at']} ({k['what']}): scheduler pid {k['pid']}, running tasks {k['running']}; the "
              f"killed try's step process lived on for (s): {k['lived']}")
    for t in sorted(all_tries, key=lambda t: (t["task_id"], t["try_number"])):
        print(f"  {t['task_id']:24s} try {t['try_number']} {t['state']!s:9s} {t['start_date']} -> {t['end_date']}")
    for pid, (step, start, last) in sorted(monitor.procs.items(), key=lambda kv: kv[1][1]):
        print(f"  step process {pid} {step:20s} {time.strftime('%H:%M:%S', time.gmtime(start))} .. "
              f"{time.strftime('%H:%M:%S', time.gmtime(last))} UTC")
    assert state == "success", final
    assert final["register_model"]["state"] == "success" and final["push_to_hub"]["state"] == "success"

    # The secrets canary first: it needs only the finished run, so its figure exists whatever the checks below say.
    check_no_canary(engine, hub, run_id, name, repo_id)

    # No task instance ran twice at once. First the invariant that makes it hold whatever the timing: every step
    # process of a try whose scheduler was killed is gone within ORPHAN_GRACE_S, before the restarted scheduler can
    # consider the old scheduler dead (SCHEDULER_HEALTH_CHECK_THRESHOLD) and hand the task to a new try.
    late = {k["what"]: k["lived"] for k in kills if any(v > ORPHAN_GRACE_S for v in k["lived"].values())}
    assert not late, (
        f"a killed try's step outlived its scheduler by more than {ORPHAN_GRACE_S}s: {late}. Its task runner runs in "
        "its own process group, so it survives the scheduler and its supervisor, and it keeps the step running until "
        "the step's next output line hits the closed log socket; meanwhile the restarted scheduler retries the task")
    # Then what actually happened: no two processes of one step alive at once, and Airflow's record of the tries.
    # (Airflow's own record can look clean while processes overlapped: the killed try is marked failed when the
    # new scheduler resets it, whether or not its orphaned task runner and step still run.)
    assert monitor.overlaps() == [], (
        "a step ran twice at once: the killed try's task runner (own process group, so it outlives the scheduler "
        "and its supervisor) kept its step running until the step's next output line, while the new scheduler had "
        f"already started the next try: {monitor.overlaps()}")
    for (task, mi), spans in group_tries(all_tries).items():
        numbers = [s["try_number"] for s in spans]
        assert len(numbers) == len(set(numbers)), (task, numbers)
        timed = sorted((s for s in spans if s["start_date"]), key=lambda s: s["start_date"])
        for a, b in zip(timed, timed[1:], strict=False):
            assert a["end_date"] and a["end_date"] <= b["start_date"], (task, mi, a, b)
    # The fine-tune that the crash interrupted was retried and resumed from its checkpoint.
    ft_logs = sorted(log_dir(run_id).glob("task_id=finetune/attempt=*.log"))
    assert len(ft_logs) >= 2, ft_logs
    assert "resuming from checkpoint at step" in ft_logs[-1].read_text(errors="replace")
    # The register_model that the second crash interrupted registered one version, not one per process.
    from mlflow.tracking import MlflowClient

    assert [v.tags.get("ecb.run_id") for v in MlflowClient().search_model_versions(f"name = '{name}'")] == [run_id]


def kill_and_restart(engine, run_id: str, monitor: StepMonitor, what: str) -> dict:
    """SIGKILL the scheduler's process group while the run is running, start it again 5 s later."""
    assert run_state(engine, run_id) == "running", f"the run ended before the kill ({what})"
    running = [r["task_id"] for r in q(engine, "SELECT task_id FROM task_instance WHERE dag_id = :d AND run_id = :r "
                                               "AND state = 'running'", d=DAG_ID, r=run_id)]
    t_kill = time.time()
    pid = kill_group(stack.AIRFLOW_PROCS["scheduler"])
    alive = monitor.alive()
    at = time.strftime("%H:%M:%S", time.gmtime(t_kill))
    time.sleep(5)  # a process supervisor's restart delay
    stack.AIRFLOW_PROCS["scheduler"].start([str(stack.BIN / "airflow"), "scheduler"], stack.process_env(SETTINGS))
    return {"what": what, "at": at, "t": t_kill, "pid": pid, "running": running, "alive": alive}


def task_log(run_id: str, task_id: str) -> str:
    logs = sorted(log_dir(run_id).glob(f"task_id={task_id}/attempt=*.log"))
    return logs[-1].read_text(errors="replace") if logs else ""


def run_state(engine, run_id: str) -> str | None:
    rows = q(engine, "SELECT state FROM dag_run WHERE dag_id = :d AND run_id = :r", d=DAG_ID, r=run_id)
    return rows[0]["state"] if rows else None


def group_tries(all_tries: list[dict]) -> dict:
    out: dict = {}
    for t in all_tries:
        out.setdefault((t["task_id"], t["map_index"]), []).append(t)
    return out


def log_dir(run_id: str) -> Path:
    return stack.state_dir() / "airflow" / "logs" / f"dag_id={DAG_ID}" / f"run_id={run_id}"


# --- secrets canary -----------------------------------------------------------------------------------------------


def check_no_canary(engine, hub, run_id: str, name: str, repo_id: str) -> None:
    import tempfile

    import mlflow
    from mlflow.tracking import MlflowClient

    canaries = {"hf_token": hub.token, "s3_secret": SETTINGS["s3_secret_key"], "pg_password": SETTINGS["pg_password"]}
    assert hub.token.startswith("hf_CANARY") and all(len(v) >= 16 for v in canaries.values())
    hits, scanned = [], {}

    # Task logs (every try) and the stack's service logs (Airflow's four, MLflow, SeaweedFS, PostgreSQL and the chat
    # service that deploy_chat_service starts, when it is there).
    files = [log_dir(run_id), stack.state_dir() / "logs"]
    scanned["log files"] = sum(1 for _ in iter_files(files))
    hits += scan_for(canaries.values(), files)

    # Step manifests as Airflow keeps them (XCom), the rendered template fields of every task, the run's conf.
    texts = {f"xcom {r['task_id']}/{r['key']}": str(r["value"]) for r in q(
        engine, "SELECT task_id, key, value FROM xcom WHERE dag_id = :d AND run_id = :r", d=DAG_ID, r=run_id)}
    texts |= {f"rendered {r['task_id']}": str(r["rendered_fields"]) for r in q(
        engine, "SELECT task_id, rendered_fields FROM rendered_task_instance_fields WHERE dag_id = :d AND run_id = :r",
        d=DAG_ID, r=run_id)}
    texts |= {"dag_run conf": str(q(engine, "SELECT conf FROM dag_run WHERE dag_id = :d AND run_id = :r",
                                    d=DAG_ID, r=run_id))}
    assert any(k.startswith("xcom finetune") for k in texts)
    scanned["XCom/rendered-field/conf records"] = len(texts)
    hits += scan_texts(canaries.values(), texts)

    # The platform's rows for the run.
    tables = (schema.pipeline_runs, schema.raw_manifests, schema.training_runs, schema.evaluations,
              schema.gate_decisions, schema.releases)
    with db.engine().connect() as conn:
        rows = {f"{t.name} {i}": str(dict(r)) for t in tables
                for i, r in enumerate(conn.execute(t.select().where(t.c.run_id == run_id)).mappings())}
    snapshot_id = next((json.loads(r["value"]) if isinstance(r["value"], str) else r["value"] for r in q(
        engine, "SELECT value FROM xcom WHERE dag_id = :d AND run_id = :r AND task_id = 'prepare_chatml' "
                "AND key = 'return_value'", d=DAG_ID, r=run_id)), {}).get("snapshot_id")
    assert snapshot_id and rows
    with db.engine().connect() as conn:
        rows |= {f"snapshots {snapshot_id}": str(dict(conn.execute(schema.snapshots.select().where(
            schema.snapshots.c.snapshot_id == snapshot_id)).mappings().one()))}
    scanned["platform rows"] = len(rows)
    hits += scan_texts(canaries.values(), rows)

    # Everything the run wrote to S3 (config, checkpoints, adapter, done markers, evaluation outputs) and its
    # snapshot (splits, quarantine, manifest, config).
    objects = {}
    for prefix in (f"s3://ecb-platform/runs/{run_id}/", f"s3://ecb-platform/snapshots/{snapshot_id}/"):
        for obj in s3.list_objects(prefix):
            uri = f"s3://ecb-platform/{obj['key']}"
            objects[uri] = s3.get_bytes(uri)
    assert any(u.endswith("adapter_model.safetensors") for u in objects)
    scanned["S3 objects"] = len(objects)
    hits += scan_texts(canaries.values(), objects)

    # MLflow: every run of this pipeline run (params, tags, metrics, all artifacts) and the registered versions.
    client = MlflowClient()
    exp = client.get_experiment_by_name(load_config().pipeline.mlflow_experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`ecb.run_id` = '{run_id}'")
    assert runs, "no MLflow run tagged with the pipeline run"
    ml_texts = {f"mlflow run {r.info.run_id}": json.dumps({"params": r.data.params, "tags": r.data.tags,
                                                           "metrics": r.data.metrics, "name": r.info.run_name})
                for r in runs}
    versions = client.search_model_versions(f"name = '{name}'")
    assert versions
    ml_texts |= {f"model version {v.version}": json.dumps({"tags": v.tags, "source": v.source,
                                                           "description": v.description}) for v in versions}
    hits += scan_texts(canaries.values(), ml_texts)
    with tempfile.TemporaryDirectory() as tmp:
        for r in runs:
            mlflow.artifacts.download_artifacts(run_id=r.info.run_id, dst_path=str(Path(tmp) / r.info.run_id))
        scanned["MLflow runs"], scanned["registered versions"] = len(runs), len(versions)
        scanned["MLflow artifact files"] = sum(1 for _ in iter_files([tmp]))
        assert scanned["MLflow artifact files"] > 0
        hits += scan_for(canaries.values(), [tmp])

    # The Hub: every file of every commit, the model card (README.md) included.
    hub_files = {f"hub {c['repo_id']}@{c.get('oid', i)}:{path}": data for i, c in enumerate(hub.commits)
                 for path, data in c["files"].items()}
    hub_files |= {f"hub {repo_id}@main:{path}": data for path, data in hub.files_at(repo_id).items()}
    card = hub.files_at(repo_id)["README.md"]
    assert b"BLEU" in card and len(card) > 500
    scanned["Hub files"] = len(hub_files)
    hits += scan_texts(canaries.values(), hub_files)

    print("SECRETS-CANARY: scanned " + ", ".join(f"{v} {k}" for k, v in scanned.items())
          + f" for {len(canaries)} secrets ({', '.join(canaries)}): {len(hits)} hits")
    assert hits == [], hits
