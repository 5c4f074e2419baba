#!/usr/bin/env bash
# The test suite: ./run_tests.sh [pytest args]. Sets up .venv first if needed.
set -euo pipefail
cd "$(dirname "$0")"
source ./setup_env.sh
exec "$PY" -m pytest -q "$@"
