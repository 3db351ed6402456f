"""`submit`: golden job scripts, escaping, the script's signal/requeue logic, and real Slurm jobs."""

from __future__ import annotations

import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from orchestrator import cli
from orchestrator.config import load_config
from orchestrator.errors import ConfigError, UsageError
from orchestrator.runlog import EventKind
from orchestrator.store import read_events
from orchestrator.submit import JobSpec, SubmitError, directive, parse_job_id, prepare, write
from orchestrator.templating import TemplateError, escape_sbatch, escape_sh, render
from tests.conftest import REPO, fast_loop, sim, write_loop
from tests.slurm_cluster import slurm_client_env

GOLDEN = Path(__file__).parent / "golden" / "submit"
SINE = REPO / "examples" / "sine" / "loop.yml"
FIXED = {"python": "/opt/venv/bin/python", "cwd": Path("/home/user/project"), "stamp": "20260101-000000"}

HOSTILE = [
    "my part",
    "it's",
    'say "hi"',
    "$(touch /tmp/pwned)",
    "`id`",
    "a;b && c | d > e",
    "back\\slash",
    "# not a comment",
    "100%",
    "tab\there",
    "*",
    "~",
    "",
]


def golden(name: str, text: str) -> None:
    """Compare with tests/golden/submit/NAME; UPDATE_GOLDEN=1 rewrites it."""
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with UPDATE_GOLDEN=1 once and review it"
    assert text == path.read_text(), f"rendered script differs from {path} (UPDATE_GOLDEN=1 to accept)"


# -- golden scripts ---------------------------------------------------------------------


def test_minimal_script_is_golden_and_has_no_optional_sections() -> None:
    sub = prepare(SINE, JobSpec(), workdir=Path("/scratch/runs"), **FIXED)  # type: ignore[arg-type]
    golden("minimal.sbatch", sub.script)
    for absent in ("--nodes", "--time", "--partition", "--account", "--qos", "--gpus", "--exclusive",
                   "--ntasks-per-node", "--new"):
        assert absent not in sub.script
    assert "#SBATCH --signal=B:USR1@120" in sub.script and "#SBATCH --requeue" in sub.script
    assert sub.script_path == Path("/scratch/runs/jobs/sine-20260101-000000.sbatch")
    assert sub.log_path == Path("/scratch/runs/jobs/sine-20260101-000000.out")
    bash_syntax_ok(sub.script)


def test_full_script_with_hostile_values_is_golden() -> None:
    spec = JobSpec(
        nodes="2-4", ntasks_per_node=8, exclusive=True, time="1-02:30:00", partition="my part",
        account='proj"x\\y', qos="$(touch /tmp/pwned)", gpus="a100:2",
        extra=("#SBATCH --mem=4G", "--constraint=skylake"),
        setup=("module load mpich", "source /opt/venv/bin/activate"),
        signal_lead_s=300, on_interrupt="resubmit", max_restarts=3,
    )
    work = Path("/scratch/my runs/it's \"$(touch pwned)\" 100%")
    sub = prepare(SINE, spec, workdir=work, overrides=["seed=7"], new=True, **FIXED)  # type: ignore[arg-type]
    golden("full.sbatch", sub.script)
    lines = sub.script.splitlines()
    assert '#SBATCH --partition="my part"' in lines
    assert '#SBATCH --account="proj\\"x\\\\y"' in lines
    assert '#SBATCH --qos="$(touch /tmp/pwned)"' in lines
    assert "#SBATCH --constraint=skylake" in lines
    assert "#SBATCH --requeue" not in lines
    # % is doubled so Slurm does not expand it as a filename pattern
    assert '#SBATCH --output="/scratch/my runs/it\'s \\"$(touch pwned)\\" 100%%/jobs/sine-20260101-000000.out"' \
        in lines
    bash_syntax_ok(sub.script)
    # the shell sees the workdir as one word, unexpanded
    cmd_line = next(line for line in lines if line.startswith("cmd=("))
    words = shlex.split(cmd_line.removeprefix("cmd=(").removesuffix(")"))
    assert words[words.index("--workdir") + 1] == str(work)
    assert words[:4] == ["/opt/venv/bin/python", "-m", "orchestrator", "run"]


