"""An existing code, unmodified: input decks rendered per run, static files staged, results from
its own output files or a parser, and one line for each way that can go wrong.

The "existing code" is a small program that knows nothing of the orchestrator: it reads the
deck named on its command line (``key = value`` lines) from its cwd, reads a static table it
was given beside it, and writes whitespace columns. It is launched through the real mpiexec
launcher, as any sim.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from orchestrator.config import LoopConfig, OutputFile, SimConfig, check_fields
from orchestrator.errors import ConfigError
from orchestrator.launchers.base import LaunchRequest, Outcome, SimResult
from orchestrator.launchers.mpiexec import MpiexecLauncher
from orchestrator.outputs import read_output
from orchestrator.results import MalformedResult
from orchestrator.rundeck import sim_io
from tests.conftest import REPO

CODE = f"""#!{sys.executable}
# A stand-in for a third-party code: deck in, columns out; no simkit, no --out.
import pathlib, sys
lines = [ln.split("=", 1) for ln in pathlib.Path(sys.argv[1]).read_text().splitlines() if "=" in ln]
deck = {{k.strip(): v for k, v in lines}}
scale = float(pathlib.Path("scale.dat").read_text())
xs = [float(v) for v in deck["x"].split()]
mode = deck.get("mode", "ok").strip()
with open("out.txt", "w") as f:
    f.write("# step x junk y\\n")
    for i, x in enumerate(xs):
        if mode == "short":
            f.write(f"{{i}} {{x}}\\n")
        else:
            f.write(f"{{i}} {{x}} 7.0 {{scale * x * x}}\\n")
"""

PARSER = """
import pathlib
import numpy as np

def rows(run_dir):
    deck = (run_dir / "deck.in").read_text()
    if "attempt = 0" in deck:
        raise ValueError("cannot parse the first attempt (on purpose)")
    table = np.loadtxt(run_dir / "out.txt", ndmin=2)
    return table[:, [1, 3]]
