"""A step as a Kubernetes pod (imported only in kubernetes mode: the provider pulls in the kubernetes client)."""

from __future__ import annotations

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.providers.cncf.kubernetes.secret import Secret
from kubernetes.client import models as k8s

from ecb_airflow.execution import CACHE_DIR, ENTRYPOINT, STEP_UID, container_env, step_arguments
from ecb_airflow.step_operator import STEP_TEMPLATE_FIELDS, StepOperator
from tasks.config import ExecutionConfig

GPU_RESOURCE = "nvidia.com/gpu"


def _cache_volume(ex: ExecutionConfig) -> k8s.V1Volume:
    if ex.k8s_cache_pvc:
        claim = k8s.V1PersistentVolumeClaimVolumeSource(claim_name=ex.k8s_cache_pvc)
        return k8s.V1Volume(name="cache", persistent_volume_claim=claim)
    return k8s.V1Volume(name="cache", empty_dir=k8s.V1EmptyDirVolumeSource())


def pod_kwargs(step_name: str, gpus: int, ex: ExecutionConfig) -> dict:
    """KubernetesPodOperator arguments of one step. Settings and secrets come from the ConfigMap and Secret by name
    (envFrom), so no value is in the pod spec; GPU steps get the GPU limit, node selector and tolerations."""
    kwargs = {
        "name": f"ecb-{step_name.replace('_', '-')}", "namespace": ex.k8s_namespace, "image": ex.image,
        "image_pull_policy": ex.image_pull_policy, "cmds": list(ENTRYPOINT), "env_vars": container_env(ex),
        "configmaps": [ex.k8s_config_map], "secrets": [Secret("env", None, ex.k8s_secret)],
        "service_account_name": ex.k8s_service_account, "kubernetes_conn_id": ex.k8s_conn_id,
        "image_pull_secrets": [k8s.V1LocalObjectReference(name=n) for n in ex.k8s_image_pull_secrets],
        "volumes": [_cache_volume(ex)], "volume_mounts": [k8s.V1VolumeMount(name="cache", mount_path=CACHE_DIR)],
        "security_context": k8s.V1PodSecurityContext(fs_group=STEP_UID),  # the cache volume is writable
        "container_security_context": k8s.V1SecurityContext(run_as_non_root=True, run_as_user=STEP_UID,
                                                             allow_privilege_escalation=False),
        "labels": {"app.kubernetes.io/part-of": "ecb", "ecb/step": step_name},
        "startup_timeout_seconds": ex.k8s_startup_timeout_s, "do_xcom_push": True, "get_logs": True,
        "on_finish_action": "delete_succeeded_pod",  # a failed pod stays for `kubectl describe`
    }
    if gpus:
        kwargs.update(container_resources=k8s.V1ResourceRequirements(limits={GPU_RESOURCE: str(gpus)}),
                      node_selector=dict(ex.k8s_node_selector),
                      tolerations=[k8s.V1Toleration(**t) for t in ex.k8s_tolerations])
    return kwargs


class KubernetesStepOperator(StepOperator, KubernetesPodOperator):
    """Run ``python -m tasks <step>`` in a pod; the step writes /airflow/xcom/return.json, which becomes the XCom."""

    template_fields = (*KubernetesPodOperator.template_fields, *STEP_TEMPLATE_FIELDS)
    ui_color = "#c7d2fe"

    def execute(self, context):
        self.arguments = step_arguments(self.step, context, self.inputs, self.overrides)
        return super().execute(context)
