"""Golden tests of built launch commands, and the pure parts of the Slurm backends.

No Slurm needed: commands are compared as data, parsers fed captured output,
and the scheduler's listen/TLS decision is checked with stand-in resolvers.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from orchestrator.allocation import Allocation, Node, Placement
from orchestrator.config import LoopConfig, TrainingConfig
from orchestrator.errors import ConfigError, LaunchError, ResourceError, TrainingError
from orchestrator.launchers.base import LaunchRequest
from orchestrator.launchers.mpiexec import MpiexecLauncher
from orchestrator.launchers.srun import (
    SRUN_INPUT_ENV,
    SrunLauncher,
    parse_srun_log,
    placement_options,
    srun_errors,
    step_argv,
)
from orchestrator.runner import cpus_needed, make_launcher, plan_slots
from orchestrator.training import slurm as ts
from orchestrator.training.backends import make_backend
from tests.conftest import fast_loop

ALLOC = Allocation(nodes=(Node("n1", 8), Node("n2", 8), Node("n3", 8)), in_slurm=True, job_id="77")
BIN = Path("/opt/sims/sim-expensive")


def req(tmp_path: Path, ranks: int, per_node: tuple[tuple[str, int], ...] | None, **kw: object) -> LaunchRequest:
    return LaunchRequest(
        run_id="generate-000012", role="generate", binary=BIN, args=["--seed", "5"], ranks=ranks,
        workdir=tmp_path / "generate-000012", timeout_s=30, ncols=2,
        placement=None if per_node is None else Placement(per_node), **kw,  # type: ignore[arg-type]
    )


def tail(tmp_path: Path) -> list[str]:
    d = tmp_path / "generate-000012"
    return ["--job-name", "generate-000012", "-v", "--kill-on-bad-exit=1", "--open-mode=append",
            "--output", f"{d}/stdout.log", "--error", f"{d}/stderr.log",
            str(BIN), "--seed", "5", "--out", f"{d}/result.npy"]


HEAD = ["srun", "--exact", "--mpi=pmi2"]


# ---------------------------------------------------------------- srun argv (golden)


def test_srun_single_node(tmp_path: Path) -> None:
    cmd = SrunLauncher(ALLOC).command(req(tmp_path, 8, (("n2", 8),)))
    assert cmd == [*HEAD, "-n", "8", "-c", "1", "-N", "1", "--nodelist", "n2", *tail(tmp_path)]


def test_srun_fractional_node(tmp_path: Path) -> None:
    """3 of a node's 8 CPUs: --exact with -n/-c keeps the rest free for other steps."""
    cmd = SrunLauncher(ALLOC).command(req(tmp_path, 3, (("n1", 3),)))
    assert cmd == [*HEAD, "-n", "3", "-c", "1", "-N", "1", "--nodelist", "n1", *tail(tmp_path)]


def test_srun_multi_node_even(tmp_path: Path) -> None:
    cmd = SrunLauncher(ALLOC).command(req(tmp_path, 8, (("n3", 4), ("n1", 4))))
    assert cmd == [*HEAD, "-n", "8", "-c", "1", "-N", "2", "--nodelist", "n3,n1", "--ntasks-per-node", "4",
                   *tail(tmp_path)]


def test_srun_multi_node_uneven_is_arbitrary(tmp_path: Path) -> None:
    cmd = SrunLauncher(ALLOC).command(req(tmp_path, 6, (("n1", 3), ("n2", 1), ("n3", 2))))
    assert cmd == [*HEAD, "-n", "6", "-c", "1", "-N", "3", "--nodelist", "n1,n1,n1,n2,n3,n3",
                   "--distribution=arbitrary", *tail(tmp_path)]


def test_srun_without_placement_uses_ranks_per_node(tmp_path: Path) -> None:
    cmd = SrunLauncher(ALLOC).command(req(tmp_path, 8, None, ranks_per_node=4))
    assert cmd == [*HEAD, "-n", "8", "-c", "1", "--ntasks-per-node", "4", *tail(tmp_path)]


def test_srun_paths_are_absolute_and_escaped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    r = LaunchRequest(run_id="c-1", role="check", binary=BIN, args=[], ranks=1, workdir=Path("runs/50%/c-1"),
                      timeout_s=5, ncols=2, placement=Placement((("n1", 1),)))
    cmd = SrunLauncher(ALLOC).command(r)
    assert cmd[cmd.index("--output") + 1] == f"{tmp_path}/runs/50%%/c-1/stdout.log"
    assert cmd[-1] == f"{tmp_path}/runs/50%/c-1/result.npy"  # the sim's own argument: no escaping