def bash_syntax_ok(script: str) -> None:
    proc = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


# -- escaping -----------------------------------------------------------------------------


def sbatch_directive_argument(line: str) -> str:
    """How sbatch reads a directive's argument (a port of _get_argument in sbatch/opt.c)."""
    out, quote, escape = [], "", False
    for ch in line:
        if escape:
            escape = False
        elif ch == "\\":
            escape = True
            continue
        elif quote:
            if ch == quote:
                quote = ""
                continue
        elif ch in "\"'":
            quote = ch
            continue
        elif ch == "#" or ch.isspace():
            break
        out.append(ch)
    return "".join(out)


@pytest.mark.parametrize("value", HOSTILE)
def test_escaped_values_round_trip(value: str) -> None:
    echoed = subprocess.run(["bash", "-c", f"printf %s {escape_sh(value)}"], capture_output=True, text=True,
                            check=True).stdout
    assert echoed == value
    if value:
        assert sbatch_directive_argument("--comment=" + escape_sbatch(value)) == "--comment=" + value


@pytest.mark.parametrize("value", ["a\nb", "a\rb", "nul\0"])
def test_line_breaks_are_refused(value: str) -> None:
    with pytest.raises(ValueError, match="single line"):
        escape_sbatch(value)
    for field in ("partition", "account", "qos"):
        with pytest.raises(UsageError, match=f"--{field}"):
            JobSpec(**{field: value})
    with pytest.raises(UsageError, match="--setup"):
        JobSpec(setup=("module load x", value))
    with pytest.raises(UsageError, match="--extra"):
        JobSpec(extra=("#SBATCH --mem=1G" + value,))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"time": "two hours"}, "--time"),
    ({"time": "1:2:3:4"}, "--time"),
    ({"nodes": "0"}, "--nodes"),
    ({"nodes": "2 4"}, "--nodes"),
    ({"gpus": "lots"}, "--gpus"),
    ({"partition": "  "}, "--partition: empty"),
    ({"ntasks_per_node": 0}, "--ntasks-per-node"),
    ({"signal_lead_s": 0}, "--signal-lead"),
    ({"max_restarts": -1}, "--max-restarts"),
    ({"extra": ("module load x",)}, "not an #SBATCH directive"),
])
def test_bad_job_values_are_usage_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(UsageError, match=match):
        JobSpec(**kwargs)


def test_extra_directives_pass_through() -> None:
    assert directive("--mem=4G") == "#SBATCH --mem=4G"
    assert directive("  #SBATCH --exclude=n[2-3]  ") == "#SBATCH --exclude=n[2-3]"


@pytest.mark.parametrize(("template", "match"), [
    ("{{ x }}", "needs an escape filter"),
    ("{{ x|html }}", "needs an escape filter"),
    ("{{ x|sh|upper }}", "needs an escape filter"),
    ("{% filter upper %}{{ x|sh }}{% endfilter %}", "block would rewrite escaped values"),
    ("{% if x %}open", "needs to be closed is 'if'"),
    ("{% endif %}", "unknown tag 'endif'"),
    ("{{ missing|sh }}", "'missing', which the caller does not provide"),
    ("{% if missing %}x{% endif %}", "'missing', which the caller does not provide"),
    ("{{ unset|sh }}", "'unset', but it is not set"),
])
def test_template_mistakes_are_errors(template: str, match: str) -> None:
    with pytest.raises(TemplateError, match=match) as err:
        render(template, {"x": "1", "unset": None}, name="t.in")
    assert str(err.value).startswith("template t.in") and "\n" not in str(err.value)


def test_sections_render_only_when_set() -> None:
    template = ("a\n{% if opt %}\nopt={{ opt|sh }}\n{% endif %}\n"
                "{% for item in items %}\n- {{ item|raw }}\n{% endfor %}\nz\n")
    assert render(template, {"opt": None, "items": []}) == "a\nz\n"
    assert render(template, {"opt": "x y", "items": ["1", "2"]}) == "a\nopt='x y'\n- 1\n- 2\nz\n"


# -- the loop snapshot and the command ---------------------------------------------------------


