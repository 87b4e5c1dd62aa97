"""One step definition, three executions: the DAG parsed in local, docker and kubernetes mode yields operators that
run the same command, with the image, environment, GPU requests, pool and secret names the config asks for."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from datetime import datetime, timedelta

import pytest

from tests.conftest import REPO, SETTINGS

DAG_ID = "ecommerce_chatbot_training"
PARAMS = {"data.max_rows": 50, "hpo.n_trials": 2, "force_retrain": True}
NO_LOG_STAMPS = ["--set", "pipeline.log_timestamps=false"]  # every command Airflow builds: the task log stamps lines
SECRET_VALUES = [SETTINGS["s3_secret_key"], SETTINGS["pg_password"], SETTINGS["chat_admin_token"]]


@contextmanager
def environ(**values: str | None):
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        yield
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def parse(mode: str, variable: dict | None = None):
    from airflow.dag_processing.dagbag import DagBag

    with environ(ECB_EXECUTION_MODE=mode, AIRFLOW_VAR_ECB_EXECUTION=json.dumps(variable) if variable else None):
        bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    return bag.dags[DAG_ID]


def step_tasks(dag) -> dict:
    """task_id -> a real operator instance for every step task (mapped ones unmapped as a worker would)."""
    out = {}
    for task in dag.tasks:
        if task.task_id == "hpo_trial":
            task = task.unmap({"inputs": {"slot": "0", "snapshot_uri": "s3://ecb-platform/snapshots/x/"}})
        if hasattr(task, "step"):
            out[task.task_id] = task
    return out


@pytest.fixture(scope="module")
def modes():
    return {mode: step_tasks(parse(mode)) for mode in ("local", "docker", "kubernetes")}


@pytest.fixture(scope="module")
def gpu_steps(modes) -> set[str]:
    return {tid for tid, op in modes["local"].items() if op.pool == "gpu"}


def rendered_fields(op) -> str:
    return json.dumps({f: getattr(op, f) for f in op.template_fields}, default=str)


class _TI:
    """Enough of a task instance for XComArgs to resolve: a pull returns the manifest given, or for a field it lacks
    a value naming the task and key."""

    def __init__(self, manifest: dict | None = None):
        self.manifest, self.pulls = manifest or {}, []

    def xcom_pull(self, task_ids, key="return_value", **_):
        self.pulls.append((task_ids, key))
        return self.manifest if key == "return_value" else self.manifest.get(key, f"{task_ids}.{key}")


def references(inputs: dict) -> dict:
    """Inputs with each XComArg as (task id, key): comparable across DAGs parsed in different modes."""
    from airflow.sdk import XComArg

    return {k: (v.operator.task_id, v.key) if isinstance(v, XComArg) else v for k, v in inputs.items()}


def test_every_step_task_exists_in_every_mode(modes, gpu_steps):
    assert set(modes["local"]) == {"sync_raw_data", "prepare_chatml", "plan_hpo", "hpo_trial", "select_best",
                                   "finetune", "evaluate", "quality_gate", "record_approval", "register_model",
                                   "push_to_hub", "deploy_chat_service", "wait_for_canary", "canary_verdict"}
    assert set(modes["docker"]) == set(modes["kubernetes"]) == set(modes["local"])
    assert gpu_steps == {"hpo_trial", "finetune", "evaluate"}
    # The quality gate is a step like the others: it runs in the configured mode, not always on the worker; so does
    # the canary wait (the mode's operator as a rescheduling sensor, ecb_airflow.polling).
    for mode, cls in (("local", "LocalStepOperator"), ("docker", "DockerStepOperator"),
                      ("kubernetes", "KubernetesStepOperator")):
        assert {type(op).__name__ for tid, op in modes[mode].items() if tid != "wait_for_canary"} == {cls}
        assert type(modes[mode]["wait_for_canary"]).__name__ == f"{cls}Poll"
        assert type(modes[mode]["wait_for_canary"]).__mro__[2].__name__ == "BaseSensorOperator"


def test_step_operators_share_their_fields():
    """One base holds step / inputs / overrides; each mode keeps its own provider's template fields."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from airflow.providers.docker.operators.docker import DockerOperator

    from ecb_airflow.docker_step import DockerStepOperator
    from ecb_airflow.k8s_step import KubernetesStepOperator
    from ecb_airflow.step_operator import StepOperator
    from ecb_airflow.steps import LocalStepOperator

    for cls, base in ((LocalStepOperator, StepOperator), (DockerStepOperator, DockerOperator),
                      (KubernetesStepOperator, KubernetesPodOperator)):
        assert issubclass(cls, StepOperator) and "__init__" not in vars(cls), cls
        assert set(cls.template_fields) == {*base.template_fields, "inputs", "overrides"}, cls
    op = LocalStepOperator(task_id="t", step="evaluate", inputs={"a": "1"}, overrides={"execution.image": "i"})
    assert (op.step, op.inputs, op.overrides, op.multiple_outputs) == ("evaluate", {"a": "1"}, {"execution.image": "i"},
                                                                       True)
    with pytest.raises(TypeError, match="step"):
        LocalStepOperator(task_id="t")  # the metaclass still reports a missing argument