def test_srun_placement_must_match_ranks() -> None:
    with pytest.raises(ValueError, match="holds 3 tasks, not 4"):
        step_argv(4, placement=Placement((("n1", 3),)))


def test_dask_worker_step_argv(tmp_path: Path) -> None:
    cfg = TrainingConfig(backend="allocation", workers=3, threads_per_worker=2, memory_limit="1GB")
    placement = ts.worker_placement([Node("n2", 3), Node("n3", 4)], 3, 2)
    assert placement.per_node == (("n2", 1), ("n3", 2))
    argv = [*step_argv(3, cpus_per_task=2, placement=placement, job_name="sine-1-dask", mpi="none"),
            *ts.worker_argv("tls://10.0.0.1:4000", cfg, tmp_path, ["--tls-ca-file", "ca.pem"])]
    assert argv[:argv.index("--job-name")] == [
        "srun", "--exact", "--mpi=none", "-n", "3", "-c", "2", "-N", "2", "--nodelist", "n2,n3,n3",
        "--distribution=arbitrary"]
    assert argv[argv.index("distributed.cli.dask_worker") + 1:] == [
        "tls://10.0.0.1:4000", "--nthreads", "2", "--memory-limit", "1GB", "--no-dashboard",
        "--local-directory", str(tmp_path), "--death-timeout", "60", "--resources", "train=1",
        "--preload", "orchestrator.training.warmup", "--tls-ca-file",
        "ca.pem"]


def test_placement_options_single_even_uneven() -> None:
    assert placement_options(Placement((("a", 2),))) == ["-N", "1", "--nodelist", "a"]
    assert placement_options(Placement((("a", 2), ("b", 2)))) == [
        "-N", "2", "--nodelist", "a,b", "--ntasks-per-node", "2"]
    assert placement_options(Placement((("a", 1), ("b", 2)))) == [
        "-N", "2", "--nodelist", "a,b,b", "--distribution=arbitrary"]


# ---------------------------------------------------------------- mpiexec argv (golden)


@pytest.mark.parametrize(("ranks", "per_node"), [
    (8, (("n1", 8),)),  # single node
    (3, (("n1", 3),)),  # fractional node
    (10, (("n1", 8), ("n2", 2))),  # multi-node: mpiexec runs on this box only, the placement is ignored
])
def test_mpiexec_argv(tmp_path: Path, ranks: int, per_node: tuple[tuple[str, int], ...]) -> None:
    cmd = MpiexecLauncher(mpiexec="/venv/bin/mpiexec", isolate=False).command(req(tmp_path, ranks, per_node))
    d = tmp_path / "generate-000012"
    assert cmd == ["/venv/bin/mpiexec", "-n", str(ranks), str(BIN), "--seed", "5", "--out", f"{d}/result.npy"]


# ---------------------------------------------------------------- environment and choice


def test_srun_environment_keeps_rank_check_and_drops_srun_inputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "8")
    monkeypatch.setenv("SLURM_HOSTFILE", "/tmp/hosts")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    env = SrunLauncher(ALLOC).environment(req(tmp_path, 6, (("n1", 6),), env={"OMP_NUM_THREADS": "1"}))
    assert env["SIMKIT_EXPECT_RANKS"] == "6"
    assert env["OMP_NUM_THREADS"] == "1"
    assert env["SLURM_JOB_ID"] == "77"
    assert not set(SRUN_INPUT_ENV) & set(env)


def test_launcher_choice() -> None:
    cfg = LoopConfig.model_validate(fast_loop())
    assert make_launcher(cfg.sims.check, ALLOC).name == "srun"
    local = Allocation(nodes=(Node("box", 2),), in_slurm=False, job_id=None)
    assert make_launcher(cfg.sims.check, local).name == "mpiexec"
    srun_sim = cfg.sims.check.model_copy(update={"launcher": "srun"})
    with pytest.raises(ConfigError, match="needs a Slurm allocation"):
        make_launcher(srun_sim, local)
    with pytest.raises(LaunchError):
        SrunLauncher(local)


# ---------------------------------------------------------------- srun -v output

