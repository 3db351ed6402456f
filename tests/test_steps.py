"""`run --steps`: each step alone, three commands against one, and the bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from orchestrator.cli import main
from tests.conftest import fast_loop, write_loop


def steps_loop(tmp_path: Path) -> Path:
    cfg = fast_loop()
    cfg["tracking"] = {"experiment": "steps", "register_as": "sine-steps"}
    cfg["steps"] = {"generate_runs": 2, "evaluate_checks": 3}
    return write_loop(tmp_path, cfg)


def orchestrate(*args: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "run", *args, "--no-live"], capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = proc.stdout.strip().splitlines()[-1].removeprefix("run dir: ")
    summary: dict[str, Any] = json.loads((Path(run_dir) / "summary.json").read_text())
    return summary


def weights(run_dir: str) -> dict[str, Any]:
    import torch

    blob = torch.load(Path(run_dir) / "models/model-0001.pt", weights_only=True)
    return {k: v.tolist() for k, v in blob["model"].items()}


@pytest.mark.integration
def test_three_commands_give_the_model_and_errors_of_one(tmp_path: Path) -> None:
    loop = steps_loop(tmp_path)
    whole = orchestrate(str(loop), "--workdir", str(tmp_path / "one"), "--steps", "generate,train,evaluate")

    work = str(tmp_path / "three")
    gen = orchestrate(str(loop), "--workdir", work, "--steps", "generate")
    assert gen["data_points"] == 256 and len(gen["data_files"]) == 2 and gen["model_file"] is None
    trained = orchestrate(str(loop), "--workdir", work, "--steps", "train", "--data", gen["run_dir"])
    assert trained["registered_model"] == {"name": "sine-steps", "version": "1"}
    assert not list((Path(trained["run_dir"]) / "data").iterdir()), "train reads the data where it is"
    ev = orchestrate(str(loop), "--workdir", work, "--steps", "evaluate", "--model", "sine-steps:1")
    assert ev["evaluation"]["name"] == "sine-steps" and ev["evaluation"]["version"] == "1"

    assert weights(trained["run_dir"]) == weights(whole["run_dir"])
    assert ev["evaluation"]["points"] == whole["evaluation"]["points"]
    assert ev["evaluation"]["max_error"] < 0.05 and ev["evaluation"]["checks"] == 3
    assert (Path(trained["run_dir"]) / "figures/round-0001.png").is_file()
    loose = [f"{oct(p.lstat().st_mode & 0o777)} {p}" for p in [Path(work), *Path(work).rglob("*")]
             if not p.is_symlink() and p.lstat().st_mode & 0o077]
    assert not loose, "--steps left files readable by others:\n" + "\n".join(loose[:10])


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(["run", *argv, "--no-live"])
    return code, capsys.readouterr().err.strip()


def test_train_without_data_says_where_it_looked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(capsys, str(steps_loop(tmp_path)), "--workdir", str(tmp_path / "w"), "--steps", "train")
    assert code == 2 and len(err.splitlines()) == 1
    assert "--data" in err and "steps.data" in err and "generate step" in err
    assert not (tmp_path / "w").exists(), "nothing starts before the data is found"


def test_unknown_step_names_the_known_ones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(capsys, str(steps_loop(tmp_path)), "--steps", "generate,trian")
    assert code == 2 and err == ("error: --steps: unknown step 'trian' (did you mean 'train'?); "
                                 "known steps: generate, train, evaluate")
    code, err = run_cli(capsys, str(steps_loop(tmp_path)), "--steps", "train,generate")
    assert code == 2 and "in the order generate,train,evaluate" in err


@pytest.mark.integration  # a real MLflow store: ~5-15 s to create
def test_evaluate_of_an_unknown_model_lists_the_registered_ones(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from orchestrator.tracking import Tracker, default_tracking_uri

    work = tmp_path / "w"
    tracker = Tracker(default_tracking_uri(work), "e", "r")
    tracker.start({})
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=tracker.tracking_uri).create_registered_model("sine-real")
    code, err = run_cli(capsys, str(steps_loop(tmp_path)), "--workdir", str(work), "--steps", "evaluate",
                        "--model", "sine-missing")
    assert code == 2 and len(err.splitlines()) == 1
    assert "no registered model 'sine-missing'" in err and "registered models: sine-real" in err
