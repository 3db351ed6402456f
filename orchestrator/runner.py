"""Assembling a campaign from loop.yml and the machine it runs on.

This is where the parts meet: the allocation is detected, its slots are split
between sims and training, a launcher is chosen per sim, the run directory is
created or reopened, and the tracker is set up. :func:`run` returns the
campaign's result; the CLI turns it into an exit code.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from orchestrator import sampling
from orchestrator.allocation import Allocation, Node, SlotPool
from orchestrator.config import (
    ROLES,
    LoopConfig,
    Role,
    SimConfig,
    check_fields,
    flat_dict,
    format_validation_error,
    generate_fields,
    load_config,
    resolve_binaries,
)
from orchestrator.errors import ConfigError, ResourceError, StoreError, UsageError
from orchestrator.launchers.base import Launcher
from orchestrator.loop.campaign import Campaign, CampaignParts, CampaignResult
from orchestrator.loop.walltime import Durations, WalltimeGuard, allocation_end
from orchestrator.mpi import MpiInfo, mpi_for
from orchestrator.procs import guardian
from orchestrator.progress import Progress
from orchestrator.rundeck import SimIO, render_template, sim_io
from orchestrator.runlog import State, status_of
from orchestrator.slurm import JobWatch
from orchestrator.store import LOOP, RunStore, find_unfinished
from orchestrator.training.backends import Backend, Trainer, make_backend

if TYPE_CHECKING:
    from orchestrator.tracking import Tracker

log = logging.getLogger(__name__)

__all__ = ["build_campaign", "find_unfinished", "open_run", "plan_slots", "run", "run_sync"]

@dataclass(frozen=True)
class SlotPlan:
    """The allocation split between sims and training."""

    sim_nodes: list[Node]
    training_nodes: list[Node]


def plan_slots(alloc: Allocation, cfg: LoopConfig) -> SlotPlan:
    """Split the allocation: sims get every slot not kept for training, never more."""
    sims = cfg.sims
    if not alloc.in_slurm:
        node = alloc.nodes[0]
        slots = cfg.resources.sim_slots or max(2 * node.cpus, sims.check.ranks + sims.generate.ranks)
        return SlotPlan([Node(node.name, slots, node.gpus)], [])
    nodes = list(alloc.nodes)
    training: list[Node] = []
    if cfg.training.backend == "allocation":
        if cfg.resources.training_nodes:
            if cfg.resources.training_nodes >= len(nodes):
                n, per = allocation_needed(cfg)
                raise ResourceError(
                    f"resources.training_nodes={cfg.resources.training_nodes} leaves no node for sims "
                    f"(the allocation has {len(nodes)}); lower it or ask for more nodes "
                    f"(e.g. salloc -N{n} --ntasks-per-node={per})"
                )
            training = nodes[-cfg.resources.training_nodes:]
            nodes = nodes[: -cfg.resources.training_nodes]
        elif training_cores(cfg) >= alloc.total_cpus:
            n, per = allocation_needed(cfg)
            raise ResourceError(
                f"the Dask workers keep {training_cores(cfg)} CPUs (resources.training_cores, or training.workers "
                f"x threads_per_worker) of the {alloc.total_cpus} in the allocation, leaving none for sims; ask "
                f"Slurm for at least {n * per} CPUs (e.g. salloc -N{n} --ntasks-per-node={per}), or lower it")
        else:
            nodes, training = _take_cores(nodes, training_cores(cfg))
    if cfg.resources.sim_slots:
        nodes = _cap(nodes, cfg.resources.sim_slots)
    for role in ("check", "generate"):
        sim = getattr(sims, role)
        room = sum(min(n.cpus, sim.ranks_per_node or n.cpus) for n in nodes)
        if sim.ranks > room:
            raise ResourceError(_too_small(alloc, cfg, role, room, nodes, training))
    return SlotPlan(nodes, training)


def _too_small(alloc: Allocation, cfg: LoopConfig, role: str, room: int, nodes: list[Node],
               training: list[Node]) -> str:
    """Why sim ``role`` cannot fit, and an allocation in which every sim and the Dask workers do."""
    sim = getattr(cfg.sims, role)
    kept = sum(n.cpus for n in training)
    where = f"{alloc.total_cpus} CPUs in the allocation"
    if kept:
        where += f", {kept} kept for the Dask worker(s) (resources.training_cores)"
    per_node = f", at most {sim.ranks_per_node} per node (ranks_per_node)" if sim.ranks_per_node else ""
    n, per = allocation_needed(cfg)
    return (f"sims.{role} asks for {sim.ranks} ranks{per_node} but only {room} sim slots remain for it ({where}; "
            f"sim slots: {', '.join(f'{n.name}:{n.cpus}' for n in nodes) or 'none'}); ask Slurm for at least "
            f"{n * per} CPUs (e.g. salloc -N{n} --ntasks-per-node={per}), or lower `ranks`")


def allocation_needed(cfg: LoopConfig) -> tuple[int, int]:
    """The smallest even allocation (nodes, CPUs per node) where every sim fits on the slots left after
    the Dask workers' CPUs (taken from the last node) or nodes (``training_nodes``): a sim with
    ``ranks_per_node`` needs that many on each of ranks/ranks_per_node nodes; one without fits on one node."""
    kept = training_cores(cfg)
    whole = cfg.resources.training_nodes if cfg.training.backend in ("auto", "allocation") else 0
    shapes = [(math.ceil(s.ranks / s.ranks_per_node), s.ranks_per_node) if s.ranks_per_node else (1, s.ranks)
              for s in (cfg.sims.check, cfg.sims.generate)]
    return max(n for n, _ in shapes) + whole, max(per for _, per in shapes) + kept


def training_cores(cfg: LoopConfig) -> int:
    """CPUs the allocation backend keeps for its Dask workers (none for other backends)."""
    if cfg.training.backend not in ("auto", "allocation") or cfg.resources.training_nodes:
        return 0
    if cfg.resources.training_cores is not None:
        return cfg.resources.training_cores
    return cfg.training.workers * cfg.training.threads_per_worker


def cpus_needed(cfg: LoopConfig) -> int:
    """The fewest CPUs (in one allocation, outside training_nodes) a campaign can start with."""
    return max(cfg.sims.check.ranks, cfg.sims.generate.ranks) + training_cores(cfg)


def _take_cores(nodes: list[Node], cores: int) -> tuple[list[Node], list[Node]]:
    """Keep ``cores`` CPUs for training, taken from the last nodes first."""
    sims = list(nodes)
    training: list[Node] = []
    for i in range(len(sims) - 1, -1, -1):
        if cores <= 0:
            break
        take = min(cores, sims[i].cpus)
        training.insert(0, Node(sims[i].name, take, 0))
        sims[i] = Node(sims[i].name, sims[i].cpus - take, sims[i].gpus)
        cores -= take
    if cores > 0:
        raise ResourceError("resources.training_cores is more than the whole allocation; lower it")
    return [n for n in sims if n.cpus > 0], training


def _cap(nodes: list[Node], slots: int) -> list[Node]:
    out = []
    for n in nodes:
        take = min(n.cpus, slots)
        if take > 0:
            out.append(Node(n.name, take, n.gpus))
        slots -= take
    return out


def resolve_auto(cfg: LoopConfig, alloc: Allocation) -> LoopConfig:
    """The config with ``training.backend: auto`` made concrete for this allocation."""
    if cfg.training.backend != "auto":
        return cfg
    backend = "allocation" if alloc.in_slurm else "local"
    return cfg.model_copy(update={"training": cfg.training.model_copy(update={"backend": backend})})


@dataclass(frozen=True)
class SimSetup:
    """What one sim role needs beyond its config: its binary, its MPI, its run-directory I/O."""

    binary: Path
    mpi: MpiInfo
    io: SimIO


def sim_setups(cfg: LoopConfig, loop_file: Path) -> dict[Role, SimSetup]:
    """Resolve binaries, detect their MPI, load templates and parsers: every mistake fails here, at start."""
    binaries = resolve_binaries(cfg, loop_file)
    base = loop_file.resolve().parent
    # A generate run's templates get the chosen points (and their file) only when the coordinator chooses them.
    chosen = {"points", "points_file"} if cfg.chosen_points else set()
    allowed = {"check": check_fields(cfg.input_names),
               "generate": (generate_fields(cfg.input_names) - {"points_file"}) | chosen}
    sims = {role: cfg.sims.of(role) for role in binaries}
    keys = {role: f"{loop_file}: sims.{role}" for role in binaries}
    with ThreadPoolExecutor(len(binaries) or 1) as pool:  # ldd and `mpiexec --version` of both roles at once
        mpis = dict(zip(binaries, pool.map(lambda r: mpi_for(binaries[r], sims[r].mpi, sims[r].mpiexec, key=keys[r]),
                                           binaries), strict=True))
    setups = {}
    for role, binary in binaries.items():
        sim, key = cfg.sims.of(role), keys[role]
        setups[role] = SimSetup(binary, mpis[role], sim_io(sim, base, allowed[role], key))
        check_launcher(sim, setups[role], key)
        for name, template in setups[role].io.templates.items():  # fails now, not in every sim attempt
            render_template(f"{key}.templates.{name}", template, sample_fields(cfg, role, sim))
    check_points_reach(cfg, setups["generate"], f"{loop_file}: sims.generate")
    return setups


def sample_fields(cfg: LoopConfig, role: str, sim: SimConfig) -> dict[str, Any]:
    """Values like a run's, for a trial render of its templates: each input at its domain's middle (a
    generate run's window: the whole domain), the first run's ids."""
    fields: dict[str, Any] = {"seed": cfg.seed, "run_id": 1, "attempt": 0, "ranks": sim.ranks, "campaign_time": 0}
    mid = [(i.lo + i.hi) / 2 for i in cfg.inputs]
    if role == "check":
        return {**fields, **dict(zip(cfg.input_names, mid, strict=True))}
    for i in cfg.inputs:
        fields |= {f"{i.name}_lo": i.lo, f"{i.name}_hi": i.hi}
    if len(cfg.inputs) == 1:
        fields |= {"lo": cfg.inputs[0].lo, "hi": cfg.inputs[0].hi}
    if cfg.chosen_points:
        fields |= {"points": [mid, mid], "points_file": "points.txt"}
    return fields


def check_points_reach(cfg: LoopConfig, setup: SimSetup, key: str) -> None:
    """Refuse, in one line, points chosen for a generate sim that is told them nowhere."""
    told = cfg.points_file_in_args or bool({"points", "points_file"} & setup.io.uses)
    if cfg.chosen_points and not told:
        raise ConfigError(f"{key}: policy.points_per_run={cfg.policy.points_per_run} makes the coordinator choose "
                          "each run's points, but the sim is not told them: name {points_file} in its args or "
                          "use `points` (or `points_file`) in one of its templates")


def check_launcher(sim: SimConfig, setup: SimSetup, key: str) -> None:
    """Refuse, in one line, a launcher that cannot work with this sim's MPI or result source."""
    if sim.launcher != "spawn":
        return
    problem = setup.mpi.spawn_problem()
    if problem:
        raise ConfigError(f"{key}: {problem}")
    if not setup.io.simkit:
        raise ConfigError(f"{key}: launcher: spawn returns rows over the intercommunicator (simkit only), "
                          "so it cannot read output/parser results; use launcher: auto")


def make_launcher(
    sim: SimConfig, alloc: Allocation, setup: SimSetup | None = None, *, shared: dict[str, Any] | None = None,
    run_dir: Path | None = None, steps_per_s: float | None = None,
) -> Launcher:
    """The launcher a sim asks for, fitted to its MPI; ``auto`` is srun inside Slurm, mpiexec outside.

    ``shared`` holds what the roles share: one agent per node, one srun step rate."""
    shared = {} if shared is None else shared
    kind = sim.launcher
    if kind == "auto":
        kind = "srun" if alloc.in_slurm else "mpiexec"
    launcher: Launcher
    if kind == "mpiexec":
        from orchestrator.launchers.mpiexec import MpiexecLauncher

        launcher = MpiexecLauncher(sim.mpiexec, mpi=setup.mpi if setup else None)
    elif kind == "agent":
        from orchestrator.launchers.agent import AgentPool, NodeAgentLauncher
        from orchestrator.launchers.srun import SrunLauncher

        pool = shared.setdefault("agents", AgentPool(alloc, log_dir=run_dir))
        info = setup.mpi if setup else None
        srun = SrunLauncher(alloc, mpi=info.srun_plugin if info else "pmi2", extra_args=sim.srun_args) \
            if alloc.in_slurm else None
        launcher = NodeAgentLauncher(alloc, mpi=info, mpiexec=sim.mpiexec, srun=srun, pool=pool)
    elif kind == "srun":
        if not alloc.in_slurm:
            raise ConfigError("launcher: srun needs a Slurm allocation (run inside salloc or sbatch), "
                              "or use launcher: auto")
        from orchestrator.launchers.srun import SrunLauncher

        mpi = setup.mpi.srun_plugin if setup else "pmi2"
        if steps_per_s is None:
            launcher = SrunLauncher(alloc, mpi=mpi, extra_args=sim.srun_args)
        else:
            from orchestrator.launchers.agent import RateLimitedSrunLauncher, StepRate

            rate = shared.setdefault("rate", StepRate(steps_per_s))
            launcher = RateLimitedSrunLauncher(alloc, rate, mpi=mpi, extra_args=sim.srun_args)
    else:
        from orchestrator.launchers.spawn import SpawnLauncher

        launcher = SpawnLauncher(alloc)
    if setup is not None:
        launcher.io = setup.io
    return launcher


def walltime_guard(cfg: LoopConfig, alloc: Allocation, state: State | None = None) -> WalltimeGuard | None:
    """The guard for a Slurm allocation whose end Slurm tells (with the sim durations ``state``
    has seen); None otherwise."""
    if not (cfg.walltime.enabled and alloc.in_slurm):
        return None
    end = allocation_end()
    if end is None:
        return None
    guard = WalltimeGuard(end, cfg.walltime.signal_lead_s, cfg.walltime.safety_s)
    if state is not None:
        guard.durations = Durations.from_json(state.sim_durations)
    return guard


def make_tracker(cfg: LoopConfig, workdir: Path, run_name: str) -> Tracker | None:
    if not cfg.tracking.enabled:
        return None
    from orchestrator.tracking import Tracker, default_tracking_uri

    uri = cfg.tracking.uri or default_tracking_uri(workdir)
    return Tracker(uri, cfg.tracking.experiment, run_name)


def open_run(
    loop_file: Path | None, workdir: Path | None, overrides: list[str], resume: Path | None, new: bool,
    progress: Progress,
) -> tuple[LoopConfig, RunStore, State | None, Path]:
    """Create a fresh run directory, or reopen one to resume (explicitly or found unfinished)."""
    if resume is None:
        if loop_file is None:
            raise UsageError("give a loop.yml, or --resume RUN_DIR")
        cfg = load_config(loop_file, overrides)
        root = workdir or Path(cfg.workdir)
        found = None if new else find_unfinished(root, cfg.name)
        if found is None:
            try:
                store = RunStore.create(root, cfg.name, loop_file)
            except (NotADirectoryError, FileExistsError) as exc:  # a file where the run root should be
                path = root.absolute()
                blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), path)
                raise ConfigError(f"workdir: {str(root)!r}: {blocker} is not a directory; give a directory "
                                  "(workdir in loop.yml, or --workdir)") from exc
            store.lock()
            store.write_state({**State().to_json(), "config": flat_dict(cfg)})  # resumable from the start
            return cfg, store, None, root
        progress.note(f"found an unfinished run of {cfg.name!r} at {found}: resuming it "
                      "(pass --new to start a fresh one)")
        resume = found
    store = RunStore.open(resume)
    store.lock()
    data = store.read_state()
    status = status_of(data)
    if status is None or not status.resumable:
        raise UsageError(f"{resume} already ended ({data.get('status')}); nothing to resume")
    try:
        cfg = LoopConfig.model_validate(data["config"])
    except ValidationError as exc:
        first = format_validation_error(exc, "config").splitlines()[0]
        raise StoreError(f"{resume}/state.json holds no valid config ({first}); the run cannot be resumed") from exc
    except Exception as exc:
        raise StoreError(f"{resume}/state.json holds no valid config ({type(exc).__name__}: {exc}); the run "
                         "cannot be resumed") from exc
    if overrides:
        cfg = resume_config(cfg, load_config(loop_file or store.root / LOOP, overrides))
    state = store.read_campaign_state()
    state.launch_counter = store.next_launch(state.launch_counter)
    store.check_models(state)
    for rel, rows in store.reconcile(state, cfg.n_columns):
        progress.note(f"resume: adopted {rel} ({rows} rows), written just before the run was stopped")
    root = workdir or resume.parent
    return cfg, store, state, root


