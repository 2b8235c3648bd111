#!/usr/bin/env bash
# Install (idempotent) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/ruff check edgelm tests benchmarks
exec .venv/bin/python -m pytest -q "$@"
