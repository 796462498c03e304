#!/usr/bin/env bash
# The main job: the local multi-node federated demo (see `confide demo --help` for options).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/confide demo "$@"
