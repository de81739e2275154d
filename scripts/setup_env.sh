# shellcheck shell=bash
# Shared environment setup for scripts/run_tests.sh and scripts/run_demo.sh.
#
# Source it from bash (it can also be run directly to only set up):
#   * creates (or reuses) a virtual environment in <repo>/.venv;
#   * installs torch and torchvision (pinned; never let pip resolve an unpinned torch) first, then
#     `pip install -e ".[dev]"`; skipped when setup.cfg / pyproject.toml are unchanged
#     since the last successful install (stamp file .venv/.nepa-hf-install-stamp);
#   * installs Debian's dataset-fashion-mnist package when missing and possible
#     (root or password-less sudo); otherwise code falls back to the bundled subset.
# Afterwards $NEPA_REPO_ROOT is the repository root, $NEPA_PYTHON the venv's python,
# the venv's bin/ is first on PATH, and the current directory is the repository root.
#
# Environment knobs:
#   NEPA_PYTHON_BOOTSTRAP  python used to create the venv (default: first python3.x >= 3.10)
#   NEPA_TORCH_SPEC        torch + torchvision requirements installed first (default: torch==2.14.1 torchvision==0.29.1)
#   NEPA_EXTRAS            extras for the editable install (default: dev)
#   NEPA_FORCE_INSTALL=1   reinstall even if the stamp matches
#   NEPA_SKIP_APT=1        never try apt-get

NEPA_REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NEPA_VENV="${NEPA_REPO_ROOT}/.venv"
NEPA_TORCH_SPEC="${NEPA_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
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
        printf '%s\n%s\n' "$NEPA_TORCH_SPEC" "$NEPA_EXTRAS"
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
    # torch first: an unpinned torch resolved by another package pulls GBs of CUDA wheels.
    _nepa_log "installing ${NEPA_TORCH_SPEC}"
    # shellcheck disable=SC2086  # word-split on purpose: two pinned requirements
    _nepa_pip install -q ${NEPA_TORCH_SPEC} || return 1
    _nepa_log "installing nepa-hf (editable, extras: ${NEPA_EXTRAS}) and its dependencies"
    (cd "${NEPA_REPO_ROOT}" && _nepa_pip install -q -e ".[${NEPA_EXTRAS}]") || return 1
    printf '%s\n' "$want" >"$stamp"
    _nepa_log "python environment ready in $((SECONDS - t0)) s"
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
