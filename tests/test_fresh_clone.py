"""The README's third command from a fresh clone: ``make setup MPICC=...`` builds the sims against
Debian's Open MPI, then Debian's MPICH, then back to the mpich wheel, and after each build the
reference campaign (examples/sine) meets its target with sims that ``ldd`` shows linked against
that MPI, launched by that MPI's own mpiexec.

One clone and one venv serve the three builds. The clone is of the repository's committed HEAD
(``git clone``, as a user gets it). Every build is the user's path, unchanged: ``make setup``
runs ``scripts/bootstrap.sh``, which pip-installs the build tools and the project editable and
has scikit-build-core run CMake with the given MPICC. Only the venv's creation is shortened in
the ``make test`` case: the test makes ``.venv`` itself (bootstrap.sh then finds it) with a
``.pth`` line to this interpreter's site-packages, so pip (itself among them) finds torch, dask,
mlflow and the build tools already installed instead of unpacking 1.7 GB again (about 7 min on a
loaded 2-core box); only the mpich wheel, whose ``bin/mpicc``, ``bin/mpiexec`` and
``lib/libmpi.so.12`` the wheel build and its runs use, is installed into the clone's venv. The
``full`` case lets bootstrap.sh make the venv and install everything, as on a new machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.launchers.mpiexec import ISOLATE
from tests.conftest import REPO

pytestmark = pytest.mark.integration

NEED = "run `scripts/bootstrap.sh --test-deps` as root (apt-get install mpich libmpich-dev openmpi-bin libopenmpi-dev)"


def user_env() -> dict[str, str]:
    """The environment a user's shell has: no venv activated, nothing on PYTHONPATH."""
    return {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}


def run(argv: list[str], cwd: Path, timeout: int) -> subprocess.CompletedProcess[str]:
    t0 = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, env=user_env(), capture_output=True, text=True, timeout=timeout)
    print(f"fresh clone: {time.perf_counter() - t0:6.1f} s  {' '.join(argv[:4])[:100]}")  # pytest -s shows them
    return done


def venv_sharing_this_ones_packages(clone: Path) -> None:
    """``clone/.venv`` with the mpich wheel in it and every other dependency seen through a ``.pth``."""
    venv = clone / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300,
                   env=user_env())
    python = venv / "bin" / "python"
    site = run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], clone, 60)
    ours = [p for p in sys.path if p.endswith("site-packages") and not p.startswith(str(clone))]
    Path(site.stdout.strip(), "zz-project-deps.pth").write_text("".join(f"{p}\n" for p in ours))
    done = run([str(python), "-m", "pip", "--disable-pip-version-check", "-q", "install", "--ignore-installed",
                "--no-deps", "-c", "constraints.txt", "mpich"], clone, 600)
    assert done.returncode == 0, done.stderr[-3000:]


def launched_by(argv: list[str]) -> str:
    """The mpiexec of a local sim's command (behind the network-namespace wrapper when there is one)."""
    return argv[len(ISOLATE)] if argv[: len(ISOLATE)] == ISOLATE else argv[0]


def setup_and_run_sine(clone: Path, mpicc: str, libmpi: str, mpiexec: str) -> None:
    """``make setup MPICC=mpicc``, then the sine campaign to its target with sims linked to ``libmpi``."""
    venv_bin = clone / ".venv" / "bin"
    made = run(["make", "setup", f"MPICC={mpicc}"], clone, 1200)
    assert made.returncode == 0, f"make setup MPICC={mpicc}:\n{made.stderr[-4000:]}"
    assert f"bootstrap: building the sims with {mpicc}" in made.stderr
    assert f"bootstrap: ready ({clone / 'orchestrator' / '__init__.py'})" in made.stderr  # the clone's code
    assert (clone / ".venv" / ".mpicc").read_text().strip() == mpicc
    for sim in ("sim-cheap", "sim-expensive"):
        linked = run(["ldd", str(venv_bin / sim)], clone, 60).stdout
        assert f"{libmpi} => " in linked, f"{sim} built with {mpicc}:\n{linked}"

    work = clone.parent / f"runs-{Path(mpicc).name}"
    ran = run([str(venv_bin / "python"), "-m", "orchestrator", "run", "examples/sine/loop.yml", "--workdir",
               str(work), "--no-live", "--set", "tracking.enabled=false"], clone, 600)
    assert ran.returncode == 0, f"sine with {mpicc}:\n{ran.stderr[-4000:]}"
    run_dir = next(work.iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["target_met"] is True and summary["sims_failed"] == 0
    events = [json.loads(ln) for ln in (run_dir / "events.jsonl").read_text().splitlines()]
    starts = [e["argv"] for e in events if e["event"] == "sim_start"]
    assert starts and all(launched_by(argv) == mpiexec for argv in starts), starts[:2]


@pytest.mark.timeout(2400)
@pytest.mark.parametrize("fresh_venv", [False, pytest.param(True, marks=pytest.mark.full)],
                         ids=["shared-deps", "fresh-venv"])
def test_make_setup_with_each_mpi_from_a_fresh_clone(fresh_venv: bool, tmp_path: Path) -> None:
    for tool in ("/usr/bin/mpicc.openmpi", "/usr/bin/mpicc.mpich"):
        if not Path(tool).exists():
            pytest.skip(f"{tool} is missing: {NEED}")
    if shutil.which("make") is None or shutil.which("git") is None:
        pytest.skip("make and git are needed to clone and set up")
    clone = tmp_path / "clone"
    cloned = run(["git", "clone", "-q", str(REPO), str(clone)], tmp_path, 300)
    assert cloned.returncode == 0, cloned.stderr
    if not fresh_venv:
        venv_sharing_this_ones_packages(clone)
    wheel_mpicc = str(clone / ".venv" / "bin" / "mpicc")
    setup_and_run_sine(clone, "/usr/bin/mpicc.openmpi", "libmpi.so.40", "/usr/bin/mpiexec.openmpi")
    setup_and_run_sine(clone, "/usr/bin/mpicc.mpich", "libmpich.so.12", "/usr/bin/mpiexec.mpich")
    setup_and_run_sine(clone, wheel_mpicc, "libmpi.so.12", str(clone / ".venv" / "bin" / "mpiexec"))
