#!/usr/bin/env bash
# Build the C sims against a given MPI into a directory of their own, beside the
# venv's (which stay as they are): OUTDIR/bin/sim-*. The tests use it to run the
# reference campaign with Debian's MPICH and Open MPI (build/mpi-<flavour>/).
#
#   scripts/build-sims.sh /usr/bin/mpicc.openmpi build/mpi-openmpi
set -euo pipefail
[[ $# -eq 2 ]] || { echo "usage: $0 /path/to/mpicc OUTDIR" >&2; exit 2; }
cd "$(dirname "$0")/.."
mpicc=$1
out=$(mkdir -p "$2" && cd "$2" && pwd)
bin=$PWD/.venv/bin
cmake=$bin/cmake
[[ -x $cmake ]] || cmake=$(command -v cmake) || { echo "build-sims: no cmake (run make setup)" >&2; exit 1; }
gen=()
[[ -x $bin/ninja ]] && gen=(-G Ninja -DCMAKE_MAKE_PROGRAM="$bin/ninja")
"$cmake" -S . -B "$out/cmake" "${gen[@]}" -DMPI_C_COMPILER="$mpicc" -DCMAKE_INSTALL_PREFIX="$out" \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo >"$out/configure.log" 2>&1 ||
    { tail -n 30 "$out/configure.log" >&2; exit 1; }
"$cmake" --build "$out/cmake" -j 2 >"$out/build.log" 2>&1 || { tail -n 30 "$out/build.log" >&2; exit 1; }
"$cmake" --install "$out/cmake" >>"$out/build.log" 2>&1
echo "build-sims: $out/bin (MPI: $mpicc)" >&2