def test_snapshot_applies_overrides_and_makes_binary_paths_absolute(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "my-check").symlink_to(sim("sim-cheap"))
    cfg = fast_loop()
    cfg["sims"]["check"]["binary"] = "./bin/my-check"
    loop = write_loop(tmp_path, cfg)
    sub = prepare(loop, JobSpec(), workdir=tmp_path / "w", overrides=["seed=9", "target.successes=3"])
    assert not sub.script_path.exists()  # prepare writes nothing
    write(sub)
    snap = load_config(sub.loop_path)
    assert snap.seed == 9 and snap.target.successes == 3
    assert snap.sims.check.binary == str(tmp_path / "bin" / "my-check")
    assert snap.sims.generate.binary == "sim-expensive"
    assert sub.loop_path.read_text().startswith("# Rendered by `python -m orchestrator submit`")
    assert (sub.script_path.stat().st_mode & 0o777) == 0o700


def test_a_missing_binary_fails_unless_the_job_sets_up_its_environment(tmp_path: Path) -> None:
    cfg = fast_loop()
    cfg["sims"]["check"]["binary"] = "sim-from-a-module"
    loop = write_loop(tmp_path, cfg)
    with pytest.raises(ConfigError, match="executable 'sim-from-a-module' not found"):
        prepare(loop, JobSpec(), workdir=tmp_path / "w")
    sub = prepare(loop, JobSpec(setup=("module load my-sims",)), workdir=tmp_path / "w")
    assert "binary: sim-from-a-module" in sub.loop_text


def test_parse_job_id() -> None:
    assert parse_job_id("123\n") == "123"
    assert parse_job_id("4567;cluster\n") == "4567"
    with pytest.raises(SubmitError, match="cannot read a job id from sbatch's output: 'sbatch: error: nope'"):
        parse_job_id("sbatch: error: nope")


def run_cli(*argv: str) -> tuple[int, str]:
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = cli.main(list(argv))
    return rc, buf.getvalue()


def test_dry_run_prints_the_script_and_writes_nothing(tmp_path: Path) -> None:
    rc, out = run_cli("submit", str(SINE), "--workdir", str(tmp_path / "w"), "--nodes", "2", "--time", "30",
                      "--partition", "debug", "--setup", "module load mpich", "--dry-run")
    assert rc == 0
    assert out.startswith("#!/bin/bash\n") and "#SBATCH --nodes=2" in out and "module load mpich\n" in out
    assert not (tmp_path / "w").exists()


def test_a_job_that_asks_for_no_cpus_is_sized_for_the_campaign(capsys: pytest.CaptureFixture[str]) -> None:
    # the sine example: an 8-rank generate sim, plus one core for the Dask worker
    rc, out = run_cli("submit", str(SINE), "--time", "30", "--dry-run")
    assert rc == 0
    assert "#SBATCH --nodes=1\n" in out and "#SBATCH --ntasks-per-node=9\n" in out
    assert "submit: sizing the job: --nodes=1 --ntasks-per-node=9 (the campaign needs 9 CPUs" in capsys.readouterr().err
    rc, out = run_cli("submit", str(SINE), "--nodes", "3", "--dry-run")
    assert rc == 0 and "#SBATCH --ntasks-per-node=3\n" in out
    rc, out = run_cli("submit", str(SINE), "--exclusive", "--dry-run")
    assert rc == 0 and "--ntasks-per-node" not in out


