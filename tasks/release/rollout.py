"""Roll out the chat service in the container modes: restart it so it loads the registry's new champion.

Called by the deploy step from inside its step container. ``docker`` mode restarts the compose ``chat`` service's
containers through the Docker socket (the step gets it, see ``execution.docker_socket_steps``); ``kubernetes`` mode
triggers a rollout of the chat Deployment the way ``kubectl rollout restart`` does (a new pod-template annotation),
so the old pods serve until the new ones are ready. Either returns the base URL the deploy step then polls on
``/api/model``. Never imports airflow.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from tasks.config import Config, ExecutionConfig

CHAT_PORT = 8000  # the port gunicorn binds in the chat container (docker-compose.yaml, Dockerfile.gpu)
RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"
log = logging.getLogger(__name__)


class RolloutError(RuntimeError):
    """The chat service could not be restarted; the message says what was looked for and where."""


def chat_url(ex: ExecutionConfig, mode: str) -> str:
    """Base URL of the chat service as seen from a step container or pod."""
    if ex.chat_url:
        return ex.chat_url.rstrip("/")
    if mode == "docker":
        return f"http://{ex.chat_service}:{CHAT_PORT}"  # the service name resolves on the compose network
    if mode == "kubernetes":
        return f"http://{ex.chat_service}.{ex.k8s_namespace}.svc:{CHAT_PORT}"
    raise ValueError(f"no container rollout in execution mode {mode!r} (expected docker or kubernetes)")


def compose_filters(ex: ExecutionConfig) -> dict:
    """Docker API filters selecting the compose chat service's containers (labels compose sets on every one)."""
    return {"label": [f"com.docker.compose.project={ex.compose_project}",
                      f"com.docker.compose.service={ex.chat_service}"]}


def restart_patch(now: datetime) -> dict:
    """Deployment patch that starts a rolling restart: a changed pod-template annotation (as kubectl does)."""
    stamp = now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: stamp}}}}}


def _restart_compose(ex: ExecutionConfig) -> None:
    import docker

    client = docker.DockerClient(base_url=ex.docker_url)
    try:
        containers = client.containers.list(all=True, filters=compose_filters(ex))
        if not containers:
            raise RolloutError(f"no container of compose service {ex.chat_service!r} in project "
                               f"{ex.compose_project!r} on {ex.docker_url} (is the stack up?)")
        for container in containers:
            log.info("Restarting container %s of compose service %s", container.name, ex.chat_service)
            container.restart(timeout=30)
    finally:
        client.close()


def _restart_deployment(ex: ExecutionConfig) -> None:
    from kubernetes import client, config

    try:
        config.load_incluster_config()  # the step pod's service account
    except config.ConfigException:
        config.load_kube_config()  # a person running the step by hand
    try:
        client.AppsV1Api().patch_namespaced_deployment(ex.chat_service, ex.k8s_namespace,
                                                       restart_patch(datetime.now(UTC)))
    except client.ApiException as exc:
        raise RolloutError(f"could not restart Deployment {ex.k8s_namespace}/{ex.chat_service}: "
                           f"{exc.status} {exc.reason}") from exc
    log.info("Rolling restart of Deployment %s/%s started", ex.k8s_namespace, ex.chat_service)


def roll_out(cfg: Config, mode: str) -> str:
    """Restart the chat service of ``mode`` (docker or kubernetes) and return its base URL to poll."""
    url = chat_url(cfg.execution, mode)
    if mode == "docker":
        _restart_compose(cfg.execution)
    else:
        _restart_deployment(cfg.execution)
    return url
