"""Fault injection against real coordinators: kill at a boundary, resume, audit.

A *chain* runs one campaign through a list of faults. Each fault starts
``python -m orchestrator run`` (a plain ``run`` finds the unfinished run and
resumes it), waits in events.jsonl for the boundary's event kind, signals the
coordinator, then checks that every process (and, inside Slurm, every step) the
coordinator had started is gone. After the last fault the campaign is resumed to
its end and audited: rows on disk = rows in state = rows in the summary, exactly
one registered model version, the MLflow run closed, nothing left running.

The same code runs locally (imported by the tests) and inside ``salloc``
(``python -m tests.fault_chain``, which writes its figures as JSON).

Figures (faults injected, campaigns completed, rows lost, orphans) are appended,
one JSON line per chain, to ``$FAULT_FIGURES`` when it is set;
``python -m tests.fault_chain --sum FILE`` prints their totals.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent

Pred = Callable[[dict[str, Any]], bool]

BOUNDARIES: dict[str, Pred] = {
    # the run dir exists, nothing has completed yet
    "before_first_checkpoint": lambda e: e["event"] == "campaign_start",
    "mid_generate": lambda e: e["event"] == "sim_start" and e["role"] == "generate",
    "mid_training": lambda e: e["event"] == "train_start",
    "registration": lambda e: e["event"] == "registering",
    "shutdown": lambda e: e["event"] == "model_registered",
}
"""Where a fault lands: the event kind whose line the chain waits for."""


@dataclass
class Figures:
    chain: str
    faults: int = 0
    campaigns: int = 0
    rows_lost: int = 0
    orphans: int = 0
    steps_left: int = 0
    extra_versions: int = 0
    problems: list[str] = field(default_factory=list)


def campaign_loop(tmp: Path, name: str = "fi", **overrides: Any) -> Path:
    """A small sine campaign with tracking on (sqlite next to the run dirs) and a model to register."""
    cfg: dict[str, Any] = yaml.safe_load((REPO / "examples/sine/loop.yml").read_text())
    cfg["name"] = name
    cfg["sims"]["generate"]["args"] = ["--points-per-rank", "16", "--lo", "{lo}", "--hi", "{hi}",
                                       "--seed", "{seed}", "--work-ms", "3000"]
    cfg["sims"]["generate"]["ranks"] = 4
    cfg["sims"]["check"]["ranks"] = 2
    cfg["target"]["successes"] = 3
    cfg["tracking"] = {"experiment": name, "register_as": f"{name}-surrogate"}
    for key, value in overrides.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def start(loop: Path, work: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "run", str(loop), "--workdir", str(work), "--no-live", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


def run_dirs(work: Path, name: str) -> list[Path]:
    return sorted(d for d in work.glob(f"{name}-*") if d.is_dir()) if work.exists() else []


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "events.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn line (the coordinator was killed mid-write)
    return out


def wait_for_event(work: Path, name: str, pred: Pred, proc: subprocess.Popen[str], skip: int,
                   timeout: float = 240) -> dict[str, Any]:
    """Watch events.jsonl until an event after the first ``skip`` lines satisfies pred."""
    deadline = time.monotonic() + timeout
    seen = skip
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"coordinator ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}"
                                 if proc.stderr else f"coordinator ended early ({proc.returncode})")
        dirs = run_dirs(work, name)
        if dirs:
            events = read_events(dirs[-1])
            for e in events[seen:]:
                if pred(e):
                    return e
            seen = max(seen, len(events))
        time.sleep(0.02)
    raise AssertionError("the boundary's event never came")


def tree(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def cmdline_of(p: psutil.Process) -> str:
    """``p``'s command line, or "" for a process that is gone or a zombie (its parent has not reaped it yet:
    the workers' forkserver reaps its children in its own time)."""
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


ORPHAN_WAIT_S = 2.5
"""How long the coordinator's processes may outlive it; less than a generate sim's own 3 s of work,
so a sim left running is caught before it would end by itself."""


def wait_for_process(proc: subprocess.Popen[str], needle: str, timeout: float = 10) -> bool:
    """Until a descendant of the coordinator has ``needle`` in its command line (spawned ranks
    do not: False after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in tree(proc.pid):
            try:
                if needle in " ".join(p.cmdline()):
                    return True
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.02)
    return False


def left_running(procs: Sequence[psutil.Process], timeout: float = ORPHAN_WAIT_S) -> list[str]:
    """Of the coordinator's descendants, those still alive after ``timeout`` s (their command lines)."""
    _, alive = psutil.wait_procs(list(procs), timeout=timeout)
    out = []
    for p in alive:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(" ".join(p.cmdline())[:200])
        except psutil.NoSuchProcess:
            continue
    return out


