"""The embedded local stack: PostgreSQL, S3 (SeaweedFS), MLflow and Airflow on free loopback ports.

    ecb stack up [--no-airflow] [--no-mlflow]     # idempotent: starts what is not running, checks health
    ecb stack status
    ecb stack down

External services win when configured: ECB_POSTGRES_URL (a server URL without database name; the four databases
are created there) and ECB_S3_ENDPOINT_URL / AWS credentials (or ECB_USE_AWS=1 for real AWS). Everything else
lives in the state folder ($ECB_STATE_DIR, default <repo>/.ecb): data, logs, pid files, ``stack.env`` with
the URLs and generated secrets (mode 0600, never committed) and ``stack-config.yaml``, the config fields the stack
decides (the chat port), read after the config file(s) of ECB_CONFIG. Processes run detached, so they outlive this
command.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from tasks import env
from tasks.config import Config, load_config
from tasks.io.procs import REPO, Proc, state_dir, stop_all
from tasks.io.s3 import STACK_BUCKETS
from tasks.release.deploy import CHAT

DATABASES = ("airflow", "mlflow", "optuna", "platform")
BUCKETS = STACK_BUCKETS
BIN = Path(sys.executable).parent
DEMO_CONFIG = REPO / "include" / "config" / "demo.yaml"


class StackError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_pair() -> int:
    """A port p with p+10000 also free: SeaweedFS puts each gRPC listener at its HTTP port + 10000."""
    for _ in range(200):
        p = free_port()
        if p + 10000 < 65535 and port_free(p + 10000):
            return p
    raise StackError("no free port pair found on 127.0.0.1")


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def wait_for(check, what: str, timeout: float, log: Path | None = None, failed=None) -> None:
    """Wait until ``check()`` is true; ``failed()`` returning a reason ends the wait at once (a process that
    cannot start does not make anyone wait for its time-out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # noqa: S110 - any failure means "not ready yet"
            pass
        if failed is not None and (reason := failed()):
            raise StackError(f"{what} failed to start: {reason}")
        time.sleep(0.5)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:]) if log and log.exists() else ""
    detail = f"; last log lines:\n{tail}" if tail else ""
    raise StackError(f"{what} did not become healthy within {timeout:.0f}s{detail}")


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=3) as r:  # noqa: S310 - loopback health checks only
        return 200 <= r.status < 300


# --- settings persisted across `up` calls (ports and generated secrets stay stable) -------------------------


def load_settings() -> dict:
    path = state_dir() / "stack.json"
    return json.loads(path.read_text()) if path.exists() else {}


def save_settings(settings: dict) -> None:
    d = state_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
        path = d / "stack.json"
        path.write_text(json.dumps(settings, indent=2, sort_keys=True))
        path.chmod(0o600)
        env_path = d / "stack.env"
        env_path.write_text("".join(f"export {k}='{v}'\n" for k, v in sorted(stack_env(settings).items())))
        env_path.chmod(0o600)
        stack_config_file().write_text("# Written by `ecb stack up`: config fields the stack decides, read after the "
                                       "file(s) in ECB_CONFIG.\n" + json.dumps(stack_overrides(settings)) + "\n")
    except OSError as exc:  # the first write of every command: say which folder, not a bare traceback
        raise StackError(f"state folder {d} is not writable ({exc.strerror}: {exc.filename}); make it writable "
                         "or point ECB_STATE_DIR at a writable folder") from exc