SRUN_V = """\
srun: defined options
srun: -------------------- --------------------
srun: (null)              : n[1-3]
srun: jobid               : 36
srun: -------------------- --------------------
srun: end of defined options
srun: jobid 36: nodes(3):`n[1-3]', cpu counts: 8(x3)
srun: launch/slurm: launch_p_step_launch: CpuBindType=(null type)
srun: launching StepId=36.4 on host n1, 2 tasks: [0-1]
srun: launching StepId=36.4 on host n2, 1 tasks: 2
srun: route/default: init: route default plugin loaded
srun: launch/slurm: _task_start: Node n1, 2 tasks started
srun: launch/slurm: _task_finish: Received task exit notification for 1 task of StepId=36.4 (status=0x0200).
srun: error: n2: task 2: Exited with exit code 2
"""


def test_parse_srun_log() -> None:
    step = parse_srun_log(SRUN_V)
    assert step.step_id == "36.4"
    assert step.per_host == (("n1", 2), ("n2", 1))
    assert parse_srun_log("srun: launching 12.0 on host node07, 1 tasks: 0").step_id == "12.0"  # older Slurm
    never = parse_srun_log("srun: Job 48 step creation temporarily disabled, retrying (Requested nodes are busy)")
    assert never.step_id is None and never.per_host == ()
    assert srun_errors(SRUN_V) == ["srun: error: n2: task 2: Exited with exit code 2"]


# ---------------------------------------------------------------- slots


def test_plan_slots_keeps_training_cores_on_the_last_node() -> None:
    alloc = Allocation(nodes=(Node("n1", 5), Node("n2", 5), Node("n3", 5)), in_slurm=True, job_id="9")
    cfg = LoopConfig.model_validate(fast_loop(**{"training.backend": "allocation", "training.workers": 1}))
    plan = plan_slots(alloc, cfg)
    assert plan.sim_nodes == [Node("n1", 5), Node("n2", 5), Node("n3", 4)]
    assert plan.training_nodes == [Node("n3", 1, 0)]
    jq = LoopConfig.model_validate(fast_loop(**{"training.backend": "jobqueue"}))
    assert plan_slots(alloc, jq).training_nodes == []


def test_too_small_allocation_says_where_the_cpus_went_and_what_to_ask_for() -> None:
    # `salloc -N1 --ntasks-per-node=4` for an 8-rank generate sim: one CPU kept for the Dask worker
    alloc = Allocation(nodes=(Node("n1", 4),), in_slurm=True, job_id="9")
    cfg = LoopConfig.model_validate(fast_loop(**{"training.backend": "allocation", "sims.generate.ranks": 8}))
    with pytest.raises(ResourceError) as err:
        plan_slots(alloc, cfg)
    msg = str(err.value)
    assert "asks for 8 ranks but only 3 sim slots remain" in msg
    assert "4 CPUs in the allocation, 1 kept for the Dask worker(s)" in msg
    assert "at least 9 CPUs (e.g. salloc -N1 --ntasks-per-node=9" in msg
    assert cpus_needed(cfg) == 9


def test_worker_placement_too_small() -> None:
    with pytest.raises(ResourceError, match=r"2 worker\(s\) x 4 thread\(s\).*n3:6.*hold only 1"):
        ts.worker_placement([Node("n3", 6)], 2, 4)


# ---------------------------------------------------------------- listen address and TLS


def test_listen_loopback_with_tls_when_every_worker_is_this_host() -> None:
    local = {"127.0.0.1", "10.1.2.3"}
    plan = ts.plan_listen(["127.0.0.1", "10.1.2.3"], is_local=local.__contains__,
                          outward=lambda a: pytest.fail("no route lookup for local workers"))
    assert plan == ts.ListenPlan("127.0.0.1", tls=True)
    assert plan.protocol == "tls"  # loopback is shared by every user of the node


def test_listen_on_the_network_with_tls_for_remote_workers() -> None:
    plan = ts.plan_listen(["127.0.0.1", "10.1.2.9"], is_local=lambda a: a == "127.0.0.1",
                          outward=lambda a: {"10.1.2.9": "10.1.2.3"}[a])
    assert plan == ts.ListenPlan("10.1.2.3", tls=True)
    assert plan.protocol == "tls"


def test_listen_with_tls_when_the_workers_are_unknown() -> None:
    assert ts.plan_listen(None).tls is True


def test_is_local_address() -> None:
    assert ts.is_local_address("127.0.0.1")
    assert ts.is_local_address("localhost")
    assert not ts.is_local_address("192.0.2.1")  # TEST-NET-1: never assigned
    assert not ts.is_local_address("no-such-host.invalid")


