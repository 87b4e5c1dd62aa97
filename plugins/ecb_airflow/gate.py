"""The quality gate as a branch operator: runs the `quality_gate` step and follows its decision."""

from __future__ import annotations

from airflow.sdk import BaseBranchOperator, Context

from ecb_airflow.steps import build_command, run_command


class QualityGateOperator(BaseBranchOperator):
    """Returns `release_task_id` when the gate releases, otherwise `skip_task_id`. The step's table and one-sentence
    decision land in this task's log; the decision is also pushed as XCom key `decision`."""

    template_fields = ("inputs",)
    ui_color = "#fde68a"

    def __init__(self, *, inputs: dict, release_task_id: str = "register_model", skip_task_id: str = "skip_release",
                 **kwargs):
        super().__init__(**kwargs)
        self.inputs = inputs
        self.release_task_id, self.skip_task_id = release_task_id, skip_task_id

    def choose_branch(self, context: Context) -> str:
        params = dict(context["params"])
        force = bool(params.get("force_deploy"))
        if force:
            self.log.warning("force_deploy is set for this run: the gate will release whatever the comparison says")
        inputs = {**self.inputs, "force_deploy": str(force).lower()}
        decision = run_command(build_command("quality_gate", context["run_id"], params, inputs), self.log,
                               self.execution_timeout)
        context["ti"].xcom_push(key="decision", value=decision)
        branch = self.release_task_id if decision["release"] else self.skip_task_id
        self.log.info("Gate decision %s: %s -> %s", decision["decision_id"], decision["summary"], branch)
        return branch
