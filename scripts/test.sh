#!/usr/bin/env bash
# The test suite: lint, generated-code freshness, unit and integration tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/python -m confide.protos.generate --check
exec .venv/bin/python -m pytest "$@"
