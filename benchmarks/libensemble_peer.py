"""The same campaign in libEnsemble's idiom: the honest peer of benchmarks/bench_peer.py.

One persistent generator (``gen_f``) holds the surrogate: it asks for generate sims,
trains on their data with the project's own training function, asks for check sims
at points it predicts, and ends the ensemble when ``target.successes`` checks of the
current model were within ``target.tolerance``. Sims are ``sim_f`` calls on
libEnsemble's workers, each starting the project's C MPI sim through libEnsemble's
``MPIExecutor`` (the same mpiexec as the orchestrator's). The allocation function is
libEnsemble's ``only_persistent_gens`` with ``async_return``, so the generator sees
each result as it ends. Same config, sims, model and hyper-parameters as the
orchestrator (``loop.yml``); pipelined like it: with ``policy.pipeline`` the next
round's generate sims run while a round trains.

    python benchmarks/libensemble_peer.py LOOP.yml --seed S --workdir DIR [--lazy-dynamo]

``--lazy-dynamo`` gives the generator the torch setting the orchestrator's workers install
(:mod:`orchestrator.training.lazydynamo`: torch's optimizers without importing ``torch._dynamo``),
for a variant arm beside the idiomatic one.

prints one JSON line: ``first_sim_at`` and ``target_at`` (absolute times), the rounds,
the sims, and ``gen_pid`` (the generator's process, which trains: not coordination).
Needs ``pip install -e .[bench]`` (libEnsemble, pinned in constraints.txt).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import time
from pathlib import Path
from typing import Any

import numpy as np
from libensemble import Ensemble
from libensemble.alloc_funcs.start_only_persistent import only_persistent_gens
from libensemble.executors import MPIExecutor
from libensemble.message_numbers import (
    EVAL_GEN_TAG,
    FINISHED_PERSISTENT_GEN_TAG,
    PERSIS_STOP,
    STOP_TAG,
    TASK_FAILED,
    WORKER_DONE,
)
from libensemble.specs import AllocSpecs, ExitCriteria, GenSpecs, LibeSpecs, SimSpecs
from libensemble.tools.persistent_support import PersistentSupport

from orchestrator.config import LoopConfig, load_config, render_args, resolve_binaries
from orchestrator.launchers.mpiexec import find_mpiexec
from orchestrator.mpi import mpi_for

CHECK, GENERATE = 0, 1
ROLES = {CHECK: "check", GENERATE: "generate"}


def run_sim(H: Any, persis_info: Any, sim_specs: Any, libE_info: Any) -> tuple[Any, Any, int]:
    """One sim through libEnsemble's MPIExecutor; a check returns its outputs, a generate its table's path."""
    u = sim_specs["user"]
    row = H[0]
    role = ROLES[int(row["kind"])]
    sim = u["sims"][role]
    out = Path(u["workdir"]) / f"{role}-{int(libE_info['H_rows'][0]):06d}.npy"
    values: dict[str, Any] = {"seed": int(row["seed"]), "run_id": int(libE_info["H_rows"][0]), "attempt": 0,
                              "ranks": sim["ranks"]}
    for name, x, lo, hi in zip(u["inputs"], row["x"], u["lo"], u["hi"], strict=True):
        values[name], values[f"{name}_lo"], values[f"{name}_hi"] = float(x), lo, hi
    if len(u["inputs"]) == 1:
        values["lo"], values["hi"] = u["lo"][0], u["hi"][0]
    args = [*render_args(sim["args"], values), "--out", str(out)]
    H_o = np.zeros(1, dtype=sim_specs["out"])
    H_o["launched_at"] = time.time()
    task = libE_info["executor"].submit(app_name=role, num_procs=sim["ranks"], app_args=shlex.join(args))
    task.wait()
    if task.errcode != 0 or not out.exists():
        return H_o, persis_info, TASK_FAILED
    H_o["path"] = str(out)
    if role == "check":
        H_o["y"] = np.load(out)[0, len(u["inputs"]):]
    return H_o, persis_info, WORKER_DONE


class _Round:
    """The generator's view of the campaign: data, model, successes (the orchestrator's rules)."""

    def __init__(self, cfg: LoopConfig, rng: np.random.Generator) -> None:
        self.cfg, self.rng = cfg, rng
        self.lo = np.array([i.lo for i in cfg.inputs])
        self.hi = np.array([i.hi for i in cfg.inputs])
        self.members: list[bytes | None] = [None] * cfg.policy.ensemble_size
        self.files: list[str] = []
        self.untrained = 0
        self.version = self.successes = 0
        self.failed = False
        self.recheck: list[list[float]] = []
        self.inflight = {CHECK: 0, GENERATE: 0}

    def needs_training(self) -> bool:
        return (self.version == 0 or self.failed) and self.untrained > 0 and \
            self.version < self.cfg.target.max_rounds

    def judge(self, row: Any) -> None:
        """A check's verdict, for the model version it checked (stale ones do not count)."""
        if row["version"] != self.version or not row["path"]:
            return
        error = float(np.max(np.abs(row["pred"] - row["y"])))
        if error < self.cfg.target.tolerance:
            self.successes += 1
        else:
            self.failed = True
            self.recheck.append([float(v) for v in row["x"]])


