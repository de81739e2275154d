#!/usr/bin/env bash
# Bump requirements/lock.txt on purpose: install the newest releases that setup.cfg allows (plus the requirements
# given here) in a fresh .venv-latest, run the whole suite there, and rewrite the lock only if it passes.
# Usage: bash scripts/update_lock.sh [REQUIREMENT ...]     e.g. transformers==5.25.0 (others still newest)
# torch and torchvision stay at the lock's versions unless named here (they are multi-GB local-disk builds).
# Then review `git diff requirements/lock.txt`, and commit it with the code changes the new releases needed.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export NEPA_UNLOCKED=1 NEPA_FORCE_INSTALL=1 NEPA_EXTRA_REQUIREMENTS="$*"
rm -rf "${repo}/.venv-latest"  # a fresh environment: the lock lists exactly what the install pulls in
# shellcheck source=scripts/setup_env.sh
source "${repo}/scripts/setup_env.sh"  # NEPA_TORCH_SPEC: the lock's torch and torchvision pins
# ... each replaced by a requirement given here for that package.
for requirement in "$@"; do
    name="${requirement%%[=<>~!]*}"
    case "$name" in
        torch | torchvision)
            NEPA_TORCH_SPEC="$(printf '%s\n' $NEPA_TORCH_SPEC | { grep -v "^${name}[=<>~!]" || true; } | tr '\n' ' ')"
            NEPA_TORCH_SPEC="${NEPA_TORCH_SPEC}${requirement}" ;;
    esac
done
nepa_setup_env

export NEPA_REQUIRE_TRANSFORMERS_TESTS=1
echo "[nepa-hf] the suite on the newest releases: python -m pytest tests -q" >&2
"$NEPA_PYTHON" -m pytest tests -q

lock="$NEPA_LOCK_FILE"
{
    sed -n '/^#/p' "$lock"  # the header
    "$NEPA_PYTHON" -m pip freeze --exclude-editable --disable-pip-version-check | LC_ALL=C sort -f
} >"${lock}.new"
mv "${lock}.new" "$lock"
echo "[nepa-hf] requirements/lock.txt rewritten; the changes:" >&2
git -C "$repo" diff --stat -- requirements/lock.txt >&2
git -C "$repo" diff -U0 -- requirements/lock.txt | grep -E '^[+-][^+-]' >&2 || echo "(none)" >&2