def init_settings(airflow_port: int | None = None, chat_port: int | None = None) -> dict:
    """Load the persisted settings and add what is missing (free ports, new secrets); ``chat_port`` replaces the
    stored chat port (tests: never the demo's 8000)."""
    s = load_settings()
    if env.get("ECB_STACK_MANAGED") != "1":
        # A person's shell decides what is external; processes the stack started inherit its exported URLs
        # (ECB_STACK_MANAGED=1) and must not mistake those for external services.
        s["external_pg"] = env.get("ECB_POSTGRES_URL") or None
        s["external_s3"] = "aws" if env.get("ECB_USE_AWS") == "1" else env.get("ECB_S3_ENDPOINT_URL") or None
        s["config"] = env.get("ECB_CONFIG") or None
    s.setdefault("pg_port", free_port())
    s.setdefault("pg_password", secrets.token_urlsafe(18))
    for key in ("s3_port", "master_port", "volume_port", "filer_port"):
        s.setdefault(key, free_port_pair())
    s.setdefault("s3_access_key", "ecb" + secrets.token_hex(8))
    s.setdefault("s3_secret_key", secrets.token_urlsafe(24))
    s.setdefault("mlflow_port", free_port())
    s.setdefault("airflow_port", airflow_port or int(env.get("ECB_AIRFLOW_PORT", "8080")))
    s.setdefault("jwt_secret", secrets.token_urlsafe(64))
    s.setdefault("fernet_key", _fernet_key())
    s.setdefault("chat_admin_token", secrets.token_urlsafe(24))
    s.setdefault("chat_api_key", "ecb-" + secrets.token_urlsafe(24))  # the OpenAI-compatible /v1 API's key
    if chat_port:
        s["chat_port"] = chat_port
    if "chat_port" not in s:
        # The config's chat.port (8000) when it is free, any free port otherwise (a second stack); stack-config.yaml
        # hands the choice to the service.
        wanted = load_config(base_config(s)).chat.port
        s["chat_port"] = wanted if port_free(wanted) else free_port()
    save_settings(s)
    return s


def base_config(s: dict) -> str:
    """The config file(s) the person chose, else the demo settings."""
    return s.get("config") or str(DEMO_CONFIG)


def stack_config_file() -> Path:
    return state_dir() / "stack-config.yaml"


def stack_overrides(s: dict) -> dict:
    """Config fields the stack decides, written to stack-config.yaml."""
    return {"chat": {"port": s["chat_port"]}}


def stack_config(s: dict) -> Config:
    """The config every process of the stack reads."""
    return load_config(stack_env(s)["ECB_CONFIG"])


def configure_io(s: dict) -> Config:
    """This process's S3 and database helpers use the stack config's retry budgets and pool size."""
    from tasks.io import db, s3

    cfg = stack_config(s)
    s3.configure(cfg.storage)
    db.configure(pool_size=cfg.storage.db_pool_size, retry_s=cfg.storage.db_retry_s)
    return cfg


def _fernet_key() -> str:
    import base64

    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()


def pg_server_url(s: dict) -> str:
    return s.get("external_pg") or f"postgresql://postgres:{s['pg_password']}@127.0.0.1:{s['pg_port']}"


def db_url(s: dict, name: str) -> str:
    return pg_server_url(s).rstrip("/") + f"/{name}"


def s3_endpoint(s: dict) -> str | None:
    if s.get("external_s3") == "aws":
        return None
    return s.get("external_s3") or f"http://127.0.0.1:{s['s3_port']}"


