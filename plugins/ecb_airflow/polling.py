"""A step run again and again until its manifest says ``ready``: the execution mode's step operator as a sensor.

Waiting on something outside Airflow (the canary's reply count in Postgres) is a question only the container side
can answer, in whichever execution mode is configured. So the sensor is the same step operator the DAG uses for
every step (local subprocess, Docker container or Kubernetes pod) with Airflow's ``BaseSensorOperator`` in front:
each poke runs the step once, and in ``reschedule`` mode the task gives its worker slot back between pokes instead
of sleeping in it. The step's manifest (the last poke's) is the task's XCom, field by field as for every step.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import BaseSensorOperator, PokeReturnValue

from ecb_airflow.steps import _operator

_CLASSES: dict[type, type] = {}


class StepPoll(BaseSensorOperator):
    """Put in front of a step operator class: ``poke`` runs that class's ``execute`` (the step) once."""

    def poke(self, context) -> PokeReturnValue:
        manifest = super(BaseSensorOperator, self).execute(context)  # the step operator's execute, next in the MRO
        return PokeReturnValue(is_done=bool(manifest.get("ready")), xcom_value=manifest)


def poll_class(operator_cls: type) -> type:
    """``StepPoll`` + the mode's step operator class (one class per mode, made once)."""
    if operator_cls not in _CLASSES:
        _CLASSES[operator_cls] = type(f"{operator_cls.__name__}Poll", (StepPoll, operator_cls),
                                      {"__module__": __name__, "template_fields": operator_cls.template_fields,
                                       "ui_color": "#fef3c7"})
    return _CLASSES[operator_cls]


def step_poll(step_name: str, *, poke_interval_s: float, timeout_s: float, retries: int,
              task_id: str | None = None, inputs: dict | None = None, **kwargs):
    """A reschedule-mode sensor running ``python -m tasks <step_name>`` every ``poke_interval_s`` until its manifest
    has ``ready: true``; it fails after ``timeout_s`` (a backstop: a step that waits on time says ready itself).

    A failed poke is retried like the next poke (after ``poke_interval_s``, no backoff), up to ``retries`` times.
    Why so many: Airflow 3.3's scheduler fails a reschedule-mode try when it reads the executor's "success" for one
    poke's exit only after the next poke was already queued (apache/airflow#71172: seen in CI on a loaded machine,
    three times in three minutes at a 5 s interval). The step keeps no state between pokes (the canary's clock is
    in Postgres), so a retry loses nothing but that poke."""
    cls, extra = _operator(step_name, gpu=False)
    return poll_class(cls)(task_id=task_id or step_name, step=step_name, inputs=inputs, mode="reschedule",
                           poke_interval=poke_interval_s, timeout=timeout_s, retries=retries,
                           retry_delay=timedelta(seconds=poke_interval_s), retry_exponential_backoff=0,
                           **{**extra, **kwargs})
