"""The trigger form, generated from the typed config so no parameter is written twice."""

from __future__ import annotations

from airflow.sdk import Param

from tasks.config import iter_fields, load_config

JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array"}

# Run switches that are not config fields (they steer this run, not what a model is).
RUN_PARAMS = {
    "force_retrain": ("Force retrain", "Train even when the data and parameters equal those of the released model."),
    "force_deploy": ("Force deploy", "Release the candidate whatever the quality gate says (logged loudly)."),
}


def config_params() -> dict[str, tuple]:
    """Config fields shown on the trigger form: dotted name -> (default from the YAML config, help, field type)."""
    defaults = load_config()
    out = {}
    for name, f, typ in iter_fields():
        if f.metadata.get("param"):
            section, attr = name.split(".")
            out[name] = (getattr(getattr(defaults, section), attr), f.metadata["help"], typ)
    return out


def dag_params() -> dict[str, Param]:
    """New Param objects on every call: a run's conf resolves into them in place (ParamsDict.__setitem__), so shared
    ones would carry one run's force_retrain=True into every DAG parsed later in the same process."""
    params = {name: Param(False, type="boolean", title=title, description=help_text)
              for name, (title, help_text) in RUN_PARAMS.items()}
    for name, (default, help_text, typ) in config_params().items():
        params[name] = Param(default, type=JSON_TYPES.get(typ, "string"), title=name, description=help_text)
    return params