RESUME_MAY_CHANGE = ("resources.", "training.memory_limit", "sims.check.timeout_s", "sims.generate.timeout_s",
                     "training.backend")
"""Config keys a resume may change (resources only): the campaign's meaning stays the same."""


def resume_config(saved: LoopConfig, given: LoopConfig) -> LoopConfig:
    """The config a resume runs with: the saved one, with ``--set`` changes that touch only resources.

    The same ``--set`` the run was started with changes nothing and is accepted; anything else
    (the target, the sims, the seed) is a usage error naming the keys.
    """
    old, new = _flat(flat_dict(saved)), _flat(flat_dict(given))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    changed = [k for k in changed if not (k == "training.backend" and new.get(k) == "auto")]
    refused = [k for k in changed if not k.startswith(RESUME_MAY_CHANGE)]
    if refused:
        raise UsageError(f"--set cannot change {', '.join(refused)} of a resumed run (only resources, "
                         "memory limits and timeouts); start a new one with --new instead")
    if not changed:
        return saved
    log.info("resume: taking %s from --set", ", ".join(changed))
    merged, fresh = flat_dict(saved), flat_dict(given)
    for key in changed:
        *parents, last = key.split(".")
        node, src = merged, fresh
        for p in parents:
            node, src = node[p], src[p]
        node[last] = src[last]
    return LoopConfig.model_validate(merged)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


