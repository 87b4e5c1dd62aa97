"""The step command: the only contract between Airflow and the ML side.

    python -m tasks <step> --run-id RUN [--config FILE] [--set section.field=value ...] [--input key=value ...]

Arguments and environment go in; a small JSON manifest comes out as the last stdout line (and in
/airflow/xcom/return.json when that folder exists, for KubernetesPodOperator). Exit code 0 means the manifest is
valid; anything else is a failure whose reason is the last stderr lines.
"""

from tasks.runner import main

if __name__ == "__main__":
    raise SystemExit(main())