def job_steps() -> list[str]:
    """This allocation's steps other than its own (empty outside Slurm)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return []
    out = subprocess.run(["squeue", "-h", "-s", "-j", job, "-o", "%i %j"], capture_output=True, text=True,
                         check=False).stdout
    return [line for line in out.splitlines() if line.strip() and not line.split()[0].endswith(
        (".extern", ".interactive", ".batch"))]


def steps_gone(timeout: float = 30.0) -> list[str]:
    deadline = time.monotonic() + timeout
    steps = job_steps()
    while steps and time.monotonic() < deadline:
        time.sleep(0.25)
        steps = job_steps()
    return steps


def data_rows(run_dir: Path, role: str = "generate") -> int:
    """Rows on disk from one sim role: generate results, or check rows (data/check-N.npy)."""
    return sum(int(np.load(f).shape[0]) for f in (run_dir / "data").glob(f"{role}-*.npy"))


def registry(work: Path, model: str) -> dict[str, Any]:
    db = work / "mlflow.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as con:
        versions = con.execute("SELECT version, run_id FROM model_versions WHERE name = ?", (model,)).fetchall()
        runs = dict(con.execute("SELECT run_uuid, status FROM runs").fetchall())
        metrics = con.execute("SELECT COUNT(*) FROM metrics").fetchone()[0]
    return {"versions": versions, "runs": runs, "metrics": int(metrics)}


def fault(work: Path, loop: Path, name: str, boundary: str, sig: signal.Signals, figures: Figures,
          env: dict[str, str] | None = None) -> None:
    """One fault: start (or resume), wait for the boundary, signal, check nothing is left."""
    dirs = run_dirs(work, name)
    skip = len(read_events(dirs[-1])) if dirs else 0
    from orchestrator import shm

    shm_before = shm.snapshot()
    proc = start(loop, work, env=env)
    try:
        event = wait_for_event(work, name, BOUNDARIES[boundary], proc, skip)
        if boundary == "mid_generate":  # the sim's processes, not only its start line
            wait_for_process(proc, str(event["run_id"]))
        procs = tree(proc.pid)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    figures.faults += 1
    where = f"{figures.chain}: {sig.name} at {boundary}"
    if sig is signal.SIGKILL:
        ok = proc.returncode == -signal.SIGKILL
    else:
        ok = proc.returncode == 75 or (boundary == "shutdown" and proc.returncode == 0)
    if not ok:
        figures.problems.append(f"{where}: exit {proc.returncode}: {err.strip()[-600:]}")
    left = left_running(procs)
    figures.orphans += len(left)
    if left:
        figures.problems.append(f"{where}: processes left: {left}")
    # MPI's segments of the killed ranks (memory, on a shared node), where the guardian is who ends them:
    # inside Slurm, srun's ranks are slurmstepd's to end, on their own nodes
    if not os.environ.get("SLURM_JOB_ID"):
        from tests.conftest import leaked_segments

        left_shm = sorted(leaked_segments(shm_before))
        if left_shm:
            figures.problems.append(f"{where}: /dev/shm files left: {left_shm}")
    steps = steps_gone()
    figures.steps_left += len(steps)
    if steps:
        figures.problems.append(f"{where}: steps left: {steps}")
    run_dir = run_dirs(work, name)[-1]
    state_file = run_dir / "state.json"
    if not state_file.exists():
        figures.problems.append(f"{where}: no state.json: the run dir cannot be resumed")


def finish(work: Path, loop: Path, name: str, figures: Figures, env: dict[str, str] | None = None) -> Path:
    """Resume to the end (unless the last fault let it end) and audit the run dir, the registry and
    the processes."""
    procs: list[psutil.Process] = []
    dirs = run_dirs(work, name)
    ended = bool(dirs) and json.loads((dirs[-1] / "state.json").read_text()).get("status") == "target_met"
    proc = start(loop, work, env=env) if not ended else None
    err = ""
    if proc is not None:
        try:
            _, err = proc.communicate(timeout=400)
        finally:
            if proc.poll() is None:
                procs = tree(proc.pid)
                proc.kill()
                proc.communicate()
    dirs = run_dirs(work, name)
    if proc is not None and proc.returncode != 0:
        figures.problems.append(f"{figures.chain}: final resume exited {proc.returncode}: {err.strip()[-1500:]}")
    if len(dirs) != 1:
        figures.problems.append(f"{figures.chain}: {len(dirs)} run dirs (the campaign was redone)")
    run_dir = dirs[-1]
    audit(run_dir, work, name, figures)
    left = left_running(procs, 5)
    from tests.conftest import pids_of

    left += [str(p) for p in pids_of(str(run_dir))]
    figures.orphans += len(left)
    if left:
        figures.problems.append(f"{figures.chain}: processes left after the end: {left}")
    return run_dir


def audit(run_dir: Path, work: Path, name: str, figures: Figures) -> None:
    state = json.loads((run_dir / "state.json").read_text())
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    disk = data_rows(run_dir)
    accepted = {Path(e["path"]).name: e["rows"] for e in read_events(run_dir) if e["event"] == "data_accepted"}
    in_state = {Path(p).name for p in state["data_files"]}
    lost = sum(r for f, r in accepted.items() if f not in in_state)
    figures.rows_lost += lost + abs(disk - state["data_points"])
    if not (disk == state["data_points"] == summary.get("data_points")):
        figures.problems.append(f"{figures.chain}: rows on disk {disk}, in state {state['data_points']}, "
                                f"in the summary {summary.get('data_points')}")
    checks = data_rows(run_dir, "check")
    figures.rows_lost += abs(checks - state.get("check_rows", 0))
    if not (checks == state.get("check_rows") == summary.get("check_rows")):
        figures.problems.append(f"{figures.chain}: check rows on disk {checks}, in state {state.get('check_rows')}, "
                                f"in the summary {summary.get('check_rows')}")
    if lost:
        figures.problems.append(f"{figures.chain}: {lost} accepted rows missing from state")
    if state["status"] == "target_met" and summary.get("target_met"):
        figures.campaigns += 1
    else:
        figures.problems.append(f"{figures.chain}: ended {state['status']}")
    reg = registry(work, f"{name}-surrogate")
    figures.extra_versions += max(0, len(reg["versions"]) - 1)
    if len(reg["versions"]) != 1:
        figures.problems.append(f"{figures.chain}: {len(reg['versions'])} registered versions: {reg['versions']}")
    run_id = state.get("mlflow_run_id")
    if reg["runs"].get(run_id) != "FINISHED":
        figures.problems.append(f"{figures.chain}: MLflow run {run_id} is {reg['runs'].get(run_id)}")
    ids = [e["run_id"] for e in read_events(run_dir) if e["event"] == "sim_start"]
    if len(ids) != len(set(ids)):
        figures.problems.append(f"{figures.chain}: a sim run id was used twice")
    if list((run_dir / "data").glob(".*")):
        figures.problems.append(f"{figures.chain}: temporary files left in data/")


def chain(tmp: Path, label: str, faults: Sequence[tuple[str, signal.Signals]], *,
          overrides: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> Figures:
    """One campaign through ``faults`` (boundary, signal) in order, then resumed to its end."""
    figures = Figures(label)
    name = "fi"
    loop = campaign_loop(tmp, name, **(overrides or {}))
    work = tmp / "runs"
    for boundary, sig in faults:
        try:
            fault(work, loop, name, boundary, sig, figures, env)
        except AssertionError as exc:
            figures.problems.append(f"{label}: {sig.name} at {boundary}: {exc}")
            break
    finish(work, loop, name, figures, env)
    record(figures)
    return figures


def record(figures: Figures) -> None:
    path = os.environ.get("FAULT_FIGURES")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(asdict(figures)) + "\n")


def totals(path: Path) -> dict[str, int]:
    out = {"chains": 0, "faults": 0, "campaigns": 0, "rows_lost": 0, "orphans": 0, "steps_left": 0,
           "extra_versions": 0, "problems": 0}
    for line in path.read_text().splitlines():
        f = json.loads(line)
        out["chains"] += 1
        for k in ("faults", "campaigns", "rows_lost", "orphans", "steps_left", "extra_versions"):
            out[k] += int(f.get(k, 0))
        out["problems"] += len(f["problems"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sum", type=Path, help="print the totals of a FAULT_FIGURES file")
    ap.add_argument("--tmp", type=Path)
    ap.add_argument("--label", default="chain")
    ap.add_argument("--launcher", default="auto")
    ap.add_argument("--fault", action="append", default=[], help="boundary:SIGNAL")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.sum:
        print(json.dumps(totals(args.sum)))
        return
    faults = [(b, signal.Signals[s]) for b, s in (x.split(":") for x in args.fault)]
    overrides = {"sims.generate.launcher": args.launcher, "sims.check.launcher": args.launcher}
    figures = chain(args.tmp, args.label, faults, overrides=overrides,
                    env={"MPIR_CVAR_CH4_NETMOD": "ofi"})
    args.out.write_text(json.dumps(asdict(figures)))


if __name__ == "__main__":
    main()
