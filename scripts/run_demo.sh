#!/usr/bin/env bash
# Set up the environment (.venv, editable install, Fashion-MNIST) and run the demo.
# Usage: bash scripts/run_demo.sh [demo args...]   (see: bash scripts/run_demo.sh --help)
set -euo pipefail
# shellcheck source=scripts/setup_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
nepa_setup_env

exec "$NEPA_PYTHON" examples/demo.py "$@"
