"""`new-sim`: scaffold a sim into a copy of the project, build it with CMake, run a campaign on it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator import cli
from orchestrator.runlog import EventKind
from orchestrator.scaffold import cmake_declarations, loop_entry
from orchestrator.store import read_events
from tests.conftest import BIN, REPO


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the parts of the repo a sim build needs."""
    root = tmp_path / "proj"
    root.mkdir()
    shutil.copy(REPO / "CMakeLists.txt", root)
    shutil.copytree(REPO / "sims", root / "sims")
    return root


def new_sim(root: Path, name: str) -> int:
    return cli.main(["new-sim", name, "--root", str(root)])


def test_new_sim_writes_the_source_and_declares_it_once(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (project / "CMakeLists.txt").read_text()
    assert new_sim(project, "sim-heat") == 0
    out = capsys.readouterr().out
    assert "add_simulation(sim-heat sims/sim-heat.c)" in out and "-m pip install -v --no-build-isolation -e " in out
    assert "binary: sim-heat" in out
    source = (project / "sims" / "sim-heat.c").read_text()
    assert 'simkit_init(&argc, &argv, "sim-heat", opts);' in source and "{{" not in source
    after = (project / "CMakeLists.txt").read_text()
    assert after == before + "add_simulation(sim-heat sims/sim-heat.c)\n"
    assert cmake_declarations(after)["sim-heat"] == "sims/sim-heat.c"

    # never overwrites, never declares twice
    (project / "sims" / "sim-heat.c").write_text("/* mine */\n")
    assert new_sim(project, "sim-heat") == 2
    assert "already exists; not overwriting it" in capsys.readouterr().err
    assert (project / "sims" / "sim-heat.c").read_text() == "/* mine */\n"
    (project / "sims" / "sim-heat.c").unlink()
    assert new_sim(project, "sim-heat") == 0  # the source again, the CMake line kept as it was
    assert "already declares sim-heat" in capsys.readouterr().out
    assert (project / "CMakeLists.txt").read_text() == after


@pytest.mark.parametrize("name", ["", "1sim", "a b", "../evil", "sim;rm", "sim$(x)", "all", "simkit", "x" * 65,
                                  "sim.c"])
def test_bad_names_are_refused(project: Path, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    before = (project / "CMakeLists.txt").read_text()
    assert new_sim(project, name) == 2
    assert capsys.readouterr().err.startswith("error: new-sim:")
    assert (project / "CMakeLists.txt").read_text() == before


def test_a_name_declared_with_another_source_is_refused(project: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    with (project / "CMakeLists.txt").open("a") as f:
        f.write("add_simulation(sim-heat sims/heat/main.c)\n")
    assert new_sim(project, "sim-heat") == 2
    assert "already declares 'sim-heat' with source sims/heat/main.c" in capsys.readouterr().err
    assert not (project / "sims" / "sim-heat.c").exists()
    assert new_sim(project, "sim-cheap") == 2  # declared with its own source, which exists
    assert "sim-cheap.c already exists" in capsys.readouterr().err


def test_a_directory_that_is_not_the_project_is_refused(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert new_sim(tmp_path, "sim-heat") == 2
    assert "cannot read" in capsys.readouterr().err


@pytest.mark.integration
def test_scaffolded_sim_builds_and_runs_a_campaign(project: Path, tmp_path: Path) -> None:
    assert new_sim(project, "sim-square") == 0
    build = project / "build"
    configure = subprocess.run(
        [str(BIN / "cmake"), "-S", str(project), "-B", str(build), "-G", "Ninja",
         f"-DCMAKE_MAKE_PROGRAM={BIN / 'ninja'}", f"-DMPI_C_COMPILER={BIN / 'mpicc'}"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert configure.returncode == 0, configure.stdout + configure.stderr
    built = subprocess.run([str(BIN / "cmake"), "--build", str(build), "--target", "sim-square"],
                           capture_output=True, text=True, timeout=300, check=False)
    assert built.returncode == 0, built.stdout + built.stderr
    assert "warning:" not in built.stdout + built.stderr  # the template compiles clean under -Wall -Wextra

    # the loop.yml entry new-sim prints, with the binary given as a path relative to loop.yml
    entry = yaml.safe_load(loop_entry("sim-square").replace("binary: sim-square", "binary: proj/build/sim-square"))
    cfg = {"name": "square", "seed": 3, **entry, "tracking": {"enabled": False},
           "target": {"tolerance": 0.05, "successes": 5, "max_rounds": 6}}
    loop = tmp_path / "loop.yml"
    loop.write_text(yaml.safe_dump(cfg, sort_keys=False))
    work = tmp_path / "runs"
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "run", str(loop), "--workdir", str(work),
                           "--no-live"], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    (run_dir,) = work.glob("square-*")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["target_met"] and summary["sims_failed"] == 0
    events = read_events(run_dir)
    checks = [e for e in events if e.kind is EventKind.CHECK and "truth" in e]
    assert checks and all(abs(e["truth"][0] - e["x"][0] ** 2) < 1e-12 for e in checks)
    starts = [e for e in events if e.kind is EventKind.SIM_START]
    assert all(str(build / "sim-square") in e["argv"] for e in starts)


@pytest.mark.integration
def test_printed_rebuild_command_builds_against_the_wheel_mpi_whatever_path_says(tmp_path: Path) -> None:
    """Issue 12: the `next:` command new-sim prints is run as printed, with a PATH whose first
    mpicc is another MPI (Debian's Open MPI where installed), in a fresh venv that holds the
    mpich wheel; the new sim must link that wheel's libmpi."""
    import sysconfig

    root = tmp_path / "project"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if rel.split("/")[0] in ("CMakeLists.txt", "pyproject.toml", "constraints.txt", "README.md", "sims",
                                 "orchestrator", "models", "batch"):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, root / rel)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "project-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")  # build tools, deps
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", "-c",
                    str(REPO / "constraints.txt"), "mpich"], check=True, timeout=300)
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("VIRTUAL_ENV",)}
    env["PATH"] = "/usr/bin:/bin"  # the venv's bin is not on PATH; a system mpicc may be
    printed = subprocess.run([str(python), "-m", "orchestrator", "new-sim", "sim-heat", "--root", str(root)],
                             capture_output=True, text=True, env={**env, "PYTHONPATH": str(root)}, check=True).stdout
    lines = printed.splitlines()
    command = lines[lines.index(next(ln for ln in lines if ln.strip().startswith("2. rebuild"))) + 1].strip()
    assert command.startswith(f"{python} -m pip install -v --no-build-isolation -e {root}")
    assert f"MPI_C_COMPILER={venv / 'bin' / 'mpicc'}" in command
    # a newcomer's slip the compiler warns about (-Wall): the printed command must show the warning
    source = root / "sims" / "sim-heat.c"
    text = source.read_text()
    body = text.index("{", text.index("int main(")) + 1
    source.write_text(text[:body] + "\n    int forgotten_counter;\n" + text[body:])
    built = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    shown = built.stdout + built.stderr
    # gcc quotes the name with ASCII or typographic quotes, as the locale says
    assert re.search(r"sim-heat\.c:\d+:\d+: warning: unused variable .forgotten_counter.", shown), shown[-3000:]
    linked = subprocess.run(["ldd", str(venv / "bin" / "sim-heat")], capture_output=True, text=True).stdout
    assert f"libmpi.so.12 => {venv / 'lib' / 'libmpi.so.12'}" in linked, linked
