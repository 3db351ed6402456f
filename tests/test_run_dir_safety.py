"""The run dir under faults, without a campaign: the lock, torn and garbage lines, data checked on
resume, a full disk, huge logs, resume-time config changes, the guardian."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from orchestrator.config import load_config
from orchestrator.errors import StoreError, UsageError
from orchestrator.procs import cap_log, tail
from orchestrator.runlog import SimEnd, State
from orchestrator.runner import resume_config
from orchestrator.store import RunStore, atomic_write_bytes
from tests.conftest import REPO, fast_loop, write_loop


def make_store(tmp_path: Path) -> RunStore:
    loop = write_loop(tmp_path, fast_loop())
    return RunStore.create(tmp_path / "runs", "sine", loop)


def test_second_holder_of_a_run_dir_is_refused_naming_the_first(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\nfrom orchestrator.store import RunStore\n"
         "RunStore(Path(sys.argv[1])).lock(); print('locked', flush=True); time.sleep(60)", str(store.root)],
        stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreError) as exc:
            RunStore(store.root).lock()
        assert f"pid {holder.pid} on {socket.gethostname()}" in str(exc.value)
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock
        holder.wait()
    RunStore(store.root).lock()


def test_torn_last_line_does_not_swallow_the_next_event(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    (store.root / "events.jsonl").write_text('{"t": 1, "event": "sim_start", "run_id": "a"}\n{"t": 2, "ev')
    from orchestrator.runlog import CampaignStart

    store.log(CampaignStart(True, str(store.root), 1, {}))
    events = store.read_events()
    assert [e["event"] for e in events] == ["sim_start", "campaign_start"]


def test_garbage_events_and_state_are_one_line_errors(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    (store.root / "events.jsonl").write_bytes(b'42\n["x"]\n\xff\xfe garbage\n{"t": 1, "event": "check", "x": [0]}\n')
    assert [e["event"] for e in store.read_events()] == ["check"]
    for garbage in (b"\xff\xfe", b"[1, 2]", b'{"status": 7, "data_files": 3}', b"{"):
        (store.root / "state.json").write_bytes(garbage)
        with pytest.raises(StoreError) as exc:
            store.read_campaign_state()
        assert "\n" not in str(exc.value) and "state.json" in str(exc.value)
    for cmd in (["status", str(store.root)], ["run", "--resume", str(store.root), "--no-live"]):
        done = subprocess.run([sys.executable, "-m", "orchestrator", *cmd], capture_output=True, text=True,
                              cwd=REPO, timeout=120)
        assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    done = subprocess.run([sys.executable, "-m", "orchestrator", "report", str(store.root)], capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    errors = [ln for ln in done.stderr.splitlines() if " WARNING " not in ln]  # skipped event lines are warned of
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert len(errors) == 1 and errors[0].startswith("error: ") and "state.json" in errors[0], done.stderr


def test_resume_checks_data_files_and_adopts_a_file_a_kill_left_unrecorded(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    store.accept_data("generate-000001", np.zeros((64, 2)))
    store.accept_data("generate-000002", np.zeros((32, 2)))
    store.log(SimEnd(run_id="generate-000002", role="generate", outcome="ok", rows=32))  # logged before accepted
    state = State(data_files=["data/generate-000001.npy"], untrained=[], data_points=64)
    (store.data_dir / ".generate-000003.npy.tmp").write_bytes(b"")
    adopted = store.reconcile(state)
    assert adopted == [("data/generate-000002.npy", 32)] and state.data_points == 96
    assert state.untrained == ["data/generate-000002.npy"]
    assert not list(store.data_dir.glob(".*"))
    (store.data_dir / "generate-000001.npy").unlink()
    with pytest.raises(StoreError) as exc:
        store.reconcile(State(data_files=["data/generate-000001.npy"], data_points=64))
    assert "generate-000001.npy is missing" in str(exc.value) and "\n" not in str(exc.value)


def test_launch_ids_on_disk_are_never_reused(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    (store.sims_dir / "generate-000007").mkdir()
    (store.sims_dir / "check-000003").mkdir()
    assert store.next_launch(5) == 7
    assert store.next_launch(9) == 9


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_full_disk_leaves_the_old_state_and_no_temporary_file(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], check=True)
    try:
        atomic_write_bytes(disk / "state.json", b"old")
        with pytest.raises(OSError) as exc:
            atomic_write_bytes(disk / "state.json", b"x" * 200_000)
        assert exc.value.errno == errno.ENOSPC
        assert (disk / "state.json").read_bytes() == b"old"
        assert sorted(p.name for p in disk.iterdir()) == ["state.json"]
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_huge_log_is_read_from_its_end_and_capped(tmp_path: Path) -> None:
    log = tmp_path / "stderr.log"
    with log.open("wb") as f:
        f.truncate(40 * 1024 * 1024)  # sparse: 40 MB of zeros, then the last words
        f.seek(0, os.SEEK_END)
        f.write(b"\nline one\nMPI_ABORT: the real error\n")
    t0 = time.process_time()
    assert tail(log, 1) == "MPI_ABORT: the real error"
    assert time.process_time() - t0 < 0.5
    cap_log(log, cap=1024 * 1024)
    assert log.stat().st_size < 1024 * 1024 + 200
    assert log.read_bytes().startswith(b"[orchestrator: the first")
    assert tail(log, 1) == "MPI_ABORT: the real error"


def test_resume_takes_the_same_set_and_resource_changes_only(tmp_path: Path) -> None:
    loop = write_loop(tmp_path, fast_loop())
    saved = load_config(loop, ["seed=7"])
    assert resume_config(saved, load_config(loop, ["seed=7"])) == saved
    bigger = resume_config(saved, load_config(loop, ["seed=7", "training.memory_limit=4GB",
                                                     "sims.generate.timeout_s=500"]))
    assert bigger.training.memory_limit == "4GB" and bigger.sims.generate.timeout_s == 500
    assert bigger.seed == 7
    with pytest.raises(UsageError) as exc:
        resume_config(saved, load_config(loop, ["seed=8", "target.successes=9"]))
    assert "seed" in str(exc.value) and "target.successes" in str(exc.value)


def test_state_json_is_written_when_the_run_dir_is_made(tmp_path: Path) -> None:
    """A kill before the first completed step leaves a run dir `run` finds and resumes."""
    from orchestrator.progress import Progress
    from orchestrator.runner import open_run

    loop = write_loop(tmp_path, fast_loop())
    _, store, state, _ = open_run(loop, tmp_path / "runs", [], None, False, Progress(enabled=False))
    assert state is None
    assert json.loads((store.root / "state.json").read_text())["status"] == "running"
    assert oct((store.root / ".lock").stat().st_mode & 0o777) == "0o600"


def test_resume_adopts_a_check_row_a_kill_left_unrecorded_as_a_check_row(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    store.accept_data("generate-000001", np.zeros((64, 2)))
    store.accept_data("check-000002", np.zeros((1, 2)))
    store.accept_data("check-000003", np.zeros((1, 2)))
    store.log(SimEnd(run_id="check-000003", role="check", outcome="ok", rows=1))  # the run log knows it ended ok
    state = State(data_files=["data/generate-000001.npy", "data/check-000002.npy"], data_points=64, check_rows=1)
    adopted = store.reconcile(state)
    # a check's row is data (it joins the next training) but not a generate run the policy waits for
    assert adopted == [("data/check-000003.npy", 1)]
    assert (state.data_points, state.check_rows, state.untrained) == (64, 2, [])
    (store.data_dir / "check-000002.npy").unlink()
    with pytest.raises(StoreError, match=r"check-000002\.npy is missing"):
        store.reconcile(State(data_files=["data/check-000002.npy"], check_rows=1))
    with pytest.raises(StoreError, match=r"0 check rows of the state's files but state\.json counts 1"):
        store.reconcile(State(data_files=["data/generate-000001.npy"], data_points=64, check_rows=1))


# ---------------------------------------------------------------- issue 24: a dead coordinator, garbage run dirs


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120)


def test_status_tells_a_live_coordinator_from_a_sigkilled_one(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    store.write_state({**State().to_json(), "config": {"name": "sine"}})
    holder = subprocess.Popen(  # a coordinator as far as the run dir can tell: the lock, a sim started
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\nfrom orchestrator.store import RunStore\n"
         "from orchestrator.runlog import CampaignStart, SimStart\n"
         "s = RunStore(Path(sys.argv[1])); s.lock(); s.log(CampaignStart(False, sys.argv[1], 0, {}))\n"
         "s.log(SimStart('check-000005', 'check', 0, 2, 'mpiexec', (), []))\n"
         "print('locked', flush=True); time.sleep(120)", str(store.root)],
        stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        live = _cli("status", str(store.root))
        assert live.returncode == 0, live.stderr
        assert f"status     running (coordinator pid {holder.pid} on {socket.gethostname()})" in live.stdout
        assert "1 running: check-000005" in live.stdout
    finally:
        holder.kill()
        holder.wait()
    dead = _cli("status", str(store.root))
    assert dead.returncode == 0, dead.stderr
    assert "status     stopped (coordinator gone, resumable with run --resume" in dead.stdout, dead.stdout
    assert "check-000005" not in dead.stdout and "0 running" in dead.stdout
    assert f"resume     python -m orchestrator run --resume {store.root}" in dead.stdout


@pytest.mark.parametrize(("field", "value", "says"), [
    ("successes", "abc", "successes: got 'abc', expected a count"),
    ("data_files", [1, 2], "data_files: got [1, 2], expected list[str]"),
    ("failed_points", [["x"]], "failed_points: got [['x']], expected list[list[float]]"),
    ("launch_counter", -4, "launch_counter: got -4"),
    ("rng", {"bit_generator": "nonsense"}, "state.json: a field does not restore"),
    ("config", [1, 2], "state.json holds no valid config"),
    ("config", {"name": 5}, "state.json holds no valid config (config: name: got 5"),
])
def test_garbage_in_a_state_field_is_one_line_on_resume_and_status(tmp_path: Path, field: str, value: object,
                                                                   says: str) -> None:
    store = make_store(tmp_path)
    good = {**State().to_json(), "config": load_config(store.root / "loop.yml").model_dump(mode="json")}
    store.write_state({**good, field: value})
    for cmd in (["run", "--resume", str(store.root), "--no-live"], ["status", str(store.root)]):
        done = _cli(*cmd)
        if cmd[0] == "status" and field in ("rng", "config"):  # status reads neither deeply
            assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
            continue
        assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
        errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]  # besides progress notes
        assert len(errors) == 1 and says in errors[0] and errors[0] == done.stderr.strip().splitlines()[-1], \
            done.stderr


def test_a_deleted_models_dir_is_one_line_on_resume(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    cfg = load_config(store.root / "loop.yml").model_dump(mode="json")
    store.write_state({**State(model_version=1, model_file="models/model-0001.pt").to_json(), "config": cfg})
    store.models_dir.rmdir()
    done = _cli("run", "--resume", str(store.root), "--no-live")
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip() == (f"error: {store.root}: models/ is gone, but state.json's model_file/member_files "
                                   "name models/model-0001.pt; restore it, or start a new run (--new)")


def test_a_lock_that_is_a_directory_is_one_line(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    store.write_state({**State().to_json(), "config": load_config(store.root / "loop.yml").model_dump(mode="json")})
    (store.root / ".lock").mkdir()
    for cmd in (["run", "--resume", str(store.root), "--no-live"], ["status", str(store.root)]):
        done = _cli(*cmd)
        assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.strip() == (f"error: {store.root}/.lock is a directory, not the run's lock file; remove it "
                                       "if no coordinator uses this run, then try again")


def test_a_run_that_cannot_start_leaves_no_run_dir_to_resume(tmp_path: Path) -> None:
    """A fresh run stopped before its campaign exists (a sim binary not found) removes the run directory it
    had just made: the next `run`, the mistake fixed, starts afresh instead of resuming the broken run's
    saved loop.yml (and failing the same way)."""
    cfg = fast_loop()
    good = cfg["sims"]["generate"]["binary"]
    cfg["sims"]["generate"]["binary"] = "sim-that-does-not-exist"
    loop = write_loop(tmp_path, cfg)
    work = tmp_path / "runs"

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "orchestrator", "run", str(loop), "--workdir", str(work),
                               "--no-live"], capture_output=True, text=True, timeout=300, cwd=tmp_path)

    failed = run()
    assert failed.returncode == 2 and "sim-that-does-not-exist" in failed.stderr, failed.stderr[-2000:]
    assert "Traceback" not in failed.stderr
    assert not list(work.glob("*/state.json")), list(work.iterdir())
    cfg["sims"]["generate"]["binary"] = good
    write_loop(tmp_path, cfg)
    fixed = run()
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert "found an unfinished run" not in fixed.stdout + fixed.stderr
    assert len(list(work.glob("*/state.json"))) == 1


def test_an_unstarted_run_dir_with_anything_in_it_is_kept(tmp_path: Path) -> None:
    store = RunStore.create(tmp_path / "runs", "c", write_loop(tmp_path, fast_loop()))
    store.lock()
    (store.data_dir / "generate-000001.npy").write_bytes(b"")
    assert not store.discard_unstarted() and store.root.is_dir()
    (store.data_dir / "generate-000001.npy").unlink()
    assert store.discard_unstarted() and not store.root.exists()
