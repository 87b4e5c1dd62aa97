#!/usr/bin/env bash
# Write .env for docker-compose.yaml with fresh random secrets (never overwrites an existing .env).
#   docker/gen-env.sh [path]     default: .env next to docker-compose.yaml
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-${root}/.env}"
if [[ -e "${out}" ]]; then
  echo "${out} exists; not overwriting it" >&2
  exit 1
fi

secret() { head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
fernet() { head -c 32 /dev/urandom | base64 | tr '+/' '-_'; }
gid="$(stat -c %g /var/run/docker.sock 2>/dev/null || echo 999)"

umask 077
sed -e "s|^POSTGRES_PASSWORD=.*|POSTGRES_PASSWORD=$(secret)|" \
    -e "s|^S3_ACCESS_KEY=.*|S3_ACCESS_KEY=ecb$(secret | head -c 12)|" \
    -e "s|^S3_SECRET_KEY=.*|S3_SECRET_KEY=$(secret)|" \
    -e "s|^AIRFLOW_FERNET_KEY=.*|AIRFLOW_FERNET_KEY=$(fernet)|" \
    -e "s|^AIRFLOW_JWT_SECRET=.*|AIRFLOW_JWT_SECRET=$(secret)|" \
    -e "s|^AIRFLOW_ADMIN_PASSWORD=.*|AIRFLOW_ADMIN_PASSWORD=$(secret | head -c 16)|" \
    -e "s|^ECB_CHAT_ADMIN_TOKEN=.*|ECB_CHAT_ADMIN_TOKEN=$(secret)|" \
    -e "s|^DOCKER_GID=.*|DOCKER_GID=${gid}|" \
    -e "s|^AIRFLOW_UID=.*|AIRFLOW_UID=50000|" \
    "${root}/.env.example" > "${out}"
echo "wrote ${out} (Airflow UI user: admin, password: AIRFLOW_ADMIN_PASSWORD in that file)"
# GIT_COMMIT is not written: it must be the commit of each build, so the build sets it from git.
echo "next: make images (GIT_COMMIT=\$(git rev-parse HEAD) docker compose build), then docker compose up -d"
