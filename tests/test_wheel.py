"""Installable as a package: the wheel, installed non-editable into a fresh venv, works from a
directory outside the checkout (templates, batch/ and models/ inside it, sims in its bin/).

To stay within a couple of minutes the fresh venv takes the heavy third-party dependencies
(torch, dask, mlflow) from the project's venv through a ``.pth`` line; the orchestrator itself,
its sims and the mpich wheel whose libmpi they load are installed into the fresh venv. The
wheel is built the way pip builds it for a user, in an isolated build environment, with the
versions of constraints.txt.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, fast_loop

pytestmark = pytest.mark.integration


def pip(python: Path, *args: str, env: dict[str, str]) -> None:
    done = subprocess.run([str(python), "-m", "pip", "--disable-pip-version-check", "-q", *args],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


def test_wheel_in_a_fresh_venv_validates_submits_and_runs_outside_the_checkout(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_CONSTRAINT"] = str(REPO / "constraints.txt")  # the isolated build env too
    dist = tmp_path / "dist"
    pip(Path(sys.executable), "wheel", "--no-deps", "-w", str(dist), str(REPO), env=env)
    wheel = next(dist.glob("orchestrator-*.whl"))

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "project-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    pip(python, "install", "--no-deps", "--ignore-installed", "mpich", str(wheel), env=env)

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    cfg = fast_loop(**{"sims.generate.ranks": 2})
    (outside / "loop.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    cli = [str(venv / "bin" / "orchestrator")]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli, *args], capture_output=True, text=True, timeout=400, cwd=outside, env=env)

    where = subprocess.run([str(python), "-c", "import orchestrator; print(orchestrator.__file__)"],
                           capture_output=True, text=True, cwd=outside, env=env, check=True).stdout
    assert where.startswith(site), where  # the installed copy, not the checkout

    validated = run("validate", "loop.yml")
    assert validated.returncode == 0, validated.stderr
    assert f"check: {venv / 'bin' / 'sim-cheap'}" in validated.stdout  # sims installed with the wheel
    assert f"local: {venv / 'bin' / 'mpiexec'}" in validated.stdout

    submitted = run("submit", "loop.yml", "--dry-run", "--nodes", "1", "--ntasks-per-node", "4")
    assert submitted.returncode == 0, submitted.stderr
    assert "#SBATCH" in submitted.stdout and "orchestrator" in submitted.stdout

    ran = run("run", "loop.yml", "--workdir", "runs", "--no-live")
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert ran.stdout.startswith("target_met"), ran.stdout