"""


def project(tmp_path: Path, **check: Any) -> Path:
    """A campaign directory: loop.yml, the code, its deck templates, a static file, a parser."""
    code = tmp_path / "fake-code"
    code.write_text(CODE)
    code.chmod(0o755)
    (tmp_path / "scale.dat").write_text("1.0\n")
    (tmp_path / "check.in.j2").write_text("# run {{ run_id }}\nx = {{ x }}\nattempt = {{ attempt }}\n")
    (tmp_path / "generate.in.j2").write_text(
        "x ={% for i in range(16) %} {{ lo + (hi - lo) * i / 15 }}{% endfor %}\n")
    (tmp_path / "myparse.py").write_text(PARSER)
    output = {"path": "out.txt", "columns": [1, 3]}
    sims = {
        "check": {"binary": "./fake-code", "args": ["deck.in"], "templates": {"deck.in": "check.in.j2"},
                  "files": ["scale.dat"], "output": output, "retries": 2, "backoff_s": 0.0, **check},
        "generate": {"binary": "./fake-code", "args": ["deck.in"], "templates": {"deck.in": "generate.in.j2"},
                     "files": ["scale.dat"], "output": output},
    }
    cfg = {"name": "square", "seed": 1, "inputs": [{"name": "x", "lo": -1.0, "hi": 1.0}], "outputs": ["y"],
           "sims": sims, "target": {"tolerance": 0.05, "successes": 3, "max_rounds": 8},
           "training": {"hparams": {"epochs": 300}}, "tracking": {"enabled": False}}
    loop = tmp_path / "loop.yml"
    loop.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return loop


def orchestrate(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})


# ------------------------------------------------------------------ whole campaigns


@pytest.mark.integration
def test_campaign_with_an_unmodified_code_meets_its_target(tmp_path: Path) -> None:
    loop = project(tmp_path)
    done = orchestrate("run", str(loop), "--workdir", str(tmp_path / "runs"), "--no-live", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = next((tmp_path / "runs").glob("square-*"))
    assert json.loads((run_dir / "summary.json").read_text())["target_met"] is True
    events = [json.loads(ln) for ln in (run_dir / "events.jsonl").read_text().splitlines()]
    starts = [e for e in events if e["event"] == "sim_start"]
    assert starts and all("--out" not in e["argv"] for e in starts)  # --out is for simkit sims only
    check_dir = run_dir / "sims" / next(e["run_id"] for e in starts if e["role"] == "check")
    deck = (check_dir / "deck.in").read_text()
    x = float(deck.split("x = ")[1].split()[0])
    assert -1.0 <= x <= 1.0 and "attempt = 0" in deck  # rendered with the run's own values
    assert (check_dir / "scale.dat").read_text() == "1.0\n"  # staged beside it
    assert (check_dir / "out.txt").exists()  # the code's cwd was its run directory


@pytest.mark.integration
def test_the_node_agent_stages_each_roles_own_deck_and_reads_its_own_output(tmp_path: Path) -> None:
    """``launcher: agent`` for both roles: one agent, but each role's templates, files and result source."""
    loop = project(tmp_path, launcher="agent")
    cfg = yaml.safe_load(loop.read_text())
    cfg["sims"]["generate"]["launcher"] = "agent"
    loop.write_text(yaml.safe_dump(cfg, sort_keys=False))
    done = orchestrate("run", str(loop), "--workdir", str(tmp_path / "runs"), "--no-live", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = next((tmp_path / "runs").glob("square-*"))
    assert json.loads((run_dir / "summary.json").read_text())["target_met"] is True
    events = [json.loads(ln) for ln in (run_dir / "events.jsonl").read_text().splitlines()]
    starts = [e for e in events if e["event"] == "sim_start"]
    assert {e["role"] for e in starts} == {"check", "generate"}
    for e in starts:
        assert e["argv"][-1] == "deck.in" and "--out" not in e["argv"]
        deck = (run_dir / "sims" / e["run_id"] / "deck.in").read_text()
        assert ("attempt = " in deck) == (e["role"] == "check")  # the role's own template
        assert (run_dir / "sims" / e["run_id"] / "scale.dat").is_file()
    assert len(list(run_dir.glob("agent-*.log"))) == 1  # one agent served both roles


@pytest.mark.integration
def test_a_raising_parser_is_a_failed_run_retried_with_its_traceback_in_the_log(tmp_path: Path) -> None:
    loop = project(tmp_path, output=None, parser="myparse:rows")
    done = orchestrate("run", str(loop), "--workdir", str(tmp_path / "runs"), "--no-live", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = next((tmp_path / "runs").glob("square-*"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["target_met"] is True and summary["sims_failed"] >= 3  # every first check attempt
    ends = [json.loads(ln) for ln in (run_dir / "events.jsonl").read_text().splitlines()]
    failed = [e for e in ends if e["event"] == "sim_end" and e.get("outcome") == "malformed"]
    assert failed
    message = failed[0]["message"]
    assert "\n" not in message
    assert message.startswith("parser myparse:rows raised ValueError: cannot parse the first attempt (on purpose)")
    log = (run_dir / "sims" / failed[0]["run_id"] / "stderr.log").read_text()
    assert "Traceback (most recent call last)" in log and "myparse.py" in log
    # the same check ran again (attempt 1) and was accepted
    assert any(e["event"] == "sim_end" and e.get("role") == "check" and e.get("attempt") == 1
               and e["outcome"] == "ok" for e in ends)


# ------------------------------------------------------------------ one line for each mistake


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


CHOSEN_DECK = "x ={% for p in points %} {{ p[0] }}{% endfor %}\nfile = {{ points_file }}\n"
"""A generate deck the coordinator's chosen points are rendered into (the code never reads the points file)."""


@pytest.mark.integration
def test_chosen_points_reach_a_template_driven_code(tmp_path: Path) -> None:
    loop = project(tmp_path)
    (tmp_path / "generate.in.j2").write_text(CHOSEN_DECK)
    cfg = yaml.safe_load(loop.read_text())
    cfg["sims"]["generate"]["args"] = ["deck.in", "{points_file}"]  # the coordinator chooses; the code ignores it
    cfg["policy"] = {"sampling": "space-filling", "points_per_run": 12}
    loop.write_text(yaml.safe_dump(cfg, sort_keys=False))
    done = orchestrate("run", str(loop), "--workdir", str(tmp_path / "runs"), "--no-live", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = next((tmp_path / "runs").glob("square-*"))
    decks = sorted(run_dir.glob("sims/generate-*/deck.in"))
    assert decks
    for deck in decks:
        lines = dict(ln.split(" = ", 1) for ln in deck.read_text().splitlines())
        rendered = [float(v) for v in lines["x"].split()]
        chosen = np.loadtxt(deck.parent / "points.txt", ndmin=2)[:, 0]
        assert rendered == chosen.tolist() and len(rendered) == 12
        assert lines["file"] == str(deck.parent / "points.txt")
    data = np.concatenate([np.load(f) for f in sorted((run_dir / "data").glob("generate-*.npy"))])
    assert data.shape[0] == 12 * len(decks)


def test_points_in_a_template_without_chosen_points_is_one_line_that_says_how(tmp_path: Path) -> None:
    loop = project(tmp_path)
    (tmp_path / "generate.in.j2").write_text(CHOSEN_DECK)  # but args do not name {points_file}
    line = one_line_error(orchestrate("validate", str(loop), cwd=tmp_path))
    assert "sims.generate.templates.deck.in" in line and "undefined variable(s) points, points_file" in line
    assert "sims.generate.args name {points_file}" in line


def test_template_with_an_undefined_variable_is_one_line_at_validate(tmp_path: Path) -> None:
    loop = project(tmp_path)
    (tmp_path / "check.in.j2").write_text("x = {{ x }}\nsteps = {{ nsteps }}\n")
    line = one_line_error(orchestrate("validate", str(loop), cwd=tmp_path))
    assert "sims.check.templates.deck.in" in line and "undefined variable(s) nsteps" in line
    allowed = line.split("allowed: ")[1].split(", ")
    assert {"attempt", "ranks", "run_id", "seed", "x"} <= set(allowed)


def test_template_syntax_error_and_missing_parser_are_one_line(tmp_path: Path) -> None:
    loop = project(tmp_path)
    (tmp_path / "check.in.j2").write_text("x = {{ x }\n")
    assert "template syntax error" in one_line_error(orchestrate("validate", str(loop), cwd=tmp_path))
    loop = project(tmp_path, output=None, parser="nosuchmodule:rows")
    assert "cannot import 'nosuchmodule'" in one_line_error(orchestrate("validate", str(loop), cwd=tmp_path))


def test_validate_says_what_it_found(tmp_path: Path) -> None:
    done = orchestrate("validate", str(project(tmp_path)), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "inputs: deck.in, scale.dat (per-run directory)" in done.stdout
    assert "results: output file out.txt" in done.stdout


# ------------------------------------------------------------------ output files, read for real


def run_code(tmp_path: Path, output: dict[str, Any] | None, deck: str, *, parser: str | None = None,
             nrows: int | None = None) -> SimResult:
    loop = project(tmp_path)
    sim = SimConfig(binary="./fake-code", args=["deck.in"], templates={"deck.in": "check.in.j2"},
                    files=["scale.dat"], output=OutputFile(**output) if output else None, parser=parser)
    (tmp_path / "check.in.j2").write_text(deck)
    launcher = MpiexecLauncher()
    launcher.io = sim_io(sim, loop.parent, check_fields(["x"]), "sims.check")
    req = LaunchRequest(run_id="check-000001", role="check", binary=tmp_path / "fake-code", args=["deck.in"],
                        ranks=1, workdir=tmp_path / "run", timeout_s=60, ncols=2, nrows=nrows,
                        fields={"x": 0.5, "seed": 1, "run_id": 1, "attempt": 0, "ranks": 1})
    return asyncio.run(launcher.run(req))


@pytest.mark.integration
def test_missing_output_file_is_a_failed_run_in_one_line(tmp_path: Path) -> None:
    r = run_code(tmp_path, {"path": "results.txt", "columns": [1, 3]}, "x = {{ x }}\n")
    assert r.outcome is Outcome.MALFORMED and "\n" not in r.message
    assert r.message == f"{tmp_path / 'run' / 'results.txt'}: no output file (the sim exited 0 without writing it)"


@pytest.mark.integration
def test_output_with_too_few_columns_is_a_failed_run_in_one_line(tmp_path: Path) -> None:
    r = run_code(tmp_path, {"path": "out.txt", "columns": [1, 3]}, "x = {{ x }}\nmode = short\n")
    assert r.outcome is Outcome.MALFORMED and "\n" not in r.message
    assert r.message.endswith("out.txt: has 2 columns; loop.yml takes column 3 (0-based; columns: [1, 3])")


@pytest.mark.integration
def test_declared_columns_are_taken_in_order(tmp_path: Path) -> None:
    r = run_code(tmp_path, {"path": "out.txt", "columns": [1, 3]}, "x = {{ x }} {{ x * 2 }}\n")
    assert r.outcome is Outcome.OK, r.message
    assert r.table is not None and r.table.tolist() == [[0.5, 0.25], [1.0, 1.0]]


def test_csv_by_header_names_and_npy(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("step,x,y\n0,0.5,0.25\n1,1.0,1.0\n")
    table = read_output(tmp_path, OutputFile(path="t.csv", columns=["x", "y"]), ncols=2, nrows=None)
    assert table.tolist() == [[0.5, 0.25], [1.0, 1.0]]
    with pytest.raises(MalformedResult, match=r"no column named 'z' \(header: step, x, y\)"):
        read_output(tmp_path, OutputFile(path="t.csv", columns=["x", "z"]), ncols=2, nrows=None)
    np.save(tmp_path / "t.npy", np.array([[1.0, 2.0, 3.0]]))
    table = read_output(tmp_path, OutputFile(path="t.npy", columns=[0, 2]), ncols=2, nrows=1)
    assert table.tolist() == [[1.0, 3.0]]
    (tmp_path / "bad.txt").write_text("1 2\n3 x\n")
    with pytest.raises(MalformedResult, match=r"bad\.txt: not a table of numbers"):
        read_output(tmp_path, OutputFile(path="bad.txt"), ncols=2, nrows=None)


def test_output_and_parser_together_are_refused() -> None:
    with pytest.raises(ValueError, match="give output or parser, not both"):
        SimConfig(binary="x", output=OutputFile(path="o.txt"), parser="m:f")


def test_spawn_with_an_output_file_is_refused_at_start(tmp_path: Path) -> None:
    loop = project(tmp_path, launcher="spawn")
    line = one_line_error(orchestrate("validate", str(loop), cwd=tmp_path))
    assert "sims.check:" in line and "launcher: spawn" in line


def test_static_file_missing_is_a_config_error(tmp_path: Path) -> None:
    loop = project(tmp_path)
    cfg = LoopConfig.model_validate(yaml.safe_load(loop.read_text()))
    sim = cfg.sims.check.model_copy(update={"files": ["nope.dat"]})
    with pytest.raises(ConfigError, match=r"sims.check.files: 'nope.dat' is not a file"):
        sim_io(sim, tmp_path, check_fields(["x"]), "sims.check")
