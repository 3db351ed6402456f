"""The MPI of the user's choice: the launchers fit the binary's MPI, detected from what it links.

The reference campaign runs with the sims built against Debian's MPICH and Debian's Open MPI
(``scripts/build-sims.sh`` into ``build/mpi-<flavour>/``; the wheel's MPICH is the default
build, covered by test_campaign.py and test_slurm.py), locally and under ``salloc -N3`` with
srun; and LAMMPS, an unmodified Debian package built against Debian's Open MPI, through its
own input deck and output file (``examples/lammps-lj``). Debian's MPIs and LAMMPS come from
``scripts/bootstrap.sh --test-deps`` (``make test`` runs it as root); elsewhere these tests
skip with that reason.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from orchestrator.launchers.base import LaunchRequest
from orchestrator.launchers.mpiexec import MpiexecLauncher
from orchestrator.mpi import ROOT_ENV, Flavour, MpiInfo, mpi_for, parse_ldd
from tests.conftest import BIN, REPO, fast_loop, write_loop

DEBIAN_MPICC = {"mpich": "/usr/bin/mpicc.mpich", "openmpi": "/usr/bin/mpicc.openmpi"}
LAMMPS = Path("/usr/bin/lmp")
SOURCES = [REPO / "CMakeLists.txt", *sorted((REPO / "sims").glob("*.[ch]"))]
NEED = "run `scripts/bootstrap.sh --test-deps` as root (apt-get install mpich libmpich-dev openmpi-bin " \
       "libopenmpi-dev lammps)"


def debian_sims(flavour: str) -> Path:
    """The sims built against Debian's ``flavour`` into build/mpi-<flavour>/bin (rebuilt when stale)."""
    mpicc = DEBIAN_MPICC[flavour]
    if not Path(mpicc).exists():
        pytest.skip(f"{mpicc} is missing: {NEED}")
    out = REPO / "build" / f"mpi-{flavour}"
    stamp = out / "bin" / "sim-expensive"
    newest = max(p.stat().st_mtime for p in SOURCES)
    out.parent.mkdir(exist_ok=True)
    # Both pytest workers may want the same build (a Slurm test and a local one): one builds, the other waits.
    with (out.parent / f".mpi-{flavour}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not stamp.exists() or stamp.stat().st_mtime < newest:
            subprocess.run(["bash", str(REPO / "scripts" / "build-sims.sh"), mpicc, str(out)], check=True,
                           capture_output=True, text=True, timeout=300)
    return out / "bin"


def loop_for(tmp_path: Path, bindir: Path, **overrides: Any) -> Path:
    cfg = fast_loop(**overrides)
    cfg["sims"]["check"]["binary"] = str(bindir / "sim-cheap")
    cfg["sims"]["generate"]["binary"] = str(bindir / "sim-expensive")
    return write_loop(tmp_path, cfg)


def orchestrate(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True,
                          timeout=400, cwd=REPO, env=env)


def sim_events(work: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    run_dir = next(work.iterdir())
    events = [json.loads(ln) for ln in (run_dir / "events.jsonl").read_text().splitlines()]
    return json.loads((run_dir / "summary.json").read_text()), events


def assert_lammps_ran_the_chosen_points(work: Path, events: list[dict[str, Any]]) -> None:
    """Each LAMMPS generate run evaluated exactly the densities the coordinator chose, looped over in its
    deck (``{% for p in points %}``), with no points file on its command line."""
    gens = [e for e in events if e["event"] == "sim_end" and e["role"] == "generate" and e["outcome"] == "ok"]
    assert gens
    starts = {e["run_id"]: e["argv"] for e in events if e["event"] == "sim_start"}
    for end in gens:
        sim_dir = next(work.iterdir()) / "sims" / end["run_id"]
        chosen = np.loadtxt(sim_dir / "points.txt", ndmin=2)[:, 0]
        deck = (sim_dir / "in.generate").read_text()
        assert deck.count("include lj-crystal.lmp") == len(chosen) == 32
        ran = np.loadtxt(sim_dir / "rows.txt", ndmin=2)[:, 0]
        np.testing.assert_allclose(ran, chosen, rtol=1e-12)  # LAMMPS prints %.15g
        assert not any("points" in a for a in starts[end["run_id"]])


# ------------------------------------------------------------------ detection and argv, as data


def test_flavour_from_ldd_output() -> None:
    ompi = parse_ldd("\tlibmpi.so.40 => /usr/lib/x86_64-linux-gnu/libmpi.so.40 (0x00007f)\n")
    assert ompi is not None and ompi.flavour is Flavour.OPENMPI and ompi.flavour.srun_plugin == "pmix"
    mpich = parse_ldd("\tlibmpich.so.12 => /usr/lib/x86_64-linux-gnu/libmpich.so.12 (0x00007f)\n")
    assert mpich is not None and mpich.flavour is Flavour.MPICH and mpich.flavour.srun_plugin == "pmi2"
    assert parse_ldd("\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n") is None


def test_the_wheel_build_is_mpich_launched_by_the_wheel_mpiexec() -> None:
    info = mpi_for(BIN / "sim-cheap")
    assert info.flavour is Flavour.MPICH and info.is_wheel_mpich and info.spawn_problem() is None
    assert info.mpiexec == str(BIN / "mpiexec")


def test_open_mpi_local_argv_and_root_environment(tmp_path: Path) -> None:
    info = MpiInfo(Flavour.OPENMPI, "loop.yml", None, "/usr/bin/mpiexec.openmpi")
    launcher = MpiexecLauncher(mpi=info)
    req = LaunchRequest(run_id="check-000001", role="check", binary=Path("/x/sim"), args=["--x", "1"], ranks=4,
                        workdir=tmp_path, timeout_s=5, ncols=2)
    assert launcher.command(req) == ["/usr/bin/mpiexec.openmpi", "-n", "4", "--oversubscribe", "/x/sim", "--x", "1",
                                     "--out", str(tmp_path / "result.npy")]
    env = launcher.environment(req)
    for key, value in ROOT_ENV.items():
        assert (env.get(key) == value) is (os.geteuid() == 0)
    assert "spawn works only with the PyPI mpich wheel" in (info.spawn_problem() or "")


@pytest.mark.parametrize("flavour", ["mpich", "openmpi"])
def test_validate_prints_the_detected_mpi(flavour: str, tmp_path: Path) -> None:
    bindir = debian_sims(flavour)
    done = orchestrate("validate", str(loop_for(tmp_path, bindir)))
    assert done.returncode == 0, done.stderr
    label = {"mpich": "MPICH [ldd: libmpich.so.12", "openmpi": "Open MPI [ldd: libmpi.so.40"}[flavour]
    assert f"mpi: {label}" in done.stdout
    assert f"local: /usr/bin/mpiexec.{flavour}" in done.stdout
    assert f"srun --mpi={Flavour(flavour).srun_plugin}" in done.stdout


def test_lammps_example_validates_with_points_chosen_by_the_coordinator() -> None:
    if not LAMMPS.exists():
        pytest.skip(f"{LAMMPS} is missing: {NEED}")
    done = orchestrate("validate", "examples/lammps-lj/loop.yml")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    generate = lines.index(next(ln for ln in lines if ln.startswith("  generate: ")))
    assert "    points: chosen by the coordinator (32 per run)" in lines[generate:]
    assert "{points_file}" not in (REPO / "examples/lammps-lj/loop.yml").read_text()


def test_spawn_with_debian_open_mpi_is_refused_in_one_line(tmp_path: Path) -> None:
    loop = loop_for(tmp_path, debian_sims("openmpi"), **{"sims.check.launcher": "spawn"})
    done = orchestrate("validate", str(loop))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "sims.check: launcher: spawn works only with the PyPI mpich wheel's MPI" in done.stderr


# ------------------------------------------------------------------ the reference campaign, locally


@pytest.mark.integration
@pytest.mark.parametrize("flavour", [pytest.param("mpich", marks=pytest.mark.full), "openmpi"])
def test_reference_campaign_locally_with_debian_mpi(flavour: str, tmp_path: Path) -> None:
    bindir = debian_sims(flavour)
    work = tmp_path / "runs"
    done = orchestrate("run", str(loop_for(tmp_path, bindir)), "--workdir", str(work), "--no-live")
    assert done.returncode == 0, done.stderr[-3000:]
    summary, events = sim_events(work)
    assert summary["target_met"] is True and summary["sims_failed"] == 0
    argv = next(e["argv"] for e in events if e["event"] == "sim_start")
    assert argv[0] == f"/usr/bin/mpiexec.{flavour}"
    assert ("--oversubscribe" in argv) is (flavour == "openmpi")


@pytest.mark.full  # the long matrix: `make test-full` (CI runs the subset, see README)
@pytest.mark.integration
def test_lammps_example_meets_its_target_locally(tmp_path: Path) -> None:
    if not LAMMPS.exists():
        pytest.skip(f"{LAMMPS} is missing: {NEED}")
    work = tmp_path / "runs"
    done = orchestrate("run", "examples/lammps-lj/loop.yml", "--workdir", str(work), "--no-live",
                       "--set", "tracking.enabled=false")
    assert done.returncode == 0, done.stderr[-3000:]
    summary, events = sim_events(work)
    assert summary["target_met"] is True
    starts = [e for e in events if e["event"] == "sim_start"]
    assert all(e["argv"][0] == "/usr/bin/mpiexec.openmpi" and "--out" not in e["argv"] for e in starts)
    assert_lammps_ran_the_chosen_points(work, events)


# ------------------------------------------------------------------ the same under salloc -N3 with srun


def pmix_spans_nodes() -> bool:
    return subprocess.run(["bash", str(REPO / "scripts" / "slurm-test-cluster.sh"), "pmix"],
                          capture_output=True, timeout=60).returncode == 0


def in_salloc(slurm_env: dict[str, str], tmp_path: Path, argv: list[str], per_node: int) -> tuple[
        subprocess.CompletedProcess[str], dict[str, Any]]:
    from tests.test_slurm import in_allocation

    return in_allocation(slurm_env, tmp_path / "probe", argv, nodes=3, per_node=per_node)


@pytest.mark.slurm
@pytest.mark.integration
@pytest.mark.parametrize("flavour", ["mpich", pytest.param("openmpi", marks=pytest.mark.full)])
def test_reference_campaign_under_salloc_with_debian_mpi(
    flavour: str, slurm_env: dict[str, str], tmp_path: Path
) -> None:
    bindir = debian_sims(flavour)
    if flavour == "openmpi" and not pmix_spans_nodes():
        pytest.skip("the test cluster was started before it gave each node its own PMIx dir: "
                    "scripts/slurm-test-cluster.sh stop && scripts/slurm-test-cluster.sh start")
    loop = loop_for(tmp_path, bindir, **{"sims.generate.ranks": 6, "training.backend": "allocation"})
    work = tmp_path / "runs"
    proc, probed = in_salloc(slurm_env, tmp_path, [sys.executable, "-m", "orchestrator", "run", str(loop),
                                                   "--workdir", str(work), "--no-live"], per_node=5)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary, events = sim_events(work)
    assert summary["target_met"] is True and summary["sims_failed"] == 0
    plugin = Flavour(flavour).srun_plugin
    starts = [e for e in events if e["event"] == "sim_start"]
    assert all(e["argv"][:3] == ["srun", "--exact", f"--mpi={plugin}"] for e in starts)
    ends = [e for e in events if e["event"] == "sim_end" and e["role"] == "generate"]
    assert any(len(e["nodes"]) > 1 for e in ends)  # ranks of one run on several nodes
    assert probed["steps"] == [] and probed["stepds"] == []


@pytest.mark.slurm
@pytest.mark.integration
def test_lammps_example_meets_its_target_under_salloc(slurm_env: dict[str, str], tmp_path: Path) -> None:
    if not LAMMPS.exists() or shutil.which("srun") is None:
        pytest.skip(f"{LAMMPS} is missing: {NEED}")
    if not pmix_spans_nodes():
        pytest.skip("the test cluster was started before it gave each node its own PMIx dir: "
                    "scripts/slurm-test-cluster.sh stop && scripts/slurm-test-cluster.sh start")
    work = tmp_path / "runs"
    proc, probed = in_salloc(slurm_env, tmp_path, [
        sys.executable, "-m", "orchestrator", "run", "examples/lammps-lj/loop.yml", "--workdir", str(work),
        "--no-live", "--set", "tracking.enabled=false", "--set", "training.backend=allocation"], per_node=5)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary, events = sim_events(work)
    assert summary["target_met"] is True
    starts = [e for e in events if e["event"] == "sim_start"]
    assert all(e["argv"][:3] == ["srun", "--exact", "--mpi=pmix"] and "--out" not in e["argv"] for e in starts)
    assert_lammps_ran_the_chosen_points(work, events)
    assert probed["steps"] == [] and probed["stepds"] == []
