# shellcheck shell=bash
# Shared environment setup for scripts/run_tests.sh, scripts/run_demo.sh and scripts/update_lock.sh.
#
# Source it from bash (it can also be run directly to only set up):
#   * creates (or reuses) a virtual environment in <repo>/.venv;
#   * installs `pip install -c requirements/lock.txt -e ".[dev]"`: every package at the exact version of the lock,
#     which is what CI tested (torch and torchvision included, so pip never resolves another torch); skipped when
#     setup.cfg, pyproject.toml and the lock are unchanged since the last successful install (stamp file
#     .venv/.nepa-hf-install-stamp);
#   * fetches the test files of the installed transformers release (its source distribution's tests/ folder, where
#     transformers' common model tests live) into .venv/transformers-tests/<version>/, never into git;
#   * installs Debian's dataset-fashion-mnist package when missing and possible
#     (root or password-less sudo); otherwise code falls back to the bundled subset.
# Afterwards $NEPA_REPO_ROOT is the repository root, $NEPA_PYTHON the venv's python,
# $NEPA_TRANSFORMERS_TESTS the transformers tests folder, the venv's bin/ is first on PATH, and the current directory
# is the repository root.
#
# Environment knobs:
#   NEPA_UNLOCKED=1        ignore the lock: the newest releases that setup.cfg allows, in <repo>/.venv-latest (torch
#                          and torchvision stay at the lock's versions unless NEPA_TORCH_SPEC names others); this is
#                          how to try new upstream releases, and what scripts/update_lock.sh builds the next lock from
#   NEPA_EXTRA_REQUIREMENTS  with NEPA_UNLOCKED=1: further requirements, e.g. "transformers==5.25.0"
#   NEPA_TORCH_SPEC        with NEPA_UNLOCKED=1: torch + torchvision requirements (default: the lock's pins)
#   NEPA_PYTHON_BOOTSTRAP  python used to create the venv (default: first python3.x >= 3.10)
#   NEPA_EXTRAS            extras for the editable install (default: dev)
#   NEPA_FORCE_INSTALL=1   reinstall even if the stamp matches
#   NEPA_SKIP_APT=1        never try apt-get

NEPA_REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NEPA_LOCK_FILE="${NEPA_REPO_ROOT}/requirements/lock.txt"
NEPA_UNLOCKED="${NEPA_UNLOCKED:-0}"
if [ "$NEPA_UNLOCKED" = 1 ]; then
    NEPA_VENV="${NEPA_REPO_ROOT}/.venv-latest"
else
    NEPA_VENV="${NEPA_REPO_ROOT}/.venv"
fi
# The lock's torch and torchvision: big local-disk builds that an unlocked install keeps unless told otherwise.
NEPA_TORCH_SPEC="${NEPA_TORCH_SPEC:-$(grep -E '^(torch|torchvision)==' "$NEPA_LOCK_FILE" | tr '\n' ' ')}"
NEPA_EXTRA_REQUIREMENTS="${NEPA_EXTRA_REQUIREMENTS:-}"
NEPA_EXTRAS="${NEPA_EXTRAS:-dev}"
NEPA_FASHION_MNIST_DIR="/usr/share/datasets/fashion-mnist"
export NEPA_REPO_ROOT

_nepa_log() { printf '[nepa-hf setup] %s\n' "$*" >&2; }

_nepa_die() { _nepa_log "ERROR: $*"; return 1; }

# Run a command as root: directly when root, through password-less sudo otherwise.
_nepa_as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo -n "$@"
    else
        return 127
    fi
}

_nepa_can_be_root() {
    [ "$(id -u)" -eq 0 ] || { command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; }
}

