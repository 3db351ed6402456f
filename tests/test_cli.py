"""The command line as a user meets it: --help, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


def test_help_speaks_to_a_user_not_a_developer() -> None:
    out = subprocess.run([sys.executable, "-m", "orchestrator", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    head = out.split("positional arguments")[0]
    assert "argument parsing" not in head and "logging setup" not in head
    assert "python -m orchestrator run loop.yml" in head and "docs/loop-yml.md" in head
    assert "75 interrupted" in head


def test_a_closed_pipe_is_no_traceback() -> None:
    """`python -m orchestrator validate loop.yml | head -0`: the reader is gone before we write."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "orchestrator", "validate", "examples/sine/loop.yml"],
                              cwd=REPO, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert proc.returncode == 141, proc.stderr
    assert proc.stderr == ""


def test_predict_output_into_a_missing_directory_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "predict", "--model", "m", "--x", "1",
                           "--output", str(tmp_path / "nope" / "out.npy")],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr == f"error: --output {tmp_path}/nope/out.npy: no directory {tmp_path}/nope; create it first\n"


def test_cuda_on_a_machine_without_a_gpu_is_exit_2_in_one_line(tmp_path: Path) -> None:
    """The README's contract: a config this machine cannot satisfy is exit 2, one line naming key and value."""
    if any(Path("/dev").glob("nvidia[0-9]*")):
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "run", "examples/sine/loop.yml", "--no-live",
                           "--set", "training.device=cuda", "--workdir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: training.device is cuda but this machine has no NVIDIA GPU"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_a_malformed_set_value_is_one_line() -> None:
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "validate", "examples/sine/loop.yml",
                           "--set", "target.tolerance=[0.1"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr == ("error: --set 'target.tolerance=[0.1': value '[0.1' is not valid YAML at column 5: "
                           "expected ',' or ']', but got '<stream end>'\n")


def test_tensorboard_dir_naming_a_file_in_the_run_dir_is_one_line(tmp_path: Path) -> None:
    """Relative to the run dir, which holds loop.yml: known only once the run dir exists."""
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "run", "examples/sine/loop.yml", "--no-live",
                           "--set", "tracking.tensorboard_dir=loop.yml/tb", "--set", "tracking.enabled=false",
                           "--workdir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: tracking.tensorboard_dir: 'loop.yml/tb': "), proc.stderr
    assert errors[0].endswith("/loop.yml is not a directory; name a directory (relative: to the run dir)")


def test_a_workdir_under_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "run", "examples/sine/loop.yml", "--no-live",
                           "--workdir", str(tmp_path / "afile" / "runs")], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (f"error: workdir: '{tmp_path}/afile/runs': {tmp_path}/afile is not a directory; give a "
                           "directory (workdir in loop.yml, or --workdir)\n")