def test_build_command_argv():
    from ecb_airflow.command import build_command

    argv = build_command("prepare_chatml", "r1", {"data.max_rows": 10, "force_retrain": True, "data.source": "/d"},
                         {"raw_manifest": "s3://b/m.json", "evaluation": {"candidate": None}, "slot": 0},
                         {"execution.image": "img:1"})
    assert argv == [sys.executable, "-m", "tasks", "prepare_chatml", "--run-id", "r1", *NO_LOG_STAMPS,
                    "--set", 'data.source="/d"', "--set", "data.max_rows=10", "--set", 'execution.image="img:1"',
                    "--input", "raw_manifest=s3://b/m.json", "--input", 'evaluation={"candidate": null}',
                    "--input", "slot=0"]


def test_local_step_env_has_connections_and_no_log_switch():
    """The local subprocess environment: the worker's, then its connections; the log format is a --set now."""
    from ecb_airflow.command import conn_env
    from ecb_airflow.steps import step_env

    with environ(ECB_LOG_TIMESTAMPS=None):
        env = step_env()
    assert "ECB_LOG_TIMESTAMPS" not in env and env["PYTHONUNBUFFERED"] == "1"
    assert env["AWS_SECRET_ACCESS_KEY"] == SETTINGS["s3_secret_key"]
    assert {k: env[k] for k in conn_env()} == conn_env()
    # the chat service's /v1 keys: from the connection ecb_chat_api, so the deploy step hands them to gunicorn
    assert conn_env()["ECB_CHAT_API_KEYS"] == SETTINGS["chat_api_key"]


def test_defaults_reach_every_step_in_every_mode(modes):
    """Timeout and retries come from the DAG's default_args, mapped hpo_trial included; the canary wait retries a
    lost poke pipeline.poll_retries times (ecb_airflow.polling)."""
    from tasks.config import load_config

    pipeline = load_config().pipeline
    for mode, ops in modes.items():
        for tid, op in ops.items():
            assert op.execution_timeout == timedelta(seconds=pipeline.step_timeout_s), (mode, tid)
            retries = pipeline.poll_retries if tid == "wait_for_canary" else pipeline.retries
            assert op.retries == retries, (mode, tid)


@pytest.mark.parametrize("force", [True, False])
def test_quality_gate_command_in_every_mode(modes, force):
    """The gate step gets the whole evaluate manifest as JSON and force_deploy as the run's true / false."""
    from ecb_airflow.execution import step_arguments

    evaluation = {"candidate": {"eval_id": 3}, "champion": None, "registry_error": None}
    for mode, ops in modes.items():
        op, ti = ops["quality_gate"], _TI(evaluation)
        inputs = op.render_template(op.inputs, {"params": {**PARAMS, "force_deploy": force}, "ti": ti})
        assert ti.pulls == [("evaluate", "return_value")], mode
        argv = step_arguments(op.step, {"run_id": "r", "params": PARAMS}, inputs, {})
        assert argv[-4:] == ["--input", f"evaluation={json.dumps(evaluation)}",
                             "--input", f"force_deploy={str(force).lower()}"], mode


