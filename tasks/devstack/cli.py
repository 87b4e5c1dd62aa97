"""``ecb``: the command for people.

    ecb stack up | down | status | wipe     manage the embedded local stack (see tasks/stack.py)
    ecb demo                                stack up, upload demo data, run the training DAG through the scheduler,
                                            then one canary cycle (a second release judged on simulated chats)
    ecb release rollback [--to V] [--reason T] [--by WHO]
                                            champion -> V (default: the 'previous' alias), chat service reloaded
    ecb config [--env]                      every config field with its default and help text; --env: the
                                            environment variables the steps read (secrets, endpoints, paths)
    ecb shell-env                           print `export ...` lines for the stack's URLs and credentials
"""

from __future__ import annotations

import argparse
import getpass
import json
import secrets
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

from tasks import env
from tasks.config import Config, ConfigError, iter_fields, load_config
from tasks.devstack import stack
from tasks.ml.gguf_import import SMOLLM2_GGUF

DAG_ID = "ecommerce_chatbot_training"


def _print_urls(s: dict) -> None:
    print(f"Airflow UI : http://localhost:{s['airflow_port']}  (local demo: no login needed)")
    print(f"MLflow UI  : http://127.0.0.1:{s['mlflow_port']}")
    print(f"S3 endpoint: {stack.s3_endpoint(s) or 'AWS'}   credentials: {stack.state_dir() / 'stack.env'}")
    print(f"Chat       : http://127.0.0.1:{s.get('chat_port', 8000)}  (deployed by the DAG's deploy_chat_service task)")
    print(f"OpenAI API : http://127.0.0.1:{s.get('chat_port', 8000)}/v1  (API key: ECB_CHAT_API_KEYS in "
          f"{stack.state_dir() / 'stack.env'})")


def cmd_stack(args) -> int:
    if args.action == "up":
        for name, where in stack.up(airflow=not args.no_airflow, mlflow=not args.no_mlflow).items():
            print(f"{name:9s} up: {where}")
        _print_urls(stack.load_settings())
    elif args.action == "down":
        print("stopped:", ", ".join(stack.down()) or "nothing was running")
    elif args.action == "status":
        print(json.dumps(stack.status(), indent=2))
    elif args.action == "wipe":
        stack.wipe()
        print(f"stopped everything and deleted {stack.state_dir()}")
    return 0


def _airflow_json(s: dict, *args: str):
    out = stack.airflow_cli(s, *args, "-o", "json").stdout
    # Airflow prints warnings on stdout too; the JSON document is the line that starts with '['.
    lines = [line for line in out.splitlines() if line.startswith(("[{", "[]"))]
    return json.loads(lines[-1]) if lines else []


def _api(s: dict, path: str, **params) -> dict:
    """GET from the local api-server's REST API (the demo stack's auth manager makes every caller an admin). The
    console polls through it: an `airflow` CLI call starts a Python process that imports Airflow, ~3 s of CPU, and
    two of them every 5 s took most of a core from the fine-tune on 2 cores."""
    url = f"http://127.0.0.1:{s['airflow_port']}/api/v2/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=30) as r:  # noqa: S310 - the local stack's api-server
        return json.loads(r.read())


def list_runs(s: dict) -> list[dict]:
    """The DAG's runs, newest first, with the CLI's key names (run_id, state, start_date, run_after)."""
    body = _api(s, f"dags/{DAG_ID}/dagRuns", order_by="-run_after", limit=100)
    return [{**r, "run_id": r["dag_run_id"]} for r in body["dag_runs"]]


def task_states(s: dict, run_id: str) -> list[dict]:
    """Task instances of a run: task_id, map_index, state."""
    path = f"dags/{DAG_ID}/dagRuns/{urllib.parse.quote(run_id, safe='')}/taskInstances"
    return _api(s, path, limit=1000)["task_instances"]


