"""What to do next, as pure functions of the campaign's state.

The campaign hands :func:`decide` a :class:`View` (counters and what is in
flight) and gets back actions. Nothing here touches processes, Dask or files,
so every decision is unit-tested as data.

The reference loop: check the current model at a query point; a check within
tolerance is a success; a failed check asks for fresh data and a retraining
(warm start). Beyond the reference: several checks per model version in
parallel, and (``pipeline``) generate sims kept in flight while a training runs
so the next round's data is ready when the training ends.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from orchestrator.certify import Plan, Verdict, checks_to_start, lower_bound, plan_bound, statement, verdict
from orchestrator.config import PolicyConfig, Sampling, TargetConfig
from orchestrator.sampling import window_around


class StopReason(enum.Enum):
    """Why a campaign ended. Only TARGET_MET is success; none of them is a crash."""

    TARGET_MET = "target_met"
    MAX_ROUNDS = "max_rounds"
    TIME_BUDGET = "time_budget"
    DATA_BUDGET = "data_budget"


@dataclass(frozen=True)
class View:
    """The campaign's state as the policy sees it."""

    model_version: int = 0
    """Trainings finished; 0 means no model yet."""
    training: bool = False
    """A training is in flight."""
    checks_inflight: int = 0
    """Checks of the current model in flight."""
    failed_current: bool = False
    """A check of the current model failed (so it needs retraining)."""
    generates_inflight: int = 0
    untrained_runs: int = 0
    """Accepted generate runs not yet used by a training."""
    successes: int = 0
    failures_current: int = 0
    """Failed checks of the current model version (the certified rule allows ``allowed_failures``)."""
    check_slots: int = 1
    """Check sims that fit side by side in the sim slots (the certified rule starts this many)."""
    data_points: int = 0
    elapsed_s: float = 0.0
    trainer_ready: bool = True
    """Dask workers are up (training waits for them; sims do not)."""
    checks_known: int = 0
    """Query points whose check sim already ran ahead of the model (prechecks)."""
    prechecks_inflight: int = 0


@dataclass(frozen=True)
class Stop:
    reason: StopReason


@dataclass(frozen=True)
class StartChecks:
    count: int


@dataclass(frozen=True)
class StartGenerates:
    count: int


@dataclass(frozen=True)
class StartTraining:
    pass


@dataclass(frozen=True)
class StartPrechecks:
    """Run check sims at fresh query points before the model they will check exists."""

    count: int


Action = Stop | StartChecks | StartGenerates | StartTraining | StartPrechecks


@functools.lru_cache(maxsize=64)
def _plan(coverage: float, confidence: float, allowed_failures: int) -> Plan:
    return Plan.of(coverage, confidence, allowed_failures)


def plan(target: TargetConfig) -> Plan | None:
    """The certified rule's plan for one model version (None under the count rule)."""
    if not target.certified:
        return None
    return _plan(target.certified_coverage, target.certified_confidence, target.allowed_failures)


def check_verdict(passed: int, failed: int, target: TargetConfig) -> Verdict:
    """Where the current version's checks stand: under the count rule a failure rejects it, and
    ``successes`` certify it (the count, not a statistical statement)."""
    p = plan(target)
    if p is None:
        p = Plan(checks=target.successes)
    return verdict(passed, failed, p)


def target_met(v: View, target: TargetConfig) -> bool:
    if target.certified:
        return check_verdict(v.successes, v.failures_current, target) is Verdict.CERTIFIED
    return v.successes >= target.successes


def stop_reason(v: View, target: TargetConfig, policy: PolicyConfig) -> StopReason | None:
    """The one place stop criteria are tested."""
    if target_met(v, target):
        return StopReason.TARGET_MET
    if target.time_budget_s is not None and v.elapsed_s >= target.time_budget_s:
        return StopReason.TIME_BUDGET
    needs_training = v.model_version == 0 or v.failed_current
    if needs_training and not v.training and v.model_version >= target.max_rounds:
        return StopReason.MAX_ROUNDS
    out_of_data = policy.max_data_points is not None and v.data_points >= policy.max_data_points
    if needs_training and not v.training and out_of_data and v.untrained_runs == 0 and v.generates_inflight == 0:
        return StopReason.DATA_BUDGET
    return None


def wants_training(v: View, target: TargetConfig, policy: PolicyConfig) -> bool:
    """Train when the model is missing or failed, and a round's worth of new data is in."""
    if v.training or not v.trainer_ready or v.untrained_runs == 0 or v.model_version >= target.max_rounds:
        return False
    if not (v.model_version == 0 or v.failed_current):
        return False
    return v.untrained_runs >= policy.generates_per_round or v.generates_inflight == 0


def generates_wanted(v: View, target: TargetConfig, policy: PolicyConfig) -> int:
    """How many generate sims to start now."""
    if policy.max_data_points is not None and v.data_points >= policy.max_data_points:
        return 0
    room = policy.max_inflight - v.generates_inflight
    if policy.pipeline and v.training:
        # Pipelined: keep generate sims running while the surrogate trains, up to
        # max_inflight runs ahead of it (in flight or done, not yet trained on); the
        # data feeds the next round if one is needed. Nothing for a round that cannot come.
        ahead = room - v.untrained_runs
        return max(0, ahead) if v.model_version + 1 < target.max_rounds else 0
    needed_now = (v.model_version == 0 or v.failed_current) and not v.training
    if not needed_now or v.model_version >= target.max_rounds:
        return 0
    missing = policy.generates_per_round - v.untrained_runs - v.generates_inflight
    return max(0, min(missing, room))