def stack_env(s: dict) -> dict:
    """The environment every platform process gets: URLs, credentials and Airflow settings."""
    external_s3 = bool(s.get("external_s3"))
    key = (env.get("AWS_ACCESS_KEY_ID") or None) if external_s3 else s["s3_access_key"]
    secret = (env.get("AWS_SECRET_ACCESS_KEY") or None) if external_s3 else s["s3_secret_key"]
    endpoint = s3_endpoint(s) or ""
    region = env.get("AWS_DEFAULT_REGION", "us-east-1")
    af_db = db_url(s, "airflow").replace("postgresql://", "postgresql+psycopg2://", 1)
    aws_conn = {"conn_type": "aws", "login": key, "password": secret,
                "extra": {"region_name": region, **({"endpoint_url": endpoint} if endpoint else {})}}
    pg = urllib.parse.urlsplit(db_url(s, "platform"))
    results_conn = {"conn_type": "postgres", "host": pg.hostname, "port": pg.port or 5432, "login": pg.username,
                    "password": pg.password or "", "schema": "platform"}
    mlflow_uri = f"http://127.0.0.1:{s['mlflow_port']}"
    return {
        "ECB_STATE_DIR": str(state_dir()),
        "ECB_STACK_MANAGED": "1",
        "ECB_S3_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": key or "",
        "AWS_SECRET_ACCESS_KEY": secret or "",
        "AWS_DEFAULT_REGION": region,
        "ECB_RESULTS_DB_URL": db_url(s, "platform"),
        "ECB_OPTUNA_DB_URL": db_url(s, "optuna"),
        "ECB_MLFLOW_DB_URL": db_url(s, "mlflow"),
        "MLFLOW_TRACKING_URI": mlflow_uri,
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
        "AIRFLOW_HOME": str(REPO),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": af_db,
        "AIRFLOW__CORE__FERNET_KEY": s["fernet_key"],
        "AIRFLOW__API_AUTH__JWT_SECRET": s["jwt_secret"],
        "AIRFLOW__API__BASE_URL": f"http://localhost:{s['airflow_port']}",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{s['airflow_port']}/execution/",
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(state_dir() / "airflow" / "logs"),
        # A task supervisor notices its task's exit only at its next check, up to this many seconds later (5 by
        # default; seen here: 5.0 s after the last log line), and the scheduler reads the exit after that. A poke
        # rescheduled or an approval answered inside that window hits Airflow's "finished with state success, but
        # the task instance's state attribute is queued" race (RELIABILITY.md): a 1 s check keeps it narrow.
        "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
        # Local demo only: the UI opens without a login. docker-compose/Kubernetes use real users.
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(aws_conn),
        "AIRFLOW_CONN_ECB_RESULTS": json.dumps(results_conn),
        "AIRFLOW_CONN_MLFLOW_DEFAULT": json.dumps({"conn_type": "http", "host": mlflow_uri}),
        "ECB_CHAT_ADMIN_TOKEN": s["chat_admin_token"],
        # The deploy step's environment reaches the chat service: through the connection on the Airflow side
        # (as in production), and in this environment for `ecb` commands run by hand.
        "AIRFLOW_CONN_ECB_CHAT_API": json.dumps({"conn_type": "generic", "password": s["chat_api_key"]}),
        "ECB_CHAT_API_KEYS": s["chat_api_key"],
        "ECB_MODEL_CACHE": str(state_dir() / "model-cache"),
        # The demo settings unless the person chose a config file, then what the stack decides (the chat port).
        "ECB_CONFIG": os.pathsep.join([base_config(s), str(stack_config_file())]),
    }


