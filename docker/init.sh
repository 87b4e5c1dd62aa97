#!/usr/bin/env bash
# One-shot set-up of the compose stack (service airflow-init); every command is safe to run again.
set -euo pipefail

echo "Airflow metadata database"
airflow db migrate

echo "Pool 'gpu': GPU steps take ${ECB_GPU_POOL_SLOTS:-1} slot(s) at most at once (HPO fan-out never oversubscribes)"
airflow pools set gpu "${ECB_GPU_POOL_SLOTS:-1}" "Slots for GPU steps (one per device)"

# Connections come from AIRFLOW_CONN_* in the environment (values from .env, never in the repository): fail here,
# with the name, rather than in the first task.
for conn in aws_default ecb_results mlflow_default; do
  airflow connections get "${conn}" --output json > /dev/null || { echo "connection ${conn} is not defined" >&2; exit 1; }
done

echo "Platform results schema (Alembic) and buckets"
python -m tasks migrate --run-id compose-init
python -c 'from tasks.io import s3; [print(b, "created" if s3.ensure_bucket(b) else "exists") for b in s3.STACK_BUCKETS]'