def _ask(ps: PersistentSupport, gen_specs: Any, state: _Round, kind: int, xs: list[list[float]],
         preds: list[list[float]] | None = None) -> None:
    """Send sims to the manager: generate (x unused) or check (at xs, with the prediction)."""
    if not xs:
        return
    H_o = np.zeros(len(xs), dtype=gen_specs["out"])
    H_o["kind"] = kind
    H_o["x"] = xs
    H_o["seed"] = state.rng.integers(2**31, size=len(xs))
    H_o["version"] = state.version
    if preds is not None:
        H_o["pred"] = preds
    state.inflight[kind] += len(xs)
    ps.send(H_o)


def _train(state: _Round, tasks: Any, member_seed: Any) -> None:
    cfg = state.cfg
    hparams = {"num_threads": 1, **cfg.training.hparams.model_dump(exclude_unset=True)}
    seed = int(state.rng.integers(2**31))
    state.members = [tasks.train(m, state.files, cfg.training.model, dict(cfg.training.model_kwargs), hparams,
                                 len(cfg.inputs), member_seed(seed, k))[0] for k, m in enumerate(state.members)]
    state.version += 1
    state.failed, state.untrained = False, 0


def _checks(ps: PersistentSupport, gen_specs: Any, state: _Round, tasks: Any) -> None:
    """Keep ``checks_per_round`` checks of the current model in flight (failed points first)."""
    cfg = state.cfg
    if state.version == 0 or state.failed:
        return
    n = cfg.policy.checks_per_round - state.inflight[CHECK]
    xs = [state.recheck.pop(0) for _ in range(min(n, len(state.recheck)))]
    xs += [[float(v) for v in state.rng.uniform(state.lo, state.hi)] for _ in range(n - len(xs))]
    kw = dict(cfg.training.model_kwargs)
    preds = [np.mean([tasks.evaluate(m, cfg.training.model, kw, [x])[0] for m in state.members], axis=0).tolist()
             for x in xs]
    _ask(ps, gen_specs, state, CHECK, xs, preds)


def surrogate_gen(H: Any, persis_info: Any, gen_specs: Any, libE_info: Any) -> tuple[Any, Any, int]:
    """The persistent generator: generate, train, check, until the target is met (or max_rounds)."""
    u = gen_specs["user"]
    if Path(u["report"]).exists():  # started again after it ended the campaign (a race seen once in 55 runs of
        return None, persis_info, FINISHED_PERSISTENT_GEN_TAG  # only_persistent_gens): end at once, not wait 600 s
    cfg = load_config(Path(u["loop"]), u["overrides"])
    ps = PersistentSupport(libE_info, EVAL_GEN_TAG)
    state = _Round(cfg, persis_info["rand_stream"])
    none = [[0.0] * len(cfg.inputs)]
    _ask(ps, gen_specs, state, GENERATE, none * cfg.policy.generates_per_round)
    from orchestrator.training import tasks  # torch: in the generator, while the first sims run
    from orchestrator.training.ensemble import member_seed

    if u["lazy_dynamo"]:  # the orchestrator workers' torch setting (a variant arm, not the idiom)
        from orchestrator.training import lazydynamo

        lazydynamo.install()

    while state.successes < cfg.target.successes:
        tag, _, calc_in = ps.recv()
        if tag in (STOP_TAG, PERSIS_STOP):
            break
        for row in [] if calc_in is None else calc_in:
            kind = int(row["kind"])
            state.inflight[kind] -= 1
            if kind == GENERATE and row["path"]:
                state.files.append(str(row["path"]))
                state.untrained += 1
            elif kind == CHECK:
                state.judge(row)
        if state.successes >= cfg.target.successes:
            break
        if state.needs_training():
            more = cfg.policy.max_inflight - state.inflight[GENERATE]
            if cfg.policy.pipeline and state.version + 1 < cfg.target.max_rounds:
                _ask(ps, gen_specs, state, GENERATE, none * max(0, more))  # they run while this round trains
            _train(state, tasks, member_seed)
        elif state.failed and state.inflight[GENERATE] == 0 and state.version < cfg.target.max_rounds:
            _ask(ps, gen_specs, state, GENERATE, none * cfg.policy.generates_per_round)
        elif state.failed and state.version >= cfg.target.max_rounds and state.inflight[GENERATE] == 0:
            break
        _checks(ps, gen_specs, state, tasks)
    Path(u["report"]).write_text(json.dumps({
        "target_at": time.time() if state.successes >= cfg.target.successes else None,
        "rounds": state.version, "data_files": len(state.files), "gen_pid": os.getpid()}))
    return None, persis_info, FINISHED_PERSISTENT_GEN_TAG