async def run(
    loop_file: Path | None, *, workdir: Path | None = None, overrides: list[str] | None = None,
    resume: Path | None = None, new: bool = False, progress: Progress | None = None,
) -> CampaignResult:
    """Run (or resume) one campaign to its end."""
    progress = progress or Progress(enabled=False)
    guardian.start(hold=True)  # first: whatever the campaign starts from here on is ended if it is SIGKILLed
    cfg, store, state, root = open_run(loop_file, workdir, overrides or [], resume, new, progress)
    try:
        campaign = build_campaign(cfg, store, loop_file, progress, state=state, root=root,
                                  heading=f"run dir: {store.root}" + (" (resumed)" if state else ""))
    except BaseException:
        if state is None:  # a fresh run that could not start (a sim not found, no GPU): nothing to resume
            store.discard_unstarted()
        raise
    with progress:
        return await campaign.run()


def build_campaign(
    cfg: LoopConfig, store: RunStore, loop_file: Path | None, progress: Progress, *, state: State | None = None,
    root: Path | None = None, tracking: bool = True, alloc: Allocation | None = None,
    launchers: Mapping[str, Launcher] | None = None, binaries: Mapping[str, Path] | None = None,
    backend: Backend | None = None, heading: str | None = None,
) -> Campaign:
    """The one wiring of a campaign (``run``, ``--resume``, ``--steps``, continual mode, the benchmarks):
    loop.yml and the allocation -> sim setups, launchers, slots, Dask backend, trainer, tracker, sampler,
    walltime guard and the saved models of a resumed run. ``state`` is a resumed run's (None: a fresh one).
    A benchmark may bring its own ``alloc``, ``launchers`` (with their ``binaries``) and ``backend``.
    ``heading``: a note shown once the config fits this machine (a ResourceError is the first line), before
    the allocation's."""
    setups = None if launchers else sim_setups(cfg, loop_file if loop_file is not None else store.root / LOOP)
    alloc = alloc or Allocation.detect()
    cfg = resolve_auto(cfg, alloc)
    plan = plan_slots(alloc, cfg)
    if setups is not None:
        binaries = {role: s.binary for role, s in setups.items()}
        launchers = make_launchers(cfg, alloc, setups, store.root)
    if launchers is None or binaries is None:
        raise ValueError("build_campaign: launchers given without their binaries")
    backend = backend or make_backend(cfg.training, allocation=alloc, nodes=plan.training_nodes, run_dir=store.root)
    if heading:
        progress.note(heading)
    progress.note(f"allocation: {'Slurm job ' + str(alloc.job_id) if alloc.in_slurm else 'local'}; sim slots "
                  + ", ".join(f"{n.name}:{n.cpus}" for n in plan.sim_nodes)
                  + f"; training: {cfg.training.backend} x{cfg.training.workers}")
    resumed, search = state is not None, strategy_search(loop_file, state)
    state = state or State()
    if loop_file is not None and state.loop_dir is None:
        state.loop_dir = str(loop_file.resolve().parent)
    tracker = make_tracker(cfg, root or store.root.parent, store.root.name) if tracking else None
    try:
        model, members = saved_models(store, state)
        parts = CampaignParts(
            binaries=binaries, launchers=launchers, pool=SlotPool(plan.sim_nodes), backend=backend,
            trainer=Trainer(backend, cfg.training, len(cfg.inputs), len(cfg.outputs),
                            columns=(cfg.input_names, list(cfg.outputs))),
            sampler=sampling.Sampler.create(cfg, sampling.resolve(cfg, search), state.sampling_rng),
            tracker=tracker, walltime=walltime_guard(cfg, alloc, state), model=model, members=members,
            job_watch=JobWatch(alloc.job_id) if alloc.in_slurm and alloc.job_id else None,
            check_draw=sampling.check_drawer(cfg, search),
        )
        return Campaign(cfg, store, parts, state, resumed=resumed, progress=progress)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        if not resumed:
            raise
        # the resumed state's generator states, durations, continual mode: state.json's contents, not ours
        raise StoreError(f"{store.root}/state.json: a field does not restore ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else exc!r}); the run cannot be resumed") from exc