def test_register_model_reads_the_gate_manifest(modes):
    """Upstream values are XComArgs to manifest fields: decision_id from the quality_gate step itself."""
    from airflow.sdk import XComArg

    fields = {"adapter_uri": "s3://a/", "mlflow_run_id": "m1", "snapshot_id": "s1", "decision_id": 7}
    for mode, ops in modes.items():
        op, ti = ops["register_model"], _TI(fields)
        ref = op.inputs["decision_id"]
        assert isinstance(ref, XComArg) and (ref.operator.task_id, ref.key) == ("quality_gate", "decision_id"), mode
        assert op.render_template(op.inputs, {"ti": ti}) == fields, mode
        assert sorted(ti.pulls) == [("finetune", "adapter_uri"), ("finetune", "mlflow_run_id"),
                                    ("prepare_chatml", "snapshot_id"), ("quality_gate", "decision_id")], mode


def test_record_approval_gets_the_answer_as_json(modes):
    """The approval task's answer (its return_value, a dict) reaches the step as one JSON input, in every mode."""
    from ecb_airflow.execution import step_arguments

    answer = {"status": "approved", "by": "alice", "at": "2026-12-02T10:00:00+00:00", "comment": "", "reason": "r"}
    for mode, ops in modes.items():
        op = ops["record_approval"]

        class TI(_TI):  # quality_gate's decision_id field, approve_release's whole answer
            def xcom_pull(self, task_ids, key="return_value", **_):
                self.pulls.append((task_ids, key))
                return 7 if key == "decision_id" else answer

        ti = TI()
        inputs = op.render_template(op.inputs, {"ti": ti})
        assert sorted(ti.pulls) == [("approve_release", "return_value"), ("quality_gate", "decision_id")], mode
        argv = step_arguments(op.step, {"run_id": "r", "params": PARAMS}, inputs, {})
        assert argv[-4:] == ["--input", "decision_id=7", "--input", f"approval={json.dumps(answer)}"], mode


def test_asset_outlets_in_every_mode(modes):
    """Whatever runs the step, its task emits the same asset with the manifest fields as extra."""
    from ecb_airflow.step_operator import attach_manifest_to_outlets

    for mode, ops in modes.items():
        emitting = {tid: ([a.name for a in op.outlets], op.outlet_fields) for tid, op in ops.items() if op.outlets}
        assert {tid: names for tid, (names, _) in emitting.items()} == {
            "sync_raw_data": ["support_conversations_raw"], "prepare_chatml": ["chatml_snapshot"],
            "register_model": ["chatbot_model"]}, mode
        assert all(fields for _, fields in emitting.values()), mode
        assert all(ops[tid]._post_execute_hook is attach_manifest_to_outlets for tid in emitting), mode


def test_containers_run_the_local_command(modes):
    """The container argv is the local argv after `python -m tasks`, from the same params and upstream inputs."""
    from ecb_airflow.command import build_command
    from ecb_airflow.execution import ENTRYPOINT, step_arguments

    context = {"run_id": "manual__2026-01-01", "params": {**PARAMS, "force_deploy": False}}

    def rendered(op) -> dict:  # what the task's inputs are when it runs
        return op.render_template(op.inputs, {**context, "ti": _TI()})

    for tid, local in modes["local"].items():
        argv = local.command(context["run_id"], PARAMS)
        assert argv[1:3] == ["-m", "tasks"] and argv[3] == local.step
        assert argv[6:8] == NO_LOG_STAMPS
        argv = build_command(local.step, context["run_id"], PARAMS, rendered(local), local.overrides)
        for mode in ("docker", "kubernetes"):
            op = modes[mode][tid]
            assert (op.step, references(op.inputs), op.overrides) == (local.step, references(local.inputs),
                                                                      local.overrides)
            assert step_arguments(op.step, context, rendered(op), op.overrides) == argv[3:]
        assert modes["docker"][tid].entrypoint == list(ENTRYPOINT)
        assert modes["kubernetes"][tid].cmds == list(ENTRYPOINT)
    trial = modes["docker"]["hpo_trial"]
    assert step_arguments("hpo_trial", context, trial.inputs, {})[-4:] == [
        "--input", "slot=0", "--input", "snapshot_uri=s3://ecb-platform/snapshots/x/"]


