#!/usr/bin/env bash
# Install (idempotent) and run the demo on built-in defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/edgelm demo "$@"