def make_launchers(cfg: LoopConfig, alloc: Allocation, setups: Mapping[Role, SimSetup], run_dir: Path
                   ) -> dict[str, Launcher]:
    """One launcher per sim role, sharing what the roles share (the node agents, the srun step rate)."""
    shared: dict[str, Any] = {}
    return {role: make_launcher(cfg.sims.of(role), alloc, setups[role], shared=shared, run_dir=run_dir,
                                steps_per_s=cfg.resources.srun_steps_per_s) for role in ROLES}


def saved_models(store: RunStore, state: State) -> tuple[bytes | None, list[bytes]]:
    """A resumed run's current model and ensemble members, read from its models/."""
    model = (store.root / state.model_file).read_bytes() if state.model_file else None
    members = [(store.root / f).read_bytes() for f in state.member_files]
    if not members and model is not None:
        members = [model]
    return model, members


def strategy_search(loop_file: Path | None, state: State | None) -> list[Path]:
    """Where a user's sampling strategy module is looked for: next to loop.yml (the one
    given, or, on resume, the one the run started from)."""
    dirs = [loop_file.resolve().parent] if loop_file is not None else []
    if state is not None and state.loop_dir:
        dirs.append(Path(state.loop_dir))
    return dirs


def run_sync(loop_file: Path | None, **kwargs: Any) -> CampaignResult:
    return asyncio.run(run(loop_file, **kwargs))