def test_fake_nodes_here_are_loopback() -> None:
    addrs = ts.parse_node_addrs("n1 127.0.0.1\nn2 127.0.0.1\nn3 127.0.0.1\n")
    assert addrs == {"n1": "127.0.0.1", "n2": "127.0.0.1", "n3": "127.0.0.1"}
    assert ts.plan_listen(list(addrs.values())) == ts.LOOPBACK
    with pytest.raises(TrainingError, match="cannot parse"):
        ts.parse_node_addrs("n1 127.0.0.1 extra\n")


def test_worker_tls_files_are_private(tmp_path: Path) -> None:
    from distributed.security import Security

    flags = ts.write_worker_tls(Security.temporary(), tmp_path / "tls")  # type: ignore[no-untyped-call]
    assert flags[::2] == ["--tls-ca-file", "--tls-cert", "--tls-key"]
    for path in map(Path, flags[1::2]):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_text().startswith("-----BEGIN")


def test_jobqueue_options_defaults_and_pass_through(tmp_path: Path) -> None:
    cfg = TrainingConfig(backend="jobqueue", workers=2, threads_per_worker=2, memory_limit="3GB",
                         jobqueue={"queue": "debug", "walltime": "00:10:00",
                                   "scheduler_options": {"port": 8786}})
    opts = ts.jobqueue_options(cfg, tmp_path / "sine-1", ts.LOOPBACK, None)
    assert opts["cores"] == 2 and opts["memory"] == "3GB" and opts["processes"] == 1
    assert opts["queue"] == "debug" and opts["walltime"] == "00:10:00"
    assert opts["scheduler_options"] == {"dashboard": False, "dashboard_address": "127.0.0.1:0", "host": "127.0.0.1",
                                         "port": 8786}
    assert opts["job_name"] == "sine-1-dask"
    extra = opts["worker_extra_args"]
    assert extra[extra.index("--preload") + 1] == "orchestrator.training.warmup"  # torch imported at start
    assert "security" not in opts
    # the workers' HTTP servers serve no route (they are stopped once up), and no statistical profiler
    # samples their training: the jobs' environment says so
    ours = ["export DASK_DISTRIBUTED__WORKER__HTTP__ROUTES='[]'",
            "export DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False"]
    assert opts["job_script_prologue"] == ours
    mine = TrainingConfig(backend="jobqueue", jobqueue={"job_script_prologue": ["module load python"]})
    assert ts.jobqueue_options(mine, tmp_path / "s", ts.LOOPBACK, None)["job_script_prologue"] == [
        "module load python", *ours]
    secure = ts.jobqueue_options(cfg, tmp_path / "sine-1", ts.ListenPlan("10.0.0.5", tls=True), object())  # type: ignore[arg-type]
    assert secure["scheduler_options"]["host"] == "10.0.0.5"
    assert secure["shared_temp_directory"] == str(tmp_path / "sine-1" / "dask" / "tls")


def test_jobqueue_user_host_wins() -> None:
    assert ts._listen_for_jobqueue({"scheduler_options": {"interface": "ib0"}}) is None
    assert ts._listen_for_jobqueue({"interface": "ib0"}) is None


def test_backends_do_no_work_when_built(tmp_path: Path) -> None:
    for kind, cls in (("allocation", ts.AllocationBackend), ("jobqueue", ts.JobqueueBackend)):
        backend = make_backend(TrainingConfig(backend=kind), allocation=ALLOC, nodes=[Node("n3", 1)],  # type: ignore[arg-type]
                               run_dir=tmp_path / "r")
        assert isinstance(backend, cls)
        assert backend.describe() == {"backend": kind, "tls": None}
    assert not (tmp_path / "r").exists()


def test_multi_node_steps_default_to_the_ofi_netmod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MPIR_CVAR_CH4_NETMOD", raising=False)
    launcher = SrunLauncher(ALLOC)
    multi = launcher.environment(req(tmp_path, 6, (("n1", 3), ("n2", 3))))
    single = launcher.environment(req(tmp_path, 6, (("n1", 6),)))
    mine = launcher.environment(req(tmp_path, 6, (("n1", 3), ("n2", 3)), env={"MPIR_CVAR_CH4_NETMOD": "ucx"}))
    assert multi["MPIR_CVAR_CH4_NETMOD"] == "ofi"
    assert "MPIR_CVAR_CH4_NETMOD" not in single
    assert mine["MPIR_CVAR_CH4_NETMOD"] == "ucx"


