"""`predict`: a registered model's own forward, from the CLI and the API, logged as an MLflow run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models.mlp import MLP
from orchestrator import cli
from orchestrator.predict import ModelRef, predict
from orchestrator.tracking import Tracker, default_tracking_uri
from orchestrator.training.serving import register_model

NAME = "pred-test"


def make_model(seed: int) -> MLP:
    torch.manual_seed(seed)
    model = MLP(n_inputs=2, n_outputs=1, hidden=16, layers=2)
    rng = np.random.default_rng(seed)
    x = rng.uniform([0, 0.05], [10, 0.5], size=(64, 2))
    model.fit_normalisation(x, np.cos(x[:, :1]))
    return model.eval()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[MLP]]:
    """A run root whose mlflow.db holds two versions of NAME, the first under the alias ``in-service``."""
    root = tmp_path_factory.mktemp("registry")
    models = [make_model(1), make_model(2)]
    tracker = Tracker(default_tracking_uri(root), "test-predict", "register")
    tracker.start({"purpose": "test"})
    for model in models:
        register_model(tracker, model, NAME)
    tracker.set_alias(NAME, "in-service", "1")
    tracker.finish("FINISHED")
    return root, models


def forward(model: MLP, points: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out: np.ndarray = model(torch.from_numpy(points).float()).double().numpy()
    return out


POINTS = np.array([[0.0, 0.05], [2.5, 0.1], [7.0, 0.4], [10.0, 0.5]])


def test_predict_returns_the_registered_models_forward(registry: tuple[Path, list[MLP]]) -> None:
    root, models = registry
    uri = default_tracking_uri(root)
    latest = predict(uri, ModelRef(NAME), POINTS, experiment=None)
    assert latest.model == ModelRef(NAME, "2")
    np.testing.assert_array_equal(latest.outputs, forward(models[1], POINTS))
    first = predict(uri, ModelRef.parse(f"{NAME}/1"), POINTS, experiment=None)
    np.testing.assert_array_equal(first.outputs, forward(models[0], POINTS))
    assert not np.array_equal(first.outputs, latest.outputs)


def test_without_a_version_the_alias_in_service_is_taken(registry: tuple[Path, list[MLP]],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A twin registered with ``continual.champion_alias: in-service``: its champion, not the newest."""
    root, models = registry
    uri = default_tracking_uri(root)
    served = predict(uri, ModelRef(NAME), POINTS, experiment=None, alias="in-service")
    assert served.model == ModelRef(NAME, "1")
    np.testing.assert_array_equal(served.outputs, forward(models[0], POINTS))
    assert cli.main(["predict", "--model", NAME, "--alias", "in-service", "--x", "2.5,0.1",
                     "--workdir", str(root)]) == 0
    assert f"model {NAME} version 1;" in capsys.readouterr().out


def test_cli_prints_a_table_and_writes_npy_and_logs_a_run(registry: tuple[Path, list[MLP]], tmp_path: Path) -> None:
    root, models = registry
    np.save(tmp_path / "points.npy", POINTS)
    out = tmp_path / "y.npy"
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "predict", "--model", f"{NAME}/1", "--input",
         str(tmp_path / "points.npy"), "--output", str(out), "--workdir", str(root)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(np.load(out), forward(models[0], POINTS))
    assert f"wrote 4 prediction(s) of {NAME}/1 to {out}" in proc.stdout
    run_id = proc.stdout.split("logged as MLflow run ")[1].split()[0]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=default_tracking_uri(root))
    run = client.get_run(run_id)
    assert run.data.params["model.name"] == NAME and run.data.params["model.version"] == "1"
    assert run.data.params["points"] == "4" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "predictions"
    local = client.download_artifacts(run_id, "predictions.npy", str(tmp_path))
    np.testing.assert_array_equal(np.load(local), np.hstack([POINTS, forward(models[0], POINTS)]))

    # the table, for points given on the command line (latest version)
    table = cli_out(["predict", "--model", NAME, "--x", "2.5,0.1", "--x", "7,0.4", "--workdir", str(root)])
    lines = table.splitlines()
    assert lines[0].split() == ["x0", "x1", "y0"]
    expected = forward(models[1], POINTS[1:3])
    for line, (x0, x1), (y,) in zip(lines[1:3], POINTS[1:3], expected, strict=True):
        got = [float(v) for v in line.split()]
        assert got[:2] == [x0, x1] and abs(got[2] - y) < 1e-5
    assert f"model {NAME} version 2" in table


def cli_out(argv: list[str]) -> str:
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert cli.main(argv) == 0
    return buf.getvalue()


@pytest.mark.parametrize(("argv", "message"), [
    (["--model", "nope", "--x", "1,2"], f"no registered model named 'nope' in sqlite:///{{root}}/mlflow.db; "
                                        f"registered models: {NAME}"),
    (["--model", f"{NAME}/7", "--x", "1,2"], f"model '{NAME}' has no version 7 in sqlite:///{{root}}/mlflow.db; "
                                              "versions: 1, 2"),
    (["--model", NAME, "--x", "1.5"], f"the points have 1 input(s) each but model {NAME}/2 expects n_inputs=2 "
                                      "(give each --x as comma-separated values)"),
    (["--model", NAME, "--x", "1,2", "--x", "3"], "--x '3' has 1 value(s), but --x '1,2' has 2"),
    (["--model", NAME, "--x", "1,zeta"], "--x '1,zeta': expected numbers separated by commas"),
    (["--model", NAME, "--x", "nan,1"], "--x: inputs must be finite numbers"),
    (["--model", f"{NAME}/latest", "--x", "1,2"], "--model: got 'pred-test/latest', expected NAME or NAME/VERSION"),
])
def test_mistakes_are_one_line_usage_errors(registry: tuple[Path, list[MLP]], argv: list[str], message: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = registry
    assert cli.main(["predict", *argv, "--workdir", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message.format(root=root)}") and err.count("\n") == 1


def test_no_database_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["predict", "--model", NAME, "--x", "1", "--workdir", str(tmp_path)]) == 2
    assert f"no MLflow database at {tmp_path}/mlflow.db" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()
