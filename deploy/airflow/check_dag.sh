#!/usr/bin/env bash
# Imports the DAG with real Airflow in its own virtual environment (never the project's), made
# from requirements.txt and kept outside the repository: reused while requirements.txt is unchanged.
#   AIRFLOW_CHECK_VENV=DIR  where the environment lives
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
requirements="$here/requirements.txt"
venv="${AIRFLOW_CHECK_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/pnasnet-embeddings/airflow-venv}"
stamp="$(sha256sum "$requirements" | cut -d' ' -f1)"
if [ "$(cat "$venv/.requirements-sha256" 2>/dev/null)" != "$stamp" ]; then
  echo "check_dag: installing Airflow into $venv"
  started=$SECONDS
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --requirement "$requirements"
  echo "$stamp" > "$venv/.requirements-sha256"
  echo "check_dag: Airflow installed in $((SECONDS - started)) s"
fi
# A throw-away AIRFLOW_HOME: parsing a DAG file needs no database or scheduler.
airflow_home="$(mktemp -d)"
trap 'rm -rf "$airflow_home"' EXIT
AIRFLOW_HOME="$airflow_home" AIRFLOW__CORE__LOAD_EXAMPLES=False \
  "$venv/bin/python" "$here/check_dag.py"
