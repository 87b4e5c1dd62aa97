"""What every step operator carries, whatever runs the step: its name, upstream inputs and config overrides.

The local, Docker and Kubernetes operators put this class first among their bases. It is a ``BaseOperator`` on
purpose: Airflow's operator metaclass wraps the ``__init__`` of each operator class for ``default_args`` and records
its parameter names, which ``partial().expand(inputs=...)`` checks; a plain mixin's ``__init__`` would be neither.

A step task with ``outlets`` (Airflow Assets) attaches the manifest fields named in ``outlet_fields`` to the asset
event it emits on success (the digest of the synced raw data, the snapshot id, the registered version), whatever
runs the step: a post-execute hook, which the task runner calls with the manifest ``execute`` returned.
"""

from __future__ import annotations

from airflow.sdk import BaseOperator

# Rendered when the task runs: upstream values (XComArgs, templates) and the settings the mode adds.
STEP_TEMPLATE_FIELDS = ("inputs", "overrides")


class StepOperator(BaseOperator):
    """Base of the step operators; each mode's class adds how the command runs (``execute``)."""

    template_fields = STEP_TEMPLATE_FIELDS

    def __init__(self, *, step: str, inputs: dict | None = None, overrides: dict | None = None,
                 outlet_fields: tuple[str, ...] = (), **kwargs):
        # Every manifest field is also its own XCom, so the DAG passes fields as ``task.output["key"]``;
        # the whole manifest stays the return_value.
        kwargs.setdefault("multiple_outputs", True)
        if outlet_fields:
            kwargs.setdefault("post_execute", attach_manifest_to_outlets)
        super().__init__(**kwargs)
        self.step = step
        self.inputs = inputs or {}
        self.overrides = overrides or {}
        self.outlet_fields = tuple(outlet_fields)


def outlet_extra(manifest: dict, fields: tuple[str, ...]) -> dict:
    """The manifest fields an asset event carries as its extra (those the manifest has)."""
    return {name: manifest[name] for name in fields if name in manifest}


def attach_manifest_to_outlets(context, result) -> None:
    """Post-execute hook: every asset in the task's outlets gets the step manifest's ``outlet_fields`` as the extra
    of the event this success emits (the task runner sends the event after the hook)."""
    task = context["task"]
    extra = outlet_extra(result or {}, task.outlet_fields)
    for asset in task.outlets:
        context["outlet_events"][asset].extra.update(extra)
        task.log.info("Asset event for %s (%s): %s", asset.name, asset.uri, extra)

