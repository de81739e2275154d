#!/usr/bin/env bash
# Set up the environment (.venv, editable install, Fashion-MNIST) and run the test suite.
# Usage: bash scripts/run_tests.sh [pytest args...]   e.g. -k processor, tests/test_data.py
set -euo pipefail
# shellcheck source=scripts/setup_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
nepa_setup_env
# transformers' common tests are part of the suite: here a missing copy is an error, not a skip.
export NEPA_REQUIRE_TRANSFORMERS_TESTS=1

# Default to the tests/ folder unless a test path (file, dir or node id) was given.
has_path=0
for arg in "$@"; do
    case "$arg" in
        -*) ;;
        *) if [ -e "${arg%%::*}" ]; then has_path=1; fi ;;
    esac
done
if [ "$has_path" = 1 ]; then
    set -- -q "$@"
else
    set -- tests -q "$@"
fi

echo "[nepa-hf] python -m pytest $*" >&2
exec "$NEPA_PYTHON" -m pytest "$@"