_nepa_find_python() {
    local candidate
    for candidate in "${NEPA_PYTHON_BOOTSTRAP:-}" python3 python3.13 python3.12 python3.11 python3.10 python; do
        [ -n "$candidate" ] || continue
        command -v "$candidate" >/dev/null 2>&1 || continue
        if "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

# pip, quiet; on failure show the log (minus pip's noise about absent local index dirs).
_nepa_pip() {
    local log="${NEPA_VENV}/pip-install.log"
    if ! "${NEPA_VENV}/bin/python" -m pip --disable-pip-version-check --no-input "$@" \
            >"$log" 2>&1 </dev/null; then
        _nepa_log "pip $* failed; last lines of $log:"
        grep -v "is ignored: it is neither a file nor a directory" "$log" | tail -n 60 >&2
        return 1
    fi
}

_nepa_install_hash() {
    {
        cat "${NEPA_REPO_ROOT}/setup.cfg" "${NEPA_REPO_ROOT}/pyproject.toml" 2>/dev/null
        if [ "$NEPA_UNLOCKED" = 1 ]; then
            printf 'unlocked %s\n%s\n' "$NEPA_TORCH_SPEC" "$NEPA_EXTRA_REQUIREMENTS"
        else
            cat "$NEPA_LOCK_FILE"
        fi
        printf '%s\n' "$NEPA_EXTRAS"
        "${NEPA_VENV}/bin/python" -c 'import sys; print(sys.version)'
    } | sha256sum | cut -d' ' -f1
}

_nepa_setup_venv() {
    if [ -x "${NEPA_VENV}/bin/python" ] && "${NEPA_VENV}/bin/python" -c 'import sys' 2>/dev/null; then
        :
    else
        local py
        py="$(_nepa_find_python)" || _nepa_die "Python >= 3.10 not found (set NEPA_PYTHON_BOOTSTRAP)" || return 1
        _nepa_log "creating virtual environment ${NEPA_VENV} with $py"
        rm -rf "${NEPA_VENV}"
        if ! "$py" -m venv "${NEPA_VENV}" >/dev/null 2>&1; then
            # Debian/Ubuntu ship venv/ensurepip separately.
            local ver
            ver="$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
            _nepa_log "python -m venv failed; trying apt-get install python${ver}-venv"
            rm -rf "${NEPA_VENV}"
            if [ "${NEPA_SKIP_APT:-0}" != 1 ] && _nepa_can_be_root; then
                export DEBIAN_FRONTEND=noninteractive
                _nepa_as_root apt-get update -qq </dev/null >/dev/null || true
                _nepa_as_root apt-get install -y -qq "python${ver}-venv" </dev/null >/dev/null \
                    || _nepa_as_root apt-get install -y -qq python3-venv </dev/null >/dev/null || true
            fi
            "$py" -m venv "${NEPA_VENV}" || _nepa_die "could not create ${NEPA_VENV} (install python3-venv)" || return 1
        fi
    fi

    local stamp="${NEPA_VENV}/.nepa-hf-install-stamp"
    local want
    want="$(_nepa_install_hash)"
    if [ "${NEPA_FORCE_INSTALL:-0}" != 1 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
        && "${NEPA_VENV}/bin/python" -c 'import importlib.util as u, sys; sys.exit(0 if u.find_spec("torch") and u.find_spec("nepa_hf") else 1)' 2>/dev/null; then
        _nepa_log "environment up to date (.venv)"
        return 0
    fi

    local t0=$SECONDS
    if [ "$NEPA_UNLOCKED" = 1 ]; then
        # Newest releases, but never an unpinned torch (another torch means gigabytes of downloads).
        local torch_pins="${NEPA_VENV}/torch-constraints.txt"
        printf '%s\n' $NEPA_TORCH_SPEC >"$torch_pins"
        _nepa_log "installing nepa-hf (editable, extras: ${NEPA_EXTRAS}) with the newest releases (UNLOCKED;" \
            "${NEPA_TORCH_SPEC}${NEPA_EXTRA_REQUIREMENTS:+; }${NEPA_EXTRA_REQUIREMENTS})"
        # shellcheck disable=SC2086  # word-split on purpose: lists of requirements
        (cd "${NEPA_REPO_ROOT}" && _nepa_pip install -q --upgrade --upgrade-strategy eager -c "$torch_pins" \
            ${NEPA_TORCH_SPEC} -e ".[${NEPA_EXTRAS}]" ${NEPA_EXTRA_REQUIREMENTS}) || return 1
    else
        [ -f "$NEPA_LOCK_FILE" ] || _nepa_die "missing lock file $NEPA_LOCK_FILE" || return 1
        _nepa_log "installing nepa-hf (editable, extras: ${NEPA_EXTRAS}) at the versions of requirements/lock.txt"
        (cd "${NEPA_REPO_ROOT}" && _nepa_pip install -q -c "$NEPA_LOCK_FILE" -e ".[${NEPA_EXTRAS}]") || return 1
    fi
    printf '%s\n' "$want" >"$stamp"
    _nepa_log "python environment ready in $((SECONDS - t0)) s"
}

# transformers' common model tests (ModelTesterMixin, ConfigTester, ...) ship only in its source distribution:
# fetch the tests/ folder of the installed release, once per release, into the venv (outside git).
_nepa_fetch_transformers_tests() {
    local version
    version="$("${NEPA_VENV}/bin/python" -c 'import transformers; print(transformers.__version__)')" || return 1
    NEPA_TRANSFORMERS_TESTS="${NEPA_VENV}/transformers-tests/${version}/tests"
    export NEPA_TRANSFORMERS_TESTS
    [ -f "${NEPA_TRANSFORMERS_TESTS}/test_modeling_common.py" ] && return 0
    _nepa_log "fetching the tests of transformers ${version} (its source distribution)"
    local download
    download="$(mktemp -d)"
    if ! _nepa_pip download -q --no-binary :all: --no-deps -d "$download" \
            "transformers==${version}"; then
        rm -rf "$download"
        return 1
    fi
    mkdir -p "${NEPA_VENV}/transformers-tests/${version}"
    tar -xzf "$download"/transformers-*.tar.gz -C "${NEPA_VENV}/transformers-tests/${version}" \
        --strip-components=1 "transformers-${version}/tests"
    rm -rf "$download"
    [ -f "${NEPA_TRANSFORMERS_TESTS}/test_modeling_common.py" ] \
        || _nepa_die "transformers ${version}'s source distribution has no tests/test_modeling_common.py"
}

_nepa_setup_fashion_mnist() {
    if [ -f "${NEPA_FASHION_MNIST_DIR}/train-images-idx3-ubyte.gz" ] \
        && [ -f "${NEPA_FASHION_MNIST_DIR}/t10k-labels-idx1-ubyte.gz" ]; then
        return 0
    fi
    local note="Fashion-MNIST (Debian package dataset-fashion-mnist) is not installed; code and tests fall back to the bundled subset in data/fashion_mnist. Install it with: apt-get update && apt-get install -y dataset-fashion-mnist"
    if [ "${NEPA_SKIP_APT:-0}" = 1 ] || ! command -v apt-get >/dev/null 2>&1 || ! _nepa_can_be_root; then
        _nepa_log "NOTE: $note"
        return 0
    fi
    _nepa_log "installing Debian package dataset-fashion-mnist"
    export DEBIAN_FRONTEND=noninteractive
    if _nepa_as_root apt-get update -qq </dev/null >/dev/null 2>&1 \
        && _nepa_as_root apt-get install -y -qq dataset-fashion-mnist </dev/null >/dev/null 2>&1; then
        _nepa_log "dataset-fashion-mnist installed in ${NEPA_FASHION_MNIST_DIR}"
    else
        _nepa_log "NOTE: apt-get install dataset-fashion-mnist failed. $note"
    fi
    return 0
}

nepa_setup_env() {
    _nepa_setup_venv || return 1
    _nepa_fetch_transformers_tests || return 1
    _nepa_setup_fashion_mnist
    NEPA_PYTHON="${NEPA_VENV}/bin/python"
    export NEPA_PYTHON
    export VIRTUAL_ENV="${NEPA_VENV}"
    export PATH="${NEPA_VENV}/bin:${PATH}"
    cd "${NEPA_REPO_ROOT}" || return 1
}

# Executed directly (not sourced): just set up.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    nepa_setup_env
fi
