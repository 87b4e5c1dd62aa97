"""A step as a Docker container (imported only in docker mode, so other modes never load the Docker provider)."""

from __future__ import annotations

import os

from airflow.providers.docker.operators.docker import DockerOperator
from docker.types import DeviceRequest, Mount

from ecb_airflow.command import parse_manifest
from ecb_airflow.execution import CACHE_DIR, ENTRYPOINT, STEP_UID, container_env, run_time_env, step_arguments
from ecb_airflow.step_operator import STEP_TEMPLATE_FIELDS, StepOperator
from tasks.config import ExecutionConfig

DOCKER_SOCKET = "/var/run/docker.sock"


def docker_kwargs(step_name: str, gpus: int, ex: ExecutionConfig) -> dict:
    """DockerOperator arguments of one step; nothing secret (secrets are added when the task runs)."""
    mounts = [Mount(target=CACHE_DIR, source=ex.docker_cache_volume, type="volume")]
    if step_name in ex.docker_socket_steps:  # the deploy step restarts the compose chat service
        mounts.append(Mount(target=DOCKER_SOCKET, source=DOCKER_SOCKET, type="bind"))
    return {
        "image": ex.image, "entrypoint": list(ENTRYPOINT), "environment": container_env(ex),
        "docker_url": ex.docker_url, "network_mode": ex.docker_network, "mounts": mounts,
        "device_requests": [DeviceRequest(count=gpus, capabilities=[["gpu"]])] if gpus else None,
        "force_pull": ex.image_pull_policy == "Always", "shm_size": ex.docker_shm_mb * 2**20,
        # The worker is itself a container: a bind-mounted temp dir from it would not exist on the host.
        "mount_tmp_dir": False, "auto_remove": "success", "xcom_all": True, "labels": {"ecb.step": step_name},
    }


class DockerStepOperator(StepOperator, DockerOperator):
    """Run ``python -m tasks <step>`` in a container of the step image; its manifest becomes the XCom."""

    template_fields = (*DockerOperator.template_fields, *STEP_TEMPLATE_FIELDS)
    ui_color = "#bfdbfe"

    def execute(self, context) -> dict:
        self.command = step_arguments(self.step, context, self.inputs, self.overrides)
        # private_environment is neither templated nor rendered in the UI: the place for connection secrets.
        self._private_environment = {**run_time_env(), **self._private_environment}
        if any(m["Target"] == DOCKER_SOCKET for m in self.mounts) and os.path.exists(DOCKER_SOCKET):
            self.user = f"{STEP_UID}:{os.stat(DOCKER_SOCKET).st_gid}"  # the socket's group, not root
        lines = super().execute(context) or []
        return parse_manifest(lines if isinstance(lines, list) else [lines])
