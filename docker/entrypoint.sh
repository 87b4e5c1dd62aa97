#!/usr/bin/env bash
# Entrypoint of the Airflow image: writes the simple auth manager's password file from AIRFLOW_ADMIN_PASSWORD
# (from .env), so the UI login is the password the operator chose rather than a generated one, then hands over to
# the official entrypoint (which turns `api-server`, `scheduler`, ... into `airflow <command>`).
set -euo pipefail

if [[ -n "${AIRFLOW_ADMIN_PASSWORD:-}" ]]; then
  passwords="${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE:-${AIRFLOW_HOME}/simple_auth_manager_passwords.json.generated}"
  (umask 077 && python -c 'import json, os, sys; json.dump({"admin": os.environ["AIRFLOW_ADMIN_PASSWORD"]}, sys.stdout)' \
    > "${passwords}")
fi
exec /entrypoint "$@"