def process_env(s: dict) -> dict:
    e = env.child(stack_env(s))
    e["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH')}"
    e["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH')}".rstrip(os.pathsep)
    return e


# --- PostgreSQL ------------------------------------------------------------------------------------------


def _pg(name: str, *args: str) -> None:
    """Run a PostgreSQL binary shipped by pgserver; as root, run it as the unprivileged 'pgserver' user
    (initdb and postgres refuse to run as root), reusing pgserver's own helpers for that."""
    import pgserver._commands as pgc

    kwargs = {}
    if os.geteuid() == 0:
        kwargs["user"] = "pgserver"
    r = subprocess.run([str(pgc.POSTGRES_BIN_PATH / name), *args], capture_output=True, text=True, **kwargs)
    if r.returncode:
        raise StackError(f"{name} {' '.join(args)} failed: {r.stderr.strip() or r.stdout.strip()}")


def _pg_prepare_root(data: Path, *paths: Path) -> None:
    import pgserver._commands as pgc
    from pgserver.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

    user = ensure_user_exists("pgserver")
    ensure_prefix_permissions(data)
    ensure_folder_permissions(pgc.POSTGRES_BIN_PATH, 0o055)
    ensure_folder_permissions(pgc.POSTGRES_BIN_PATH.parent / "lib", 0o044)
    for p in (data, *paths):
        os.chown(p, user.pw_uid, user.pw_gid)


def postgres_up(s: dict) -> str:
    if s.get("external_pg"):
        _create_databases(s)
        return f"external ({_redact(pg_server_url(s))})"
    data = state_dir() / "postgres"
    log = state_dir() / "logs" / "postgres.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    data.mkdir(parents=True, exist_ok=True)
    log.touch()
    if not (data / "PG_VERSION").exists():
        pwfile = state_dir() / "run" / "pgpw"
        pwfile.parent.mkdir(parents=True, exist_ok=True)
        pwfile.write_text(s["pg_password"])
        pwfile.chmod(0o600)
        if os.geteuid() == 0:
            _pg_prepare_root(data, pwfile, log)
        _pg("initdb", "-D", str(data), "-U", "postgres", "--auth-host=scram-sha-256", "--auth-local=trust",
            f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C")
        pwfile.unlink()
    if not _pg_ready(s):
        if (data / "postmaster.pid").exists():
            (data / "postmaster.pid").unlink()  # stale after a crash; pg_ctl refuses to start otherwise
        opts = f"-h 127.0.0.1 -p {s['pg_port']} -k {data} -c max_connections=200 -c fsync=off"
        _pg("pg_ctl", "-D", str(data), "-l", str(log), "-o", opts, "-w", "-t", "60", "start")
    wait_for(lambda: _pg_ready(s), "PostgreSQL", 60, log)
    _create_databases(s)
    return f"127.0.0.1:{s['pg_port']}"


def _pg_ready(s: dict) -> bool:
    import psycopg2

    try:
        psycopg2.connect(db_url(s, "postgres"), connect_timeout=2).close()
        return True
    except psycopg2.OperationalError:
        return False


def _create_databases(s: dict) -> None:
    import psycopg2

    conn = psycopg2.connect(db_url(s, "postgres"), connect_timeout=5)
    conn.autocommit = True
    with conn.cursor() as cur:
        for name in DATABASES:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if not cur.fetchone():
                cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()


def postgres_down() -> bool:
    data = state_dir() / "postgres"
    if not (data / "postmaster.pid").exists():
        return False
    try:
        _pg("pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop")
    except StackError:
        return False
    return True


def _redact(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@")
    return url


# --- S3 (SeaweedFS) --------------------------------------------------------------------------------------

WEED = Proc("seaweedfs")


def s3_up(s: dict) -> str:
    endpoint = s3_endpoint(s)
    if not s.get("external_s3"):
        data = state_dir() / "seaweedfs"
        data.mkdir(parents=True, exist_ok=True)
        cfg = state_dir() / "run" / "s3.json"
        cfg.parent.mkdir(parents=True, exist_ok=True)
        identity = {"name": "ecb", "credentials": [{"accessKey": s["s3_access_key"], "secretKey": s["s3_secret_key"]}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
        cfg.write_text(json.dumps({"identities": [identity]}))
        cfg.chmod(0o600)
        _start_weed(s, data, cfg)
        # A port picked free can be taken before SeaweedFS binds it (its gRPC ports are HTTP + 10000, in the range
        # the kernel hands out to outgoing connections): say so at once, not after the 90 s wait.
        wait_for(lambda: not port_free(s["s3_port"]) and _buckets(s), "SeaweedFS S3", 90, WEED.log,
                 failed=_weed_port_taken)
    _buckets(s)
    return endpoint or "AWS"


def _start_weed(s: dict, data: Path, cfg: Path) -> None:
    WEED.start([str(BIN / "weed"), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}",
                f"-master.port={s['master_port']}", f"-volume.port={s['volume_port']}",
                f"-filer.port={s['filer_port']}", "-filer", "-s3", f"-s3.port={s['s3_port']}",
                f"-s3.config={cfg}", "-s3.port.iceberg=0", "-s3.port.lance=0",  # fixed default ports: off
                f"-filer.localSocket={state_dir() / 'run' / 'filer.sock'}",
                "-master.volumeSizeLimitMB=256", "-volume.max=64"], process_env(s))


def _weed_port_taken() -> str | None:
    """The bind error of the SeaweedFS started last, from its log (the text after the last start header)."""
    try:
        text = WEED.log.read_text(errors="replace").rsplit("\n=== ", 1)[-1]
    except OSError:
        return None
    line = next((ln for ln in text.splitlines() if "address already in use" in ln), None)
    return line.split("] ", 1)[-1].strip()[-200:] if line else None


def _buckets(s: dict) -> bool:
    previous = env.export(stack_env(s))  # the S3 helpers read endpoint and credentials from the environment
    try:
        from tasks.io import s3

        for b in BUCKETS:
            s3.ensure_bucket(b)
        return True
    finally:
        env.export(previous)


# --- MLflow tracking server -------------------------------------------------------------------------------

MLFLOW = Proc("mlflow")


def mlflow_up(s: dict) -> str:
    url = f"http://127.0.0.1:{s['mlflow_port']}"
    MLFLOW.start([str(BIN / "mlflow"), "server", "--backend-store-uri", db_url(s, "mlflow"),
                  "--artifacts-destination", "s3://ecb-mlflow/artifacts", "--serve-artifacts",
                  "--host", "127.0.0.1", "--port", str(s["mlflow_port"]), "--workers", "1",
                  "--allowed-hosts", f"127.0.0.1:{s['mlflow_port']},localhost:{s['mlflow_port']}"],
                 process_env(s))
    wait_for(lambda: http_ok(f"{url}/health"), "MLflow server", 180, MLFLOW.log)
    return url


# --- Airflow ----------------------------------------------------------------------------------------------

AIRFLOW_PROCS = {name: Proc(f"airflow-{name}") for name in ("api-server", "scheduler", "dag-processor", "triggerer")}


def airflow_cli(s: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "airflow"), *args], env=process_env(s), cwd=REPO, capture_output=True,
                          text=True, check=check)


def airflow_migrate(s: dict) -> None:
    r = airflow_cli(s, "db", "migrate", check=False)
    if r.returncode:
        raise StackError(f"airflow db migrate failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    # GPU steps take a slot from this pool so HPO fan-out never oversubscribes the device(s).
    slots = stack_config(s).execution.gpu_pool_slots
    airflow_cli(s, "pools", "set", "gpu", str(slots), "Slots for GPU steps (one per device)")


def airflow_up(s: dict) -> str:
    airflow_migrate(s)
    env = process_env(s)
    port = s["airflow_port"]
    AIRFLOW_PROCS["api-server"].start([str(BIN / "airflow"), "api-server", "--port", str(port),
                                       "--host", "127.0.0.1"], env)
    for name in ("scheduler", "dag-processor", "triggerer"):
        AIRFLOW_PROCS[name].start([str(BIN / "airflow"), name], env)
    wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/api/v2/monitor/health"), "Airflow api-server", 180,
             AIRFLOW_PROCS["api-server"].log)
    return f"http://localhost:{port}"


# --- commands ---------------------------------------------------------------------------------------------


def up(airflow: bool = True, mlflow: bool = True) -> dict:
    s = init_settings()
    configure_io(s)
    urls = {"postgres": postgres_up(s), "s3": s3_up(s)}
    from tasks.io import db

    env.export({"ECB_RESULTS_DB_URL": db_url(s, "platform")})
    db.migrate(db_url(s, "platform"))
    if mlflow:
        urls["mlflow"] = mlflow_up(s)
    if airflow:
        urls["airflow"] = airflow_up(s)
    return urls


def down() -> list[str]:
    stopped = stop_all((CHAT, *AIRFLOW_PROCS.values(), MLFLOW))
    # SeaweedFS takes ~20 s to exit on SIGTERM; wait for it so a following `up` does not race its ports.
    if WEED.stop(timeout=40):
        stopped.append(WEED.name)
    if postgres_down():
        stopped.append("postgres")
    return stopped


def status() -> dict:
    s = load_settings()
    if not s:
        return {"state_dir": str(state_dir()), "running": {}}
    running = {p.name: p.pid() for p in (WEED, MLFLOW, *AIRFLOW_PROCS.values(), CHAT)}
    running["postgres"] = _pg_ready(s) if not s.get("external_pg") else "external"
    return {"state_dir": str(state_dir()), "running": running, "airflow_ui": f"http://localhost:{s['airflow_port']}",
            "mlflow_ui": f"http://127.0.0.1:{s['mlflow_port']}", "s3": s3_endpoint(s) or "AWS",
            "chat": f"http://127.0.0.1:{s.get('chat_port', 8000)}"}


def wipe() -> None:
    """Stop everything and delete the state folder (all local data)."""
    down()
    shutil.rmtree(state_dir(), ignore_errors=True)