def test_docker_operators(modes, gpu_steps):
    from ecb_airflow.execution import SECRET_ENV, STEP_ENV

    for tid, op in modes["docker"].items():
        assert op.image == "ecb-gpu:latest" and op.network_mode == "ecb"
        assert op.docker_url == "unix://var/run/docker.sock"
        assert op.environment == {**STEP_ENV, "ECB_EXECUTION_MODE": "docker"}
        assert "ECB_LOG_TIMESTAMPS" not in op.environment  # the log format is a --set of every command
        assert not set(op.environment) & set(SECRET_ENV)
        assert op._private_environment == {}  # secrets are added when the task runs, never at parse time
        mounts = [(m["Target"], m["Source"], m["Type"]) for m in op.mounts]
        assert mounts[0] == ("/cache", "ecb-cache", "volume")
        # Only the deploy step gets the Docker socket (it restarts the compose chat service).
        socket = ("/var/run/docker.sock", "/var/run/docker.sock", "bind")
        assert (socket in mounts) == (op.step == "deploy_chat_service"), tid
        assert (op.auto_remove, op.mount_tmp_dir, op.xcom_all, op.shm_size) == ("success", False, True, 2048 * 2**20)
        if tid in gpu_steps:
            assert [(d["Count"], d["Capabilities"]) for d in op.device_requests] == [(1, [["gpu"]])]
            assert op.pool == "gpu" and op.pool_slots == 1
        else:
            assert op.device_requests is None and op.pool == "default_pool"
        assert not any(v in rendered_fields(op) for v in SECRET_VALUES)


def test_kubernetes_operators_and_pod_spec(modes, gpu_steps):
    from ecb_airflow.execution import STEP_ENV, step_arguments

    for tid, op in modes["kubernetes"].items():
        assert (op.image, op.namespace, op.image_pull_policy) == ("ecb-gpu:latest", "ecb", "IfNotPresent")
        assert op.service_account_name == "ecb-steps" and op.do_xcom_push is True
        assert [(s.deploy_type, s.secret, s.key) for s in op.secrets] == [("env", "ecb-step-secrets", None)]
        op.arguments = step_arguments(op.step, {"run_id": "r1", "params": {}}, op.inputs, op.overrides)
        pod = op.build_pod_request_obj(dry_run=True)
        main = pod.spec.containers[0]
        assert main.command == ["python", "-m", "tasks"] and main.args[:5] == [op.step, "--run-id", "r1",
                                                                                 *NO_LOG_STAMPS]
        assert {e.name: e.value for e in main.env} == {**STEP_ENV, "ECB_EXECUTION_MODE": "kubernetes"}
        assert "ECB_LOG_TIMESTAMPS" not in {e.name for e in main.env}
        assert [(f.config_map_ref and f.config_map_ref.name, f.secret_ref and f.secret_ref.name)
                for f in main.env_from] == [("ecb-step-config", None), (None, "ecb-step-secrets")]
        # /airflow/xcom is the provider's sidecar volume: the step's return.json becomes the XCom.
        assert {m.name: m.mount_path for m in main.volume_mounts} == {"cache": "/cache", "xcom": "/airflow/xcom"}
        volumes = {v.name: v for v in pod.spec.volumes}
        assert volumes["cache"].persistent_volume_claim.claim_name == "ecb-model-cache"
        assert main.security_context.run_as_user == 1000 and main.security_context.run_as_non_root
        if tid in gpu_steps:
            assert main.resources.limits == {"nvidia.com/gpu": "1"} and op.pool == "gpu"
            assert pod.spec.node_selector == {"nvidia.com/gpu.present": "true"}
            assert [(t.key, t.operator, t.effect) for t in pod.spec.tolerations] == [
                ("nvidia.com/gpu", "Exists", "NoSchedule")]
        else:
            assert main.resources is None and not pod.spec.node_selector and op.pool == "default_pool"
        spec = json.dumps(pod.to_dict(), default=str)
        assert not any(v in spec for v in SECRET_VALUES)  # only the Secret's name is in the pod spec


