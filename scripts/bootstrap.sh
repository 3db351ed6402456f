#!/usr/bin/env bash
# Make the project's virtual environment (.venv) and install it, C sims included.
# Needs only python3 (3.11+) and a C compiler; with root it installs what a bare
# Debian lacks (python3-venv, gcc). Idempotent: a second run reinstalls only
# when pyproject.toml, CMakeLists.txt or sims/ changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv

need_apt=()
"$PY" -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
command -v cc >/dev/null 2>&1 || need_apt+=(gcc libc6-dev)
if ((${#need_apt[@]})); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        echo "bootstrap: installing ${need_apt[*]} with apt-get" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_apt[@]}" >/dev/null ||
            { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_apt[@]}" >/dev/null; }
    else
        echo "bootstrap: missing ${need_apt[*]}; install them (e.g. sudo apt-get install ${need_apt[*]})" >&2
        exit 1
    fi
fi

[[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
stamp=$VENV/.installed
inputs=(pyproject.toml CMakeLists.txt sims/*.c sims/*.h)
if [[ -f $stamp ]] && [[ -z $(find "${inputs[@]}" -newer "$stamp" 2>/dev/null) ]]; then
    exit 0
fi
export PATH="$PWD/$VENV/bin:$PATH"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
if [[ -f $stamp ]]; then
    echo "bootstrap: pyproject.toml, CMakeLists.txt or sims/ changed: updating $VENV" >&2
else
    echo "bootstrap: installing into $VENV (first time: a few minutes)" >&2
fi
# The build needs the MPI compiler wrappers of the mpich wheel in this venv:
# the sims are then linked against the very libmpi they run with.
pip install "scikit-build-core>=0.10" "cmake>=3.20" ninja "mpich==5.0.2"
pip install --no-build-isolation -e '.[dev,ui]'
touch "$stamp"
echo "bootstrap: ready ($("$VENV/bin/python" -c 'import orchestrator; print(orchestrator.__file__)'))" >&2