def build(cfg: LoopConfig, loop_file: Path, overrides: list[str], workdir: Path, lazy_dynamo: bool = False) -> Ensemble:
    binaries = resolve_binaries(cfg, loop_file)
    for role in ROLES.values():  # the node-local MPI settings the orchestrator gives the same sims
        ranks = getattr(cfg.sims, role).ranks
        for key, value in mpi_for(binaries[role]).local_env(ranks).items():
            os.environ.setdefault(key, value)
    exctr = MPIExecutor(custom_info={"mpi_runner": "mpich", "runner_name": find_mpiexec()})
    for role, binary in binaries.items():
        exctr.register_app(full_path=str(binary), app_name=role)
    n_in, n_out = len(cfg.inputs), len(cfg.outputs)
    sims = {role: {"args": list(getattr(cfg.sims, role).args), "ranks": getattr(cfg.sims, role).ranks}
            for role in ROLES.values()}
    n_sims = cfg.policy.checks_per_round + cfg.policy.max_inflight  # the most sims the generator keeps in flight
    ensemble = Ensemble(executor=exctr, libE_specs=LibeSpecs(
        nworkers=n_sims + 1, comms="local", disable_resource_manager=True, ensemble_dir_path=str(workdir / "ens")))
    ensemble.sim_specs = SimSpecs(
        sim_f=run_sim, inputs=["kind", "x", "seed"],
        outputs=[("y", float, (n_out,)), ("path", "U512"), ("launched_at", float)],
        user={"sims": sims, "workdir": str(workdir), "inputs": cfg.input_names,
              "lo": [i.lo for i in cfg.inputs], "hi": [i.hi for i in cfg.inputs]},
    )
    ensemble.gen_specs = GenSpecs(
        gen_f=surrogate_gen, inputs=[],
        persis_in=["sim_id", "kind", "x", "y", "pred", "version", "path"],
        outputs=[("kind", int), ("x", float, (n_in,)), ("seed", int), ("pred", float, (n_out,)), ("version", int)],
        user={"loop": str(loop_file), "overrides": overrides, "report": str(workdir / "gen.json"),
              "lazy_dynamo": lazy_dynamo},
    )
    # async_return: each result goes to the generator as it ends; active_recv: results reach it even
    # when it sent nothing since the last (it asks for sims only when the campaign needs them).
    ensemble.alloc_specs = AllocSpecs(alloc_f=only_persistent_gens, user={"async_return": True,
                                                                         "active_recv_gen": True})
    ensemble.exit_criteria = ExitCriteria(wallclock_max=600)
    return ensemble


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("loop", type=Path)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--lazy-dynamo", action="store_true",
                    help="install orchestrator.training.lazydynamo in the generator, as our workers do")
    args = ap.parse_args()
    overrides = [] if args.seed is None else [f"seed={args.seed}"]
    cfg = load_config(args.loop, overrides)
    args.workdir.mkdir(parents=True, exist_ok=True)
    (args.workdir / "gen.json").unlink(missing_ok=True)  # an earlier run's report would end this generator
    ensemble = build(cfg, args.loop.resolve(), overrides, args.workdir.resolve(), args.lazy_dynamo)
    ensemble.add_random_streams(seed=cfg.seed)
    H, _, _ = ensemble.run()
    report = json.loads((args.workdir / "gen.json").read_text())
    launched = H["launched_at"][H["launched_at"] > 0]
    report.update(first_sim_at=float(launched.min()) if launched.size else None, sims=int(launched.size))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
