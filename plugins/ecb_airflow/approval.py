"""A person approves or rejects a release: Airflow's human-in-the-loop operator, asked only when it matters.

The task follows the ``quality_gate`` step. ``decisions.approval_needed`` decides from the gate's manifest and the
run's ``gate.require_approval`` whether to ask; when not, the task is skipped (and so is ``record_approval``). When
it asks, the task waits in Airflow's ``awaiting_input`` state (no worker slot, no triggerer) with the gate's numbers
and reasons as its body, answered in the UI (Required actions) or through the REST API
(``PATCH /api/v2/dags/{dag}/dagRuns/{run}/taskInstances/approve_release/-1/hitlDetails``). No answer within
``gate.approval_timeout_s`` answers Reject (fail closed). The answer -- status, who, when, comment, why asked -- is
the task's XCom, which the ``record_approval`` step writes to ``gate_decisions``.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk import Param, ParamsDict
from airflow.sdk.exceptions import AirflowSkipException

from ecb_airflow import decisions

REQUIRE_PARAM = "gate.require_approval"  # the trigger-form field (a config field with param=True)
COMMENT_HELP = "Why (kept with the answer in gate_decisions)."


class GateApprovalOperator(HITLOperator):
    """Ask a person whether the candidate the gate released may be registered and deployed."""

    template_fields = (*HITLOperator.template_fields, "decision")
    ui_color = "#fde68a"

    def __init__(self, *, decision, timeout_s: int, **kwargs):
        # The form has one field of its own. Airflow passes the DAG's params in as well (source "dag"); the base
        # keeps only the task's own (source "task") for the form.
        params = kwargs.get("params")
        kwargs["params"] = params if isinstance(params, ParamsDict) else ParamsDict(params or {})
        kwargs["params"].update(ParamsDict({"comment": Param("", type="string", title="Comment", source="task",
                                                             description=COMMENT_HELP)}))
        super().__init__(subject="Release the candidate chatbot model?", options=[decisions.APPROVE, decisions.REJECT],
                         defaults=[decisions.REJECT], response_timeout=timedelta(seconds=timeout_s), **kwargs)
        self.decision = decision  # the quality_gate manifest (an XComArg, resolved each time the task starts)
        self.timeout_s = timeout_s

    def _asked(self, context) -> tuple[bool, str]:
        return decisions.approval_needed(self.decision, bool(context["params"].get(REQUIRE_PARAM)))

    def execute(self, context):
        needed, why = self._asked(context)
        self.log.info("%s", why)
        if not needed:
            raise AirflowSkipException(why)
        self.subject = f"Release the candidate of run {context['run_id']}?"
        self.body = decisions.approval_body(self.decision, why, self.timeout_s)
        return super().execute(context)

    def execute_complete(self, context, event):
        super().execute_complete(context, event)  # validates the chosen option and the form input
        # The resumed task is a new process: the reason is worked out again from the same manifest and params.
        answer = decisions.approval_answer(event, self._asked(context)[1])
        self.log.info("Approval answer: %s by %s at %s%s", answer["status"], answer["by"] or "nobody (timeout)",
                      answer["at"], f" ({answer['comment']})" if answer["comment"] else "")
        return answer
