"""What every step operator carries, whatever runs the step: its name, upstream inputs and config overrides.

The local, Docker and Kubernetes operators put this class first among their bases. It is a ``BaseOperator`` on
purpose: Airflow's operator metaclass wraps the ``__init__`` of each operator class for ``default_args`` and records
its parameter names, which ``partial().expand(inputs=...)`` checks; a plain mixin's ``__init__`` would be neither.
"""

from __future__ import annotations

from airflow.sdk import BaseOperator

# Rendered when the task runs: upstream values (XComArgs, templates) and the settings the mode adds.
STEP_TEMPLATE_FIELDS = ("inputs", "overrides")


class StepOperator(BaseOperator):
    """Base of the step operators; each mode's class adds how the command runs (``execute``)."""

    template_fields = STEP_TEMPLATE_FIELDS

    def __init__(self, *, step: str, inputs: dict | None = None, overrides: dict | None = None, **kwargs):
        # Every manifest field is also its own XCom, so the DAG passes fields as ``task.output["key"]``;
        # the whole manifest stays the return_value.
        kwargs.setdefault("multiple_outputs", True)
        super().__init__(**kwargs)
        self.step = step
        self.inputs = inputs or {}
        self.overrides = overrides or {}