def test_gpu_dask_worker_step_asks_for_gpus(tmp_path: Path) -> None:
    cfg = TrainingConfig(backend="allocation", workers=2, device="cuda", gpus_per_worker=1)
    assert ts.gpu_step_options(cfg) == ["--gpus-per-task=1"]
    assert ts.gpu_step_options(TrainingConfig(backend="allocation", workers=2)) == []
    argv = ts.worker_argv("tcp://127.0.0.1:4000", cfg, tmp_path)
    assert argv[argv.index("--resources") + 1] == "train=1,GPU=1"
    cpu = ts.worker_argv("tcp://127.0.0.1:4000", TrainingConfig(), tmp_path)
    assert cpu[cpu.index("--resources") + 1] == "train=1"


def test_gpu_jobqueue_jobs_ask_for_gres(tmp_path: Path) -> None:
    cfg = TrainingConfig(backend="jobqueue", device="cuda", gpus_per_worker=2,
                         jobqueue={"job_extra_directives": ["--constraint=a100"]})
    opts = ts.jobqueue_options(cfg, tmp_path / "sine-1", ts.LOOPBACK, None)
    assert opts["job_extra_directives"] == ["--constraint=a100", "--gres=gpu:2"]
    assert opts["worker_extra_args"][-2:] == ["--resources", "train=1,GPU=2"]
    own = TrainingConfig(backend="jobqueue", device="cuda", jobqueue={"job_extra_directives": ["--gpus=1"]})
    assert ts.jobqueue_options(own, tmp_path / "s", ts.LOOPBACK, None)["job_extra_directives"] == ["--gpus=1"]


def test_a_sims_own_mpi_mpiexec_and_srun_args_reach_every_launcher(tmp_path: Path) -> None:
    """loop.yml's ``mpi: openmpi``, ``mpiexec:`` and ``srun_args`` per sim, as each launcher builds its command."""
    import sys

    from orchestrator.launchers.agent import NodeAgentLauncher
    from orchestrator.mpi import mpi_for
    from orchestrator.rundeck import SIMKIT
    from orchestrator.runner import SimSetup

    mpiexec = tmp_path / "ompi" / "mpiexec"  # the site's own launcher
    mpiexec.parent.mkdir()
    mpiexec.write_text("#!/bin/sh\n")
    mpiexec.chmod(0o755)
    cfg = LoopConfig.model_validate(fast_loop())
    sim = cfg.sims.generate.model_copy(update={"mpi": "openmpi", "mpiexec": str(mpiexec),
                                               "srun_args": ["--cpu-bind=cores", "--mem-per-cpu=500M"]})
    setup = SimSetup(BIN, mpi_for(Path(sys.executable), sim.mpi, sim.mpiexec), SIMKIT)
    r = req(tmp_path, 8, (("n2", 8),))
    srun = make_launcher(sim, ALLOC, setup).command(r)
    assert srun[:3] == ["srun", "--exact", "--mpi=pmix"]
    assert srun.index("--cpu-bind=cores") < srun.index(str(BIN)) and "--mem-per-cpu=500M" in srun
    local = Allocation(nodes=(Node("box", 8),), in_slurm=False, job_id=None)
    for kind in ("mpiexec", "agent"):
        launcher = make_launcher(sim.model_copy(update={"launcher": kind}), local, setup, run_dir=tmp_path)
        cmd = launcher.command(r)
        start = cmd.index(str(mpiexec))
        assert cmd[start:start + 4] == [str(mpiexec), "-n", "8", "--oversubscribe"], (kind, cmd)
    agent = make_launcher(sim.model_copy(update={"launcher": "agent"}), ALLOC, setup, run_dir=tmp_path)
    assert isinstance(agent, NodeAgentLauncher) and agent.srun is not None
    multi = agent.command(req(tmp_path, 8, (("n1", 4), ("n2", 4))))
    assert multi[:3] == ["srun", "--exact", "--mpi=pmix"] and "--cpu-bind=cores" in multi
    import os

    from orchestrator.mpi import ROOT_ENV

    env = agent.sim_env(r)  # what the node agent adds to its own environment for this sim
    assert env["SIMKIT_EXPECT_RANKS"] == "8"
    if os.geteuid() == 0:  # Open MPI as root is told it is fine, as the mpiexec launcher does
        assert ROOT_ENV.items() <= env.items()