def test_variable_sets_image_and_gpus_per_step():
    """The Airflow Variable ecb_execution (here from the environment secrets backend) reaches every operator."""
    dag = parse("kubernetes", {"image": "registry.example/ecb-gpu:7", "step_gpus": {"finetune": 2},
                               "image_pull_policy": "Always", "k8s_cache_pvc": ""})
    ops = step_tasks(dag)
    assert {op.image for op in ops.values()} == {"registry.example/ecb-gpu:7"}
    assert ops["finetune"].container_resources.limits == {"nvidia.com/gpu": "2"} and ops["finetune"].pool_slots == 2
    assert ops["evaluate"].container_resources.limits == {"nvidia.com/gpu": "1"} and ops["evaluate"].pool_slots == 1
    assert ops["finetune"].image_pull_policy == "Always"
    assert ops["finetune"].volumes[0].empty_dir is not None
    # The step in its pod resolves the same execution settings (the deploy step rolls out what they name).
    from ecb_airflow.execution import step_arguments

    argv = step_arguments("register_model", {"run_id": "r", "params": {}}, {}, ops["register_model"].overrides)
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--set"] == [
        "pipeline.log_timestamps=false", 'execution.image="registry.example/ecb-gpu:7"',
        'execution.image_pull_policy="Always"', 'execution.step_gpus={"finetune": 2}', 'execution.k8s_cache_pvc=""']


def test_mode_precedence_env_over_variable_over_config(tmp_path):
    from ecb_airflow.execution import settings
    from tasks.config import ConfigError

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("execution:\n  mode: docker\n  docker_network: lab\n")
    with environ(ECB_CONFIG=str(cfg), ECB_EXECUTION_MODE=None, AIRFLOW_VAR_ECB_EXECUTION=None):
        assert (settings().mode, settings().docker_network) == ("docker", "lab")
        with environ(AIRFLOW_VAR_ECB_EXECUTION='{"mode": "kubernetes"}'):
            assert settings().mode == "kubernetes"
            with environ(ECB_EXECUTION_MODE="local"):
                assert settings().mode == "local"
        with environ(ECB_EXECUTION_MODE="swarm"), pytest.raises(ConfigError, match="execution.mode"):
            settings()


