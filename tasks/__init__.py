"""Container side of the platform: every ML step, run as ``python -m tasks <step>``. Never imports airflow."""