def wait_for_dag(s: dict, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _api(s, f"dags/{DAG_ID}")
            return
        except OSError:  # 404 until the dag-processor has parsed the file; refused while the api-server starts
            time.sleep(3)
    raise stack.StackError(f"the dag-processor did not register {DAG_ID} within {timeout:.0f}s; "
                           f"see {stack.state_dir() / 'logs' / 'airflow-dag-processor.log'}")


def trigger_and_wait(s: dict, conf: dict, timeout: float) -> dict:
    """Start a run of the training DAG and follow it to the end, printing its task states as they change.

    Unpausing the DAG makes the scheduler start a run of its own (the nightly schedule's latest interval, catchup
    off), and with max_active_runs=1 a triggered run would wait for it to train first: without a conf of its own the
    demo follows that run instead of queueing a second one behind it."""
    paused = _is_paused(s)
    stack.airflow_cli(s, "dags", "unpause", DAG_ID)
    run_id = None if any(conf.values()) else adopt_scheduled_run(s, wait_s=30 if paused else 0)
    if run_id:
        print(f"following {DAG_ID} run {run_id}: the scheduler started it for the DAG's nightly schedule (catchup "
              "off) when the DAG was first unpaused, so no second run is triggered", flush=True)
    else:
        runs = _airflow_json(s, "dags", "trigger", DAG_ID, "--conf", json.dumps(conf))
        run_id = runs[0]["dag_run_id"] if runs and "dag_run_id" in runs[0] else runs[0]["run_id"]
        print(f"triggered {DAG_ID} run {run_id}; waiting for the scheduler ...", flush=True)
    return follow_run(s, run_id, timeout)


def _is_paused(s: dict) -> bool:
    return bool(_api(s, f"dags/{DAG_ID}").get("is_paused", True))


def adopt_scheduled_run(s: dict, wait_s: float = 30) -> str | None:
    """A queued or running run of the DAG (the scheduler starts one right after the first unpause), looked for
    during ``wait_s`` (0: once)."""
    deadline = time.monotonic() + wait_s
    while True:
        active = active_runs(list_runs(s))
        if active:
            return active[0]["run_id"]
        if time.monotonic() >= deadline:
            return None
        time.sleep(3)


def active_runs(runs: list[dict]) -> list[dict]:
    """Queued or running runs, the one that started first first."""
    return sorted((r for r in runs if r.get("state") in ("queued", "running")),
                  key=lambda r: (r.get("state") != "running", str(r.get("start_date") or r.get("run_after") or "")))


def task_progress(before: dict[str, str], rows: list[dict]) -> tuple[dict[str, str], list[str]]:
    """(task states now, one line per task whose state changed) from the run's task instances; tasks that have no
    state yet are not printed."""
    now = {}
    for r in rows:
        index = str(r.get("map_index", -1))
        now[r["task_id"] + ("" if index in ("-1", "None", "") else f"[{index}]")] = str(r.get("state") or "none")
    return now, [f"    {task}: {state}" for task, state in now.items()
                 if before.get(task, "none") != state]


def follow_run(s: dict, run_id: str, timeout: float) -> dict:
    """Poll ``run_id`` until it ends; print its state, and the task states of the run that is doing the work (ours,
    or the one ours is queued behind)."""
    deadline, last, shown, states = time.monotonic() + timeout, None, None, {}
    while time.monotonic() < deadline:
        runs = list_runs(s)
        run = next((r for r in runs if r.get("run_id") == run_id), {})
        if run.get("state") != last:
            print(f"  run state: {run.get('state')}", flush=True)
            last = run.get("state")
        if run.get("state") in ("success", "failed"):
            return run
        working = run if run.get("state") == "running" else next(iter(active_runs(runs)), run)
        if working.get("run_id") and working.get("run_id") != shown:
            shown, states = working["run_id"], {}
            if shown != run_id:
                print(f"  queued behind run {shown} (max_active_runs=1); its tasks:", flush=True)
        if shown:
            states, lines = task_progress(states, task_states(s, shown))
            if lines:
                print("\n".join(lines), flush=True)
        time.sleep(5)
    raise stack.StackError(f"run {run_id} did not finish within {timeout:.0f}s")


def upload_demo_data(s: dict, rows: int, seed: int) -> dict:
    from tasks.demo import datagen
    from tasks.io import s3

    data = datagen.to_csv_bytes(datagen.generate_rows(rows, seed))
    uri = s3.join(load_config().data.source, "demo_support_conversations.csv")
    s3.put_bytes(uri, data, "text/csv")  # same seed -> same bytes -> same ETag -> sync copies nothing new
    return {"uri": uri, "rows": rows, "bytes": len(data)}


def run_step(s: dict, step: str, run_id: str, *args: str) -> dict:
    """Run a step command the way Airflow does (same environment), streaming its log; returns its manifest."""
    r = subprocess.run([sys.executable, "-m", "tasks", step, "--run-id", run_id, *args], env=stack.process_env(s),
                       cwd=stack.REPO, stdout=subprocess.PIPE, text=True)
    if r.returncode:
        raise stack.StackError(f"step {step} failed (exit {r.returncode}); its log is above")
    return json.loads(r.stdout.strip().splitlines()[-1])


# What `ecb demo` puts at model.base_model when that is an s3:// folder the stack does not hold yet
# (include/config/demo.yaml): the toy Llama for a folder named TOY_BASE, else SmolLM2 from its GGUF file, imported.
TOY_BASE = "demo-llama"


def prepare_base_model(s: dict) -> dict:
    """The demo's base model in S3, made once: SmolLM2-135M-Instruct imported from its GGUF file (converted, checked
    and uploaded by the import_base_model step), or the toy Llama built from the demo corpus. Both steps return at
    once when S3 already holds the result."""
    dest = load_config().model.base_model
    if not dest.startswith("s3://"):
        return {"base_model_uri": dest, "reused": True}
    name = dest.rstrip("/").rsplit("/", 1)[-1]
    if name != TOY_BASE:
        out = run_step(s, "import_base_model", "demo-base-model", "--input", f"source={SMOLLM2_GGUF}",
                       "--input", f"name={name}")
        return {**out, "reused": not out["uploaded_files"]}
    sync = run_step(s, "sync_raw_data", "demo-base-model")
    prep = run_step(s, "prepare_chatml", "demo-base-model", "--input", f"raw_manifest={sync['manifest_uri']}")
    return run_step(s, "build_demo_model", "demo-base-model", "--input", f"snapshot_uri={prep['snapshot_uri']}",
                    "--input", f"dest={dest}")


def cmd_demo(args) -> int:
    # Data first, Airflow second: an unpaused nightly DAG may start a run as soon as the scheduler is up.
    stack.up(airflow=False)
    s = stack.load_settings()
    env.export(stack.stack_env(s))  # this process now talks to the stack and reads the demo config
    up = upload_demo_data(s, args.rows, args.seed)
    print(f"demo data: {up['rows']} rows ({up['bytes']} bytes) at {up['uri']}", flush=True)
    base = prepare_base_model(s)
    what = f"{base['source']}, licence {base['license']}" if base.get("source") else "the toy Llama"
    print(f"demo base model: {base['base_model_uri']} ({what}; {'reused' if base.get('reused') else 'made now'})",
          flush=True)
    urls = stack.up()
    print("stack up:", ", ".join(f"{k}={v}" for k, v in urls.items()), flush=True)
    wait_for_dag(s)
    # A champion from an earlier demo makes this run's release a canary too: the simulated users judge it.
    with SimulatedUsers(f"http://127.0.0.1:{s.get('chat_port', 8000)}"):
        run = trigger_and_wait(s, {"force_retrain": args.force_retrain}, args.timeout)
    states = stack.airflow_cli(s, "tasks", "states-for-dag-run", DAG_ID, run["run_id"], check=False).stdout
    print(states)
    _print_urls(s)
    if run["state"] != "success":
        print(f"run {run['run_id']} ended {run['state']}; open the Airflow UI for the task logs", file=sys.stderr)
        return 1
    print(f"run {run['run_id']} succeeded")
    rc = ensure_chat_service(s)
    if rc == 0 and not args.no_canary:
        rc = canary_cycle(s, args)
    return rc


# A short second release (the canary is what this run shows): fewer steps than the first, so a different adapter;
# the same eval settings, so the champion's stored evaluation is reused rather than made again.
CANARY_RUN = {"force_retrain": True, "force_deploy": True, "hpo.enabled": False, "training.max_steps": 6}


def canary_cycle(s: dict, args) -> int:
    """One canary end to end: a second (short) training run releases a version as canary beside the champion,
    simulated users chat and rate replies through the real API while the DAG waits, and the verdict promotes or
    rolls it back. Needs release.canary_share > 0 (include/config/demo.yaml sets it)."""
    cfg = load_config()
    if cfg.release.canary_share <= 0:
        print("canary cycle skipped: release.canary_share is 0 in this config")
        return 0
    print(f"canary cycle: a second release gets {cfg.release.canary_share:.0%} of new chats until "
          f"{cfg.release.canary_min_messages} candidate replies", flush=True)
    with SimulatedUsers(f"http://127.0.0.1:{s.get('chat_port', 8000)}") as users:
        run = trigger_and_wait(s, CANARY_RUN, args.timeout)
    print(f"simulated traffic: {json.dumps(users.result)}")
    print(_verdict_sentence() or "no canary verdict recorded (see the canary_verdict task log)")
    _print_urls(s)
    return 0 if run["state"] == "success" else 1


class SimulatedUsers:
    """While a DAG run goes on: as soon as the service serves a canary, users chat and rate replies (the verdict
    needs live signals); otherwise they only watch /api/model."""

    def __init__(self, url: str):
        from tasks.demo import traffic

        self.url, self.done, self.summary = url, threading.Event(), traffic.Summary()
        self.thread = threading.Thread(target=self._run, name="simulated-users", daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        # No new chats from here; the ones in flight (up to 8 replies being decoded, ~40 s on a CPU) are not waited
        # for: the run is over and the service stores them anyway.
        self.done.set()
        self.thread.join(timeout=5)

    @property
    def result(self) -> dict:
        """Chats answered so far (each counted when its reply and rating are in), per model version."""
        out = self.summary.to_dict()
        return {k: out[k] for k in ("chats", "failed", "by_version")}

    def _run(self) -> None:
        from tasks.demo import traffic

        announced = False
        while not self.done.is_set():
            if not _served(self.url).get("candidate"):
                self.done.wait(5)
                continue
            if not announced:
                print(f"a canary is served at {self.url}: simulated users start chatting", flush=True)
                announced = True
            # 8 at a time: the service decodes them in one batch (a CPU decode step costs about the same for 1 row
            # or 8), so the verdict's replies come ~4x sooner than from 2 users.
            traffic.drive(self.url, 24, traffic.by_reference(), workers=8, stop=self.done,
                          seed=self.summary.chats, summary=self.summary)


def _served(url: str) -> dict:
    from tasks.release import deploy

    return deploy.served_model(url) or {}


def _verdict_sentence() -> str | None:
    from sqlalchemy import select

    from tasks.io import db, schema

    r = schema.releases
    query = select(r.c.verdict).where(r.c.verdict.is_not(None)).order_by(r.c.id.desc()).limit(1)
    verdict = db.transaction(lambda conn: conn.execute(query).scalar(), what="read the last canary verdict")
    return (verdict or {}).get("sentence")


def cmd_release(args) -> int:
    """`ecb release rollback`: the rollback_release step with the stack's environment, as the rollback DAG runs it."""
    s = stack.load_settings()
    if not s:
        raise stack.StackError(f"no local stack in {stack.state_dir()}: run `ecb stack up` first")
    inputs = ["--input", f"reason={args.reason}", "--input", f"by={args.by or getpass.getuser()}"]
    if args.to:
        inputs += ["--input", f"to={args.to}"]
    for override in args.set:
        inputs += ["--set", override]
    # one run id per command: the step finishes a plan stored under it, so two rollbacks must never share one
    run_id = f"rollback-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"
    manifest = run_step(s, "rollback_release", run_id, *inputs)
    print(f"{manifest['registered_model']}: champion is version {manifest['version']} (demoted: "
          f"{', '.join(manifest['demoted']) or 'none'}); {manifest['service_url']} serves it")
    return 0


def ensure_chat_service(s: dict) -> int:
    """A run that stopped early (nothing changed) deploys nothing: make sure the champion is being served anyway,
    e.g. after the machine restarted. Same step the DAG runs, with the registry's champion."""
    url = f"http://127.0.0.1:{s.get('chat_port', 8000)}"
    try:
        if stack.http_ok(f"{url}/readyz"):
            print(f"chat service up at {url}")
            return 0
    except OSError:
        pass
    print(f"chat service not running at {url}: deploying the registry's champion", flush=True)
    r = subprocess.run([sys.executable, "-m", "tasks", "deploy_chat_service", "--run-id", "demo-redeploy"],
                       env=env.child(stack.stack_env(s)), cwd=stack.REPO)
    return r.returncode


def cmd_config(args) -> int:
    if args.env:
        return print_env()
    defaults = Config()
    for name, f, _ in iter_fields():
        section, attr = name.split(".")
        print(f"{name} = {getattr(getattr(defaults, section), attr)!r}\n    {f.metadata['help']}")
    return 0


def print_env() -> int:
    """The registry of tasks/env.py: name, kind, whether it is set here (a secret's value is never shown), help."""
    for kind, meaning in env.KINDS.items():
        print(f"# {kind}: {meaning}")
    for name, var in env.VARS.items():
        value = env.get(name)
        state = ("set" if value else "unset") if var.kind == env.SECRET else (repr(value) if value else "unset")
        print(f"{name} [{var.kind}] {state}\n    {var.help}")
    return 0


def cmd_shell_env(args) -> int:
    s = stack.load_settings() or stack.init_settings()
    for k, v in sorted(stack.stack_env(s).items()):
        print(f"export {k}='{v}'")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ecb", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("stack", help="manage the embedded local stack")
    st.add_argument("action", choices=["up", "down", "status", "wipe"])
    st.add_argument("--no-airflow", action="store_true")
    st.add_argument("--no-mlflow", action="store_true")
    st.set_defaults(func=cmd_stack)
    demo = sub.add_parser("demo", help="run the whole pipeline on the embedded stack")
    demo.add_argument("--rows", type=int, default=2400)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--force-retrain", action="store_true")
    demo.add_argument("--timeout", type=float, default=1800)
    demo.add_argument("--no-canary", action="store_true", help="skip the canary cycle after the first run")
    demo.set_defaults(func=cmd_demo)
    rel = sub.add_parser("release", help="release actions on the local stack")
    rel_sub = rel.add_subparsers(dest="action", required=True)
    rb = rel_sub.add_parser("rollback", help="serve an earlier registered version again")
    rb.add_argument("--to", default=None, help="registered version (default: the registry's 'previous' alias)")
    rb.add_argument("--reason", default="manual rollback", help="why (stored in the releases table)")
    rb.add_argument("--by", default=None, help="who (default: the OS user)")
    rb.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="config override, e.g. release.registered_model=NAME")
    rb.set_defaults(func=cmd_release)
    conf = sub.add_parser("config", help="list config fields (--env: environment variables)")
    conf.add_argument("--env", action="store_true", help="list the environment variables the steps read instead")
    conf.set_defaults(func=cmd_config)
    sub.add_parser("shell-env", help="print the stack environment").set_defaults(func=cmd_shell_env)
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except (stack.StackError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