@pytest.mark.parametrize("shape", [
    {"sims.generate.ranks": 8},
    {"sims.generate.ranks": 12, "sims.generate.ranks_per_node": 4},
    {"sims.generate.ranks": 6, "sims.generate.ranks_per_node": 2, "sims.check.ranks": 5},
    {"sims.generate.ranks": 16, "training.workers": 3, "training.threads_per_worker": 2},
    {"sims.generate.ranks": 9, "sims.generate.ranks_per_node": 3, "resources.training_nodes": 1},
])
def test_the_allocation_a_too_small_one_suggests_fits_every_sim(shape: dict[str, object]) -> None:
    """Take the suggestion literally (N nodes of C CPUs): every sim and the Dask workers fit in it."""
    cfg = LoopConfig.model_validate(fast_loop(**{"training.backend": "allocation", **shape}))
    small = Allocation(nodes=(Node("n1", 2),), in_slurm=True, job_id="9")
    with pytest.raises(ResourceError) as err:
        plan_slots(small, cfg)
    found = re.search(r"\(e\.g\. salloc -N(\d+) --ntasks-per-node=(\d+)\)", str(err.value))
    assert found, err.value
    n, per = map(int, found.groups())
    suggested = Allocation(nodes=tuple(Node(f"n{i}", per) for i in range(n)), in_slurm=True, job_id="9")
    plan = plan_slots(suggested, cfg)
    for sim in (cfg.sims.check, cfg.sims.generate):
        assert sum(min(node.cpus, sim.ranks_per_node or node.cpus) for node in plan.sim_nodes) >= sim.ranks


def test_agent_runs_a_one_rank_mpich_sim_as_a_singleton_and_keeps_mpiexec_otherwise(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 25: a one-rank MPICH run on one node is the program itself (singleton init, no hydra);
    more ranks, Open MPI, or an MPI not known keep the node-local mpiexec."""
    from orchestrator.launchers.agent import NodeAgentLauncher
    from orchestrator.mpi import Flavour, MpiInfo

    local = Allocation(nodes=(Node("box", 8),), in_slurm=False, job_id=None)
    mpich = MpiInfo(Flavour.MPICH, "test", None, "/opt/mpich/bin/mpiexec")
    ompi = MpiInfo(Flavour.OPENMPI, "test", None, "/opt/ompi/bin/mpiexec")
    one, two = req(tmp_path, 1, (("box", 1),)), req(tmp_path, 2, (("box", 2),))
    program = [str(BIN.absolute()), "--seed", "5", "--out", str(one.out_path.absolute())]
    assert NodeAgentLauncher(local, mpi=mpich).command(one) == program
    assert NodeAgentLauncher(local, mpi=mpich).command(two)[:3] == ["/opt/mpich/bin/mpiexec", "-n", "2"]
    assert NodeAgentLauncher(local, mpi=ompi).command(one)[:4] == ["/opt/ompi/bin/mpiexec", "-n", "1",
                                                                   "--oversubscribe"]
    assert NodeAgentLauncher(local, mpiexec="/opt/x/mpiexec").command(one)[:3] == ["/opt/x/mpiexec", "-n", "1"]
    for key in [k for k in os.environ if k.startswith("UCX_")]:  # MPICH's UCX stays on the node
        monkeypatch.delenv(key)
    assert NodeAgentLauncher(local, mpi=mpich).sim_env(one)["UCX_TLS"] == "self"  # a singleton
    assert NodeAgentLauncher(local, mpi=mpich).sim_env(two)["UCX_TLS"] == "self,sm"
    for r in (one, two):
        assert NodeAgentLauncher(local, mpi=mpich).sim_env(r)["UCX_MEM_MMAP_HOOK_MODE"] == "none"
    own = req(tmp_path, 1, (("box", 1),), env={"UCX_TLS": "tcp"})
    assert NodeAgentLauncher(local, mpi=mpich).sim_env(own)["UCX_TLS"] == "tcp"
    assert not any(k.startswith("UCX_") for k in NodeAgentLauncher(local, mpi=ompi).sim_env(two))
    from orchestrator.launchers.mpiexec import MpiexecLauncher
    assert MpiexecLauncher(mpi=mpich).environment(two)["UCX_TLS"] == "self,sm"
    assert MpiexecLauncher(mpi=mpich).environment(own)["UCX_TLS"] == "tcp"
    monkeypatch.setenv("UCX_TLS", "rc")  # a value in the environment wins too
    assert "UCX_TLS" not in NodeAgentLauncher(local, mpi=mpich).sim_env(two)
    assert MpiexecLauncher(mpi=mpich).environment(two)["UCX_TLS"] == "rc"