def test_a_job_that_cannot_start_the_campaign_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["submit", str(SINE), "--nodes", "1", "--ntasks-per-node", "4", "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert "gives 4 CPUs but the campaign needs at least 9" in err and "--ntasks-per-node to 9" in err


def test_bad_flags_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["submit", str(SINE), "--partition", "a\nb", "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: --partition: 'a\\nb' contains '\\n'") and err.count("\n") == 1
    rc = cli.main(["submit", str(tmp_path / "nope.yml"), "--dry-run"])
    assert rc == 2 and "no such file" in capsys.readouterr().err


# -- the script's own logic, with a stub coordinator (no Slurm) ------------------------------------

STUB = """#!/bin/bash
# A stand-in coordinator: records its argv and signals, exits 75 when signalled.
echo "$@" > "$STUB_DIR/argv"
trap 'echo USR1 >> "$STUB_DIR/signals"; exit 75' USR1
trap 'echo TERM >> "$STUB_DIR/signals"; exit 75' TERM
touch "$STUB_DIR/started"
[[ -n ${STUB_RC:-} ]] && exit "$STUB_RC"
for _ in $(seq 1 300); do sleep 0.05; done  # until signalled (traps run between sleeps)
exit 1
"""
FAKE_TOOL = """#!/bin/bash
echo "$(basename "$0") $* attempt=${ORCH_SUBMIT_ATTEMPT:-}" >> "$STUB_DIR/calls"
echo 999
"""


def stub_job(tmp_path: Path, new: bool = False, **spec: Any) -> tuple[Path, dict[str, str]]:
    """A rendered job script whose coordinator, scontrol and sbatch are stubs."""
    tmp_path.mkdir(exist_ok=True)
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    for name, text in (("coordinator", STUB), ("scontrol", FAKE_TOOL), ("sbatch", FAKE_TOOL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    sub = prepare(SINE, JobSpec(**spec), workdir=tmp_path / "w", python=str(bin_dir / "coordinator"), new=new)
    write(sub)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
           "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_DIR": str(tmp_path), "SLURM_JOB_ID": "4242"}
    return sub.script_path, env


def run_stub_job(script: Path, env: dict[str, str], signal_to_send: int | None) -> int:
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    started = Path(env["STUB_DIR"]) / "started"
    wait_for(started.exists, 10, "the stub coordinator to start")
    if signal_to_send is not None:
        proc.send_signal(signal_to_send)  # as Slurm does with --signal=B:USR1
    out, _ = proc.communicate(timeout=30)
    print(out.decode())
    return proc.returncode


def test_walltime_signal_is_forwarded_and_the_job_requeued(tmp_path: Path) -> None:
    script, env = stub_job(tmp_path)
    assert run_stub_job(script, env, signal.SIGUSR1) == 0
    assert (tmp_path / "signals").read_text() == "USR1\n"
    assert (tmp_path / "calls").read_text() == "scontrol requeue 4242 attempt=\n"
    argv = (tmp_path / "argv").read_text().split()
    assert argv[:3] == ["-m", "orchestrator", "run"] and "--new" not in argv


def test_sigterm_is_forwarded_and_resubmit_mode_resubmits(tmp_path: Path) -> None:
    script, env = stub_job(tmp_path, on_interrupt="resubmit")
    assert run_stub_job(script, env, signal.SIGTERM) == 0
    assert (tmp_path / "signals").read_text() == "TERM\n"
    assert (tmp_path / "calls").read_text() == f"sbatch --export=ALL {script} attempt=1\n"


def test_no_requeue_after_success_or_when_restarts_are_used_up(tmp_path: Path) -> None:
    script, env = stub_job(tmp_path / "a")
    assert run_stub_job(script, {**env, "STUB_RC": "0"}, None) == 0
    assert not (tmp_path / "a" / "calls").exists()
    script, env = stub_job(tmp_path / "b", max_restarts=2)
    assert run_stub_job(script, {**env, "SLURM_RESTART_COUNT": "2"}, signal.SIGUSR1) == 75
    assert not (tmp_path / "b" / "calls").exists()


def test_new_is_passed_on_the_first_start_only(tmp_path: Path) -> None:
    script, env = stub_job(tmp_path / "a", new=True, on_interrupt="none")
    assert run_stub_job(script, {**env, "STUB_RC": "3"}, None) == 3  # the coordinator's code is the job's
    assert "--new" in (tmp_path / "a" / "argv").read_text().split()
    script, env = stub_job(tmp_path / "b", new=True)
    assert run_stub_job(script, {**env, "SLURM_RESTART_COUNT": "1", "STUB_RC": "0"}, None) == 0
    assert "--new" not in (tmp_path / "b" / "argv").read_text().split()


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.1,
             detail: Callable[[], str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            shown = "" if detail is None else f"\n{detail()}"
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{shown}")
        time.sleep(interval)


# -- on the real test cluster -------------------------------------------------------------------

JOB_WAIT_S = 420  # the shared test cluster may be busy with other jobs
TERMINAL = ("target_met", "stopped", "failed")


def squeue_state(job: str, env: dict[str, str]) -> str:
    """'STATE|REASON' of a job, or '' once Slurm no longer lists it."""
    proc = subprocess.run(["squeue", "-h", "-t", "all", "-j", job, "-o", "%T|%r"], env=env, capture_output=True,
                          text=True, check=False, timeout=30)
    return proc.stdout.strip()


def submit_job(loop: Path, workdir: Path, env: dict[str, str], *flags: str, cwd: Path) -> tuple[str, Path]:
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "submit", str(loop), "--workdir", str(workdir), "--nodes", "1",
         "--ntasks-per-node", "5", "--time", "10", "--partition", "debug", *flags],  # 5: 4 sim ranks + 1 Dask worker
        env=env, capture_output=True, text=True, timeout=60, cwd=cwd, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]
    assert first.startswith("submitted batch job "), proc.stdout
    job = first.split()[3].rstrip(":")
    log = Path(next(line.split(":", 1)[1].strip() for line in proc.stdout.splitlines() if "job log:" in line))
    return job, log


def run_dir_of(workdir: Path) -> Path | None:
    dirs = [d for d in workdir.glob("sine-*") if (d / "state.json").exists()]
    return dirs[0] if len(dirs) == 1 else None


def final_summary(workdir: Path) -> dict[str, Any] | None:
    run_dir = run_dir_of(workdir)
    if run_dir is None or not (run_dir / "summary.json").exists():
        return None
    summary: dict[str, Any] = json.loads((run_dir / "summary.json").read_text())
    return summary if summary["status"] in TERMINAL else None  # "interrupted" is not the end


def wait_for_summary(job: str, workdir: Path, log: Path, env: dict[str, str]) -> dict[str, Any]:
    deadline = time.monotonic() + JOB_WAIT_S
    while (summary := final_summary(workdir)) is None:
        state = squeue_state(job, env)
        if state.split("|")[0] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            time.sleep(1)  # the summary is written before the job ends; one last look
            if (summary := final_summary(workdir)) is not None:
                return summary
            raise AssertionError(f"job {job} ended {state} without a summary:\n{read(log)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job} ({state}) not done after {JOB_WAIT_S} s:\n{read(log)}")
        time.sleep(0.2)
    return summary


def job_log_when_done(job: str, log: Path, env: dict[str, str]) -> str:
    """The job's log once Slurm says the job ended (the summary comes a moment before)."""
    wait_for(lambda: squeue_state(job, env).split("|")[0] in ("", "COMPLETED", "FAILED", "CANCELLED"), 60,
             f"job {job} to end", interval=0.2)
    return read(log)


def read(path: Path) -> str:
    return path.read_text() if path.exists() else f"({path} not written)"


def accepted_rows_are_all_on_disk(run_dir: Path, summary: dict[str, Any]) -> None:
    events = read_events(run_dir)
    accepted = sum(e["rows"] for e in events if e.kind is EventKind.DATA_ACCEPTED and e["role"] == "generate")
    on_disk = sum(np.load(f).shape[0] for f in (run_dir / "data").glob("generate-*.npy"))
    assert on_disk == accepted == summary["data_points"]


@pytest.fixture
def cancel_jobs(slurm_env: dict[str, str]) -> Any:
    """Jobs a test submits; whatever is still queued at the end is cancelled (by id)."""
    jobs: list[str] = []
    yield jobs
    for job in jobs:
        subprocess.run(["scancel", job], env=slurm_client_env(slurm_env), check=False, capture_output=True)


@pytest.mark.slurm
def test_sbatch_reads_escaped_directive_values_back(tmp_path: Path, slurm_env: dict[str, str],
                                                    cancel_jobs: list[str]) -> None:
    env = slurm_client_env(slurm_env)
    template = "#!/bin/bash\n#SBATCH --comment={{ c|sbatch }}\n#SBATCH --job-name={{ c|sbatch }}\ntrue\n"
    for i, value in enumerate(v for v in HOSTILE if v):
        script = tmp_path / f"h{i}.sh"
        script.write_text(render(template, {"c": value}))
        job = parse_job_id(subprocess.run(["sbatch", "--parsable", "--hold", str(script)], env=env,
                                          capture_output=True, text=True, check=True).stdout)
        cancel_jobs.append(job)
        shown = subprocess.run(["squeue", "-h", "-j", job, "-o", "%k|%j"], env=env, capture_output=True,
                               text=True, check=True).stdout.rstrip("\n")
        assert shown == f"{value}|{value}"


@pytest.mark.slurm
@pytest.mark.integration
def test_submitted_job_meets_its_target(tmp_path: Path, slurm_env: dict[str, str],
                                        cancel_jobs: list[str]) -> None:
    env = slurm_client_env(slurm_env)
    loop = write_loop(tmp_path, fast_loop())
    workdir = tmp_path / "runs $(touch pwned) it's 100%"  # the job must take this path literally
    job, log = submit_job(loop, workdir, env, "--set", "seed=5", cwd=tmp_path)
    cancel_jobs.append(job)
    summary = wait_for_summary(job, workdir, log, env)
    assert summary["status"] == "target_met", read(log)
    run_dir = run_dir_of(workdir)
    assert run_dir is not None
    accepted_rows_are_all_on_disk(run_dir, summary)
    assert yaml.safe_load((run_dir / "loop.yml").read_text())["seed"] == 5
    text = job_log_when_done(job, log, env)
    assert f"allocation: Slurm job {job}" in text and "coordinator exited 0" in text
    assert not list(tmp_path.rglob("pwned"))


@pytest.mark.slurm
@pytest.mark.integration
@pytest.mark.parametrize("mode", ["requeue", pytest.param("resubmit", marks=pytest.mark.full)])
def test_walltime_warning_brings_the_job_back_and_it_resumes(tmp_path: Path, slurm_env: dict[str, str],
                                                             cancel_jobs: list[str], mode: str) -> None:
    env = slurm_client_env(slurm_env)
    cfg = fast_loop(**{"policy.pipeline": False, "policy.generates_per_round": 2, "policy.max_inflight": 1})
    cfg["sims"]["generate"]["args"] += ["--work-ms", "1500"]  # slow enough to be caught mid-campaign
    loop = write_loop(tmp_path, cfg)
    workdir = tmp_path / "runs"
    job, log = submit_job(loop, workdir, env, "--on-interrupt", mode, cwd=tmp_path)
    cancel_jobs.append(job)

    def first_data_accepted() -> bool:
        run_dir = run_dir_of(workdir)
        return run_dir is not None and any(e.kind is EventKind.DATA_ACCEPTED for e in read_events(run_dir))

    wait_for(first_data_accepted, JOB_WAIT_S, "the first accepted generate run", interval=0.2)
    # What Slurm sends --signal=B:USR1@N seconds before the time limit, sent now.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True)

    def back() -> bool:
        if mode == "resubmit":
            return "Submitted batch job " in read(log)
        state = squeue_state(job, env)
        if state == "PENDING|BeginTime":
            # Slurm holds a requeued job ~120 s: its node keeps the revoked job credential
            # that long and refuses to start it again ("Job credential revoked"). Any other
            # node may start it now, which also shows the run resuming on another node.
            first_node = read(log).split(" on ", 1)[1].split()[0]
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now", f"ExcNodeList={first_node}"],
                           env=env, check=True)
            return True
        return state.startswith(("PENDING", "RUNNING")) and "attempt 1" in read(log)

    wait_for(back, 120, f"the job to {mode}", interval=0.2, detail=lambda: read(log))
    if mode == "resubmit":
        job = read(log).split("Submitted batch job ")[1].split()[0]
        cancel_jobs.append(job)
    summary = wait_for_summary(job, workdir, log, env)
    text = job_log_when_done(job, log, env)
    assert summary["status"] == "target_met", text
    assert "coordinator exited 75" in text and "coordinator exited 0" in text
    assert (f"requeueing job {cancel_jobs[0]}" if mode == "requeue" else "resubmitting") in text
    assert f"job {job} attempt 1" in text
    if mode == "requeue":
        hosts = [line.split(" on ")[1].split()[0] for line in text.splitlines() if " attempt " in line]
        assert len(hosts) == 2 and hosts[0] != hosts[1]  # resumed on another node
    run_dir = run_dir_of(workdir)
    assert run_dir is not None
    events = read_events(run_dir)
    starts = [e for e in events if e.kind is EventKind.CAMPAIGN_START]
    assert [e["resumed"] for e in starts] == [False, True]
    accepted_rows_are_all_on_disk(run_dir, summary)
