"""`compare` end to end on a small case: the table with the true accuracy, the PNG with a map
per strategy, the MLflow run; a strategy that raises ends its campaign in one line naming it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from orchestrator.compare import Outcome, format_table, most_varying
from tests.conftest import REPO, write_loop
from tests.test_sampling import front_loop

RAISES = '''
import numpy as np

def pick(req):
    raise KeyError("no such column")
'''


@pytest.mark.integration
def test_compare_end_to_end_table_png_mlflow_and_a_strategy_that_raises(tmp_path: Path) -> None:
    cfg = front_loop(first_round="uniform")
    cfg["target"] = {"tolerance": 0.1, "coverage": 0.6, "confidence": 0.6, "max_rounds": 2}  # 2 checks certify
    cfg["tracking"] = {"experiment": "cmp"}
    loop = write_loop(tmp_path, cfg)
    shutil.copy(REPO / "examples/front/truth.py", tmp_path / "truth.py")
    (tmp_path / "mystrategy.py").write_text(RAISES)
    work = tmp_path / "cmp"
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "compare", str(loop), "--strategies",
                           "uniform,mystrategy:pick", "--seeds", "1", "--workdir", str(work)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1, proc.stderr[-3000:]  # one campaign did not end normally
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "mystrategy:pick seed 1" in errors[0], proc.stdout[-2000:]
    assert "sampling strategy 'mystrategy:pick' raised KeyError" in errors[0]
    outcomes = {o["strategy"]: o for o in json.loads((work / "compare.json").read_text())}
    uni = outcomes["uniform"]
    assert uni["error"] is None and uni["generate_runs"] >= 1 and uni["check_runs"] >= 1
    # the true accuracy is the final model's, measured again here on the same grid
    from orchestrator import accuracy

    _, acc = accuracy.of_run(Path(uni["run_dir"]), accuracy.load_truth(tmp_path / "truth.py"))
    assert uni["within"] == pytest.approx(acc.within) and uni["rmse"] == pytest.approx(acc.rmse)
    table = (work / "compare.md").read_text()
    assert "true: within tol" in table and f"| 1 | uniform | {uni['generate_runs']} |" in table
    png = work / "compare.png"
    import matplotlib.image

    img = matplotlib.image.imread(png)
    assert img.shape[0] > 600  # two rows: the figures, then a map per strategy
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work}/mlflow.db")
    exp = client.get_experiment_by_name("cmp-compare")
    assert exp is not None
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.metrics["uniform_generate_runs"] == uni["generate_runs"]
    assert run.data.metrics["uniform_within"] == pytest.approx(uni["within"])
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"compare.png", "compare.json", "compare.md"}
    # the same report again from compare.json, no campaign run: one strategy kept, same figures
    again = subprocess.run([sys.executable, "-m", "orchestrator", "compare", str(loop), "--strategies", "uniform",
                            "--workdir", str(work), "--from-json", "--no-track"], capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    (redo,) = json.loads((work / "compare.json").read_text())
    assert redo["strategy"] == "uniform" and redo["within"] == pytest.approx(uni["within"])
    assert 0.0 <= redo["expensive_in_varying"] <= 1.0


def test_table_shows_true_accuracy_and_ratios_of_costs() -> None:
    rows = [Outcome("uniform", 1, "target_met", True, 8, 256, 8, 40.0, 50.0, "r", check_runs=60, within=0.9,
                    within_varying=0.5, rmse=0.05),
            Outcome("ensemble", 1, "target_met", True, 4, 128, 4, 30.0, 40.0, "r", check_runs=60, within=0.99,
                    within_varying=0.95, rmse=0.01)]
    table = format_table(rows, ["uniform", "ensemble"])
    assert "| median | ensemble | 4 | 60 | 128 | 4 | 30 | 99.0% | 95.0% | 0.0100 | 1/1 |" in table
    assert "| ratio | ensemble/uniform | 0.50 | 1.00 | 0.50 | 0.50 | 0.75 |  |  |  | |" in table


def test_most_varying_inputs_are_the_truths_steep_ones() -> None:
    def truth(x: np.ndarray) -> np.ndarray:
        out: np.ndarray = (np.tanh((x[:, 2] - 0.5) / 0.05) + 0.3 * x[:, 0] + 0.01 * x[:, 1])[:, None]
        return out

    assert most_varying(truth, np.zeros(3), np.ones(3)) == (2, 0)
    assert most_varying(None, np.zeros(3), np.ones(3)) == (0, 1)


def test_from_json_without_the_strategies_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from orchestrator.cli import main

    loop = write_loop(tmp_path, front_loop())
    work = tmp_path / "w"
    work.mkdir()
    (work / "compare.json").write_text(json.dumps([{"strategy": "uniform", "seed": 1, "status": "target_met",
                                                    "target_met": True, "generate_runs": 3, "data_points": 96,
                                                    "rounds": 3, "time_to_target_s": 9.0, "wall_s": 10.0,
                                                    "run_dir": str(work)}]))
    assert main(["compare", str(loop), "--strategies", "ensemble", "--workdir", str(work), "--from-json",
                 "--no-track"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --from-json") and "it has uniform" in err and "\n" not in err
    assert main(["compare", str(loop), "--strategies", "uniform", "--workdir", str(work), "--from-json",
                 "--no-track"]) == 0
    assert "| median | uniform | 3 |" in (work / "compare.md").read_text()
