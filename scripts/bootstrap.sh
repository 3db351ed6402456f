#!/usr/bin/env bash
# Make the project's virtual environment (.venv) and install it, C sims included.
# Needs only python3 (3.11+) and a C compiler; with root it installs what a bare
# Debian lacks (python3-venv, gcc). Idempotent: a second run reinstalls only
# when pyproject.toml, constraints.txt, CMakeLists.txt, sims/ or MPICC changed.
#
#   MPICC=/path/to/mpicc scripts/bootstrap.sh   build the sims against that MPI
#                                               (default: the PyPI mpich wheel's)
#   scripts/bootstrap.sh --test-deps            also install, as root with apt, what
#                                               the tests use: Debian's MPICH and
#                                               Open MPI, and LAMMPS (examples/lammps-lj)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
TEST_APT=(mpich libmpich-dev openmpi-bin libopenmpi-dev lammps)

apt_install() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null ||
        { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
            --no-install-recommends "$@" >/dev/null; }
}

if [[ ${1:-} == --test-deps ]]; then
    missing=()
    for p in "${TEST_APT[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    ((${#missing[@]})) || exit 0
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        echo "bootstrap: installing ${missing[*]} with apt-get (for the tests)" >&2
        apt_install "${missing[@]}"
    else
        echo "bootstrap: tests that need ${missing[*]} will skip (install them as root with apt-get)" >&2
    fi
    exit 0
fi

need_apt=()
"$PY" -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
command -v cc >/dev/null 2>&1 || need_apt+=(gcc libc6-dev)
if ((${#need_apt[@]})); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        echo "bootstrap: installing ${need_apt[*]} with apt-get" >&2
        apt_install "${need_apt[@]}"
    else
        echo "bootstrap: missing ${need_apt[*]}; install them (e.g. sudo apt-get install ${need_apt[*]})" >&2
        exit 1
    fi
fi

[[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
# The MPI the sims are built with: MPICC if given, else the one of the last build,
# else the mpich wheel's in the venv (MPICC=$PWD/.venv/bin/mpicc goes back to it).
mpicc=${MPICC:-}
record=$VENV/.mpicc  # the choice, kept for later runs and for new-sim's rebuild command
[[ -z $mpicc && -s $record ]] && mpicc=$(cat "$record")
if [[ -n $mpicc ]]; then
    found=$(command -v "$mpicc" 2>/dev/null) || { echo "bootstrap: MPICC=$mpicc is not an executable" >&2; exit 1; }
    # Absolute, but symlinks kept: Open MPI's mpicc is a link to opal_wrapper, which reads
    # its role from the name it is called by (as opal_wrapper it compiles nothing, and
    # FindMPI reports "Could NOT find MPI_C"); Debian's /usr/bin/mpicc is an alternatives link.
    mpicc=$(realpath --no-symlinks "$found")
else
    mpicc=$PWD/$VENV/bin/mpicc
fi
stamp=$VENV/.installed
# The project's own modules as bytecode, as a non-editable pip install leaves them: an editable
# install compiles nothing, and where PYTHONDONTWRITEBYTECODE is set (CI, many clusters' module
# environments) every `python -m orchestrator run` compiled them again, 0.1 s before its first
# sim (issue 25). Only what changed since the last setup is compiled.
compile_sources() { "$VENV/bin/python" -m compileall -q -j 0 orchestrator models >/dev/null; }
inputs=(pyproject.toml constraints.txt CMakeLists.txt sims/*.c sims/*.h)
if [[ -f $stamp ]] && [[ -z $(find "${inputs[@]}" -newer "$stamp" 2>/dev/null) ]] &&
    [[ $(cat "$record" 2>/dev/null) == "$mpicc" ]]; then
    compile_sources
    exit 0
fi
export PATH="$PWD/$VENV/bin:$PATH"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
if [[ -f $stamp ]] && [[ -z $(find pyproject.toml constraints.txt -newer "$stamp" 2>/dev/null) ]]; then
    # The dependencies are in place: rebuild the sims (and the editable hook) only, in seconds.
    echo "bootstrap: CMakeLists.txt, sims/ or MPICC changed: rebuilding the sims" >&2
    only=(--no-deps)
    project=.
else
    if [[ -f $stamp ]]; then
        echo "bootstrap: pyproject.toml or constraints.txt changed: updating $VENV" >&2
    else
        echo "bootstrap: installing into $VENV (first time: a few minutes)" >&2
    fi
    # The exact versions (torch's CPU wheel among them) come from constraints.txt.
    pip install -c constraints.txt "scikit-build-core>=0.10" "cmake>=3.20" ninja mpich
    only=()
    project='.[dev,ui]'
fi
echo "bootstrap: building the sims with $mpicc" >&2
# Passed explicitly, so CMake never takes whichever mpicc PATH shows first.
pip install -c constraints.txt --no-build-isolation "${only[@]}" -e "$project" \
    --config-settings=cmake.define.MPI_C_COMPILER="$mpicc"
echo "$mpicc" >"$record"
compile_sources
touch "$stamp"
echo "bootstrap: ready ($("$VENV/bin/python" -c 'import orchestrator; print(orchestrator.__file__)'))" >&2