def checks_wanted(v: View, policy: PolicyConfig, target: TargetConfig | None = None) -> int:
    """How many checks of the current model to start now. The certified rule starts as many as
    the sim slots take side by side, never more than its plan can use."""
    if v.model_version == 0 or v.training or v.failed_current:
        return 0
    p = None if target is None else plan(target)
    if p is not None:
        room = max(0, v.check_slots - v.checks_inflight)
        return min(room, checks_to_start(v.successes, v.failures_current, v.checks_inflight, p))
    return max(0, policy.checks_per_round - v.checks_inflight)


def prechecks_wanted(v: View, policy: PolicyConfig) -> int:
    """Pipelined: while the next model is on its way, run its checks' sims already, so
    checking it takes only an evaluation the moment it exists."""
    # Before the first model: once its data is in (the sim slots are idle while the workers
    # finish starting) or the workers are up.
    first_on_its_way = v.model_version == 0 and (v.trainer_ready or v.untrained_runs > 0)
    if not (policy.pipeline and policy.precheck) or not (v.training or first_on_its_way):
        return 0
    return max(0, policy.checks_per_round - v.checks_known - v.prechecks_inflight)


def decide(v: View, target: TargetConfig, policy: PolicyConfig) -> list[Action]:
    """The next actions for this state; a Stop, if any, comes alone."""
    reason = stop_reason(v, target, policy)
    if reason is not None:
        return [Stop(reason)]
    actions: list[Action] = []
    if wants_training(v, target, policy):
        actions.append(StartTraining())
        # The new training changes what is needed: re-decide sims against it.
        v = View(**{**v.__dict__, "training": True, "untrained_runs": 0})
    n_gen = generates_wanted(v, target, policy)
    if n_gen:
        actions.append(StartGenerates(n_gen))
    n_chk = checks_wanted(v, policy, target)
    if n_chk:
        actions.append(StartChecks(n_chk))
    n_pre = prechecks_wanted(v, policy)
    if n_pre:
        actions.append(StartPrechecks(n_pre))
    return actions


def sampling_window(
    lo: NDArray[np.float64],
    hi: NDArray[np.float64],
    failed_points: list[list[float]],
    sampling: str,
    width: float,
    rng: np.random.Generator,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The box a generate sim draws from: the domain, or a window around a failed point."""
    if sampling != Sampling.NEAR_FAILURES or not failed_points:
        return lo, hi
    center = np.asarray(failed_points[int(rng.integers(len(failed_points)))], dtype=np.float64)
    return window_around(center, lo, hi, width)


@dataclass(frozen=True)
class Evidence:
    """What the checks of the final model version certify (every rule; in the summary)."""

    rule: str
    """``certified`` (target.coverage/confidence) or ``count`` (target.successes)."""
    certified_coverage: float
    """The exact one-sided lower bound of the share of the domain within tolerance."""
    confidence: float
    checks_used: int
    """Checks of the final model version that count (passed and failed)."""
    checks_failed: int
    checks_needed: int | None
    """The certified rule's plan: checks of one version when none may fail beyond allowed_failures."""
    certified_statement: str
    """What the evidence certifies, in words."""

    def to_json(self) -> dict[str, object]:
        return dict(self.__dict__)


def evidence(passed: int, failed: int, target: TargetConfig) -> Evidence:
    """What ``passed`` and ``failed`` checks of one version certify, in numbers and words."""
    used, conf = passed + failed, target.certified_confidence
    p = plan(target)
    bound = lower_bound(passed, used, conf) if used else 0.0
    if p is None:
        return Evidence("count", bound, conf, used, failed, None,
                        statement(passed, used, conf, target.tolerance, rule="count", domain=target.domain_words))
    if verdict(passed, failed, p) is Verdict.CERTIFIED:
        bound = plan_bound(p, conf)  # decided early, it certifies what the plan does, no more
    text = statement(passed, used, conf, target.tolerance, coverage=target.certified_coverage, bound=bound,
                     domain=target.domain_words)
    return Evidence("certified", bound, conf, used, failed, p.checks, text)


def describe_target(target: TargetConfig) -> str:
    """The stop rule in words (``validate``)."""
    p = plan(target)
    if p is None:
        return (f"count rule: {target.successes} successes within {target.tolerance:g}; "
                + statement(target.successes, target.successes, target.certified_confidence, target.tolerance,
                            rule="count", domain=target.domain_words))
    failing = "none" if not p.allowed_failures else f"at most {p.allowed_failures}"
    drawn = "uniform points" if target.check_points is None else f"points drawn by {target.check_points}"
    return (f"certified rule: one model version checked at up to {p.checks} fresh {drawn}, {failing} "
            f"failing; then "
            + statement(p.passes_needed, p.checks, target.certified_confidence, target.tolerance,
                        coverage=target.certified_coverage, bound=plan_bound(p, target.certified_confidence),
                        domain=target.domain_words))