def test_docker_step_env_at_run_time_comes_from_connections():
    """What a Docker step container receives when its task runs: the worker's connections and step settings."""
    from ecb_airflow.execution import SECRET_ENV, SETTING_ENV, run_time_env

    env = run_time_env()
    assert env["AWS_ACCESS_KEY_ID"] == SETTINGS["s3_access_key"]
    assert env["AWS_SECRET_ACCESS_KEY"] == SETTINGS["s3_secret_key"]
    assert env["ECB_S3_ENDPOINT_URL"] == f"http://127.0.0.1:{SETTINGS['s3_port']}"
    assert env["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{SETTINGS['mlflow_port']}"
    assert env["ECB_RESULTS_DB_URL"].startswith("postgresql://") and env["ECB_RESULTS_DB_URL"].endswith("/platform")
    assert env["ECB_OPTUNA_DB_URL"] == os.environ["ECB_OPTUNA_DB_URL"]
    assert set(env) <= set(SETTING_ENV) | set(SECRET_ENV)


def _module_level_imports(path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:  # top level only: imports inside functions run when their mode is chosen
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
    return names


CONTAINER_MODULES = ("docker", "kubernetes", "airflow.providers.docker.operators",
                     "airflow.providers.cncf.kubernetes.operators", "ecb_airflow.docker_step", "ecb_airflow.k8s_step")


# Module -> the provider it may import at module level: the approval task subclasses the standard provider's
# human-in-the-loop operator (installed with Airflow itself; no container client in it).
PROVIDER_IMPORTS_ALLOWED = {"approval": "airflow.providers.standard.operators.hitl"}


def test_local_mode_imports_no_container_provider():
    for path in (REPO / "plugins" / "ecb_airflow").glob("*.py"):
        if path.stem in ("docker_step", "k8s_step"):
            continue
        imports = _module_level_imports(path) - {PROVIDER_IMPORTS_ALLOWED.get(path.stem)}
        heavy = {m for m in imports if m.split(".")[0] in ("docker", "kubernetes")
                 or m.startswith(("airflow.providers", "ecb_airflow.docker_step", "ecb_airflow.k8s_step"))}
        assert heavy == set(), path.name


def _container_modules_after_parse(mode: str) -> set[str]:
    """Which of CONTAINER_MODULES a clean interpreter has loaded after parsing the DAG in this mode."""
    code = ("import sys, json\n"
            "from airflow.dag_processing.dagbag import DagBag\n"
            f"bag = DagBag(dag_folder={str(REPO / 'dags')!r})\n"
            "assert not bag.import_errors, bag.import_errors\n"
            "print(json.dumps(sorted(sys.modules)))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "ECB_EXECUTION_MODE": mode})
    assert r.returncode == 0, r.stderr[-2000:]
    loaded = json.loads(r.stdout.strip().splitlines()[-1])
    return {p for p in CONTAINER_MODULES if any(m == p or m.startswith(p + ".") for m in loaded)}


def test_parsing_in_local_mode_loads_no_container_provider():
    """A clean interpreter parses the DAG in local mode without the Docker / Kubernetes clients or operators;
    in docker mode the same probe sees them (so it can tell)."""
    assert _container_modules_after_parse("local") == set()
    assert {"docker", "ecb_airflow.docker_step"} <= _container_modules_after_parse("docker")


def test_rollout_targets():
    """What the deploy step restarts and polls in each container mode (tasks/release/rollout.py, no airflow)."""
    from tasks.config import load_config
    from tasks.release import rollout

    ex = load_config().execution
    assert rollout.chat_url(ex, "docker") == "http://chat:8000"
    assert rollout.chat_url(ex, "kubernetes") == "http://chat.ecb.svc:8000"
    assert rollout.compose_filters(ex) == {"label": ["com.docker.compose.project=ecb",
                                                     "com.docker.compose.service=chat"]}
    when = datetime.fromisoformat("2026-03-04T05:06:07+02:00")
    annotations = {"kubectl.kubernetes.io/restartedAt": "2026-03-04T03:06:07Z"}  # UTC, as kubectl writes it
    assert rollout.restart_patch(when) == {"spec": {"template": {"metadata": {"annotations": annotations}}}}
    custom = load_config(overrides={"execution.chat_url": "https://chat.example/"}).execution
    assert rollout.chat_url(custom, "kubernetes") == "https://chat.example"
    with pytest.raises(ValueError, match="local"):
        rollout.chat_url(ex, "local")
    imported = {n.module if isinstance(n, ast.ImportFrom) else a.name
                for n in ast.walk(ast.parse((REPO / "tasks" / "release" / "rollout.py").read_text()))
                if isinstance(n, (ast.Import, ast.ImportFrom)) for a in getattr(n, "names", [])}
    assert imported and not {m for m in imported if m.split(".")[0] == "airflow"}  # container side
