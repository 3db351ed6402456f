"""What checks certify about a model: exact binomial bounds, pure functions, no scipy.

A check draws a point from the domain, runs the check sim there and tells whether the
surrogate is within tolerance of the truth. Checks of **one model version** at fresh,
independent points drawn from a distribution are Bernoulli trials whose success
probability is the share of that distribution within tolerance ("coverage"). After
``passed`` successes out of ``n`` checks, the exact one-sided Clopper-Pearson bound
:func:`lower_bound` is a coverage the model reaches with probability ``confidence``.

The certified rule fixes, before any check, a plan of ``n`` checks allowing ``k``
failures (:func:`checks_needed`: the fewest checks whose bound reaches ``coverage``
when at most ``k`` fail). The plan is decided as soon as its outcome is known
(:func:`verdict`): more than ``k`` failures reject the version at once (it cannot pass
any more), ``n - k`` passes certify it. Deciding early this way is exactly the fixed
plan's decision (the first ``n - k`` passes come before the ``k + 1``-th failure if and
only if at most ``k`` of the ``n`` checks fail), so the early stop costs no confidence.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

MAX_CHECKS = 1_000_000
"""The most checks a plan may need; past it a coverage/confidence pair is refused."""


def _log_pmf(k: int, n: int, p: float) -> float:
    """log P(X = k) for X ~ Binomial(n, p), 0 < p < 1."""
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
            + k * math.log(p) + (n - k) * math.log1p(-p))


def tail_at_least(x: int, n: int, p: float) -> float:
    """P(X >= x) for X ~ Binomial(n, p), exactly (a sum of the pmf)."""
    if x <= 0:
        return 1.0
    if x > n:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    # the shorter side of the sum, for accuracy and cost
    if x > n // 2:
        return min(1.0, math.fsum(math.exp(_log_pmf(k, n, p)) for k in range(x, n + 1)))
    return max(0.0, 1.0 - math.fsum(math.exp(_log_pmf(k, n, p)) for k in range(0, x)))


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1 (exclusive), got {confidence}")


def lower_bound(passed: int, n: int, confidence: float) -> float:
    """The one-sided Clopper-Pearson lower bound of the share within tolerance.

    The smallest coverage ``p`` that ``passed`` successes in ``n`` checks do not reject at
    level ``1 - confidence``: P(X >= passed | n, p) = 1 - confidence. 0 without a success;
    ``(1 - confidence) ** (1 / n)`` when every check passed.
    """
    _check_confidence(confidence)
    if not 0 <= passed <= n:
        raise ValueError(f"passed must be between 0 and n={n}, got {passed}")
    alpha = 1.0 - confidence
    if passed == 0:
        return 0.0
    if passed == n:
        return float(alpha ** (1.0 / n))
    lo, hi = 0.0, 1.0
    for _ in range(200):  # the tail grows with p: bisection to machine precision
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        if tail_at_least(passed, n, mid) < alpha:
            lo = mid
        else:
            hi = mid
    return lo


def checks_needed(coverage: float, confidence: float, allowed_failures: int = 0) -> int:
    """The fewest checks whose bound reaches ``coverage`` at ``confidence`` when at most
    ``allowed_failures`` of them fail (59 for 95%/95% with none failing)."""
    _check_confidence(confidence)
    if not 0.0 < coverage < 1.0:
        raise ValueError(f"coverage must be between 0 and 1 (exclusive), got {coverage}")
    if allowed_failures < 0:
        raise ValueError(f"allowed_failures must be >= 0, got {allowed_failures}")
    alpha = 1.0 - confidence
    k = allowed_failures
    # lower_bound(n - k, n) >= coverage  <=>  P(X >= n - k | n, coverage) <= alpha
    # k = 0 has a closed form; the exact test below guards it against rounding
    n = max(1, math.ceil(math.log(alpha) / math.log(coverage)) - 1) if k == 0 else k + 1
    while tail_at_least(n - k, n, coverage) > alpha:
        n += 1
        if n > MAX_CHECKS:
            raise ValueError(f"coverage {coverage} at confidence {confidence} needs more than {MAX_CHECKS} checks")
    return n


class Verdict(enum.Enum):
    """Where a version's checks stand against its plan."""

    OPEN = "open"
    CERTIFIED = "certified"
    REJECTED = "rejected"
    """More failures than the plan allows: the version can no longer pass."""


@dataclass(frozen=True)
class Plan:
    """The checks one model version gets: ``checks`` at most, ``allowed_failures`` of them may fail."""

    checks: int
    allowed_failures: int = 0

    @classmethod
    def of(cls, coverage: float, confidence: float, allowed_failures: int = 0) -> Plan:
        return cls(checks_needed(coverage, confidence, allowed_failures), allowed_failures)

    @property
    def passes_needed(self) -> int:
        return self.checks - self.allowed_failures


def verdict(passed: int, failed: int, plan: Plan) -> Verdict:
    """The sequential test: rejected as soon as it cannot pass, certified as soon as it has."""
    if failed > plan.allowed_failures:
        return Verdict.REJECTED
    if passed >= plan.passes_needed:
        return Verdict.CERTIFIED
    return Verdict.OPEN


def checks_to_start(passed: int, failed: int, inflight: int, plan: Plan) -> int:
    """Checks still worth starting: enough to decide the plan if every one in flight passes,
    never more than the plan's total (so the decision is the fixed plan's)."""
    if verdict(passed, failed, plan) is not Verdict.OPEN:
        return 0
    return max(0, min(plan.passes_needed - passed, plan.checks - passed - failed) - inflight)


def _pct(share: float) -> str:
    """A share as a percentage, rounded down to 0.1% (a bound is never overstated)."""
    return f"{math.floor(share * 1000 + 1e-9) / 10:g}%"


def plan_bound(plan: Plan, confidence: float) -> float:
    """What a plan certifies once decided CERTIFIED: the bound of its worst passing outcome
    (a plan decided early, with fewer failures than allowed, certifies no more than that)."""
    return lower_bound(plan.passes_needed, plan.checks, confidence)


def statement(passed: int, used: int, confidence: float, tolerance: float, *, rule: str = "certified",
              coverage: float | None = None, bound: float | None = None, domain: str = "the domain") -> str:
    """What the evidence certifies, in a user's words.

    ``rule`` is ``certified`` (the coverage/confidence rule, ``coverage`` its target) or ``count``
    (the successes rule, whose count is evidence, not a guarantee). ``bound``: the coverage
    certified, when not the Clopper-Pearson bound of ``passed`` in ``used`` (:func:`plan_bound`).
    ``domain``: what the checks were drawn over, in words.
    """
    if used == 0:
        return f"no check yet: nothing is certified about the share of {domain} within {tolerance:g}"
    if bound is None:
        bound = lower_bound(passed, used, confidence)
    word = "successes" if rule == "count" else "checks passed"
    text = (f"{passed}/{used} {word}: at {_pct(confidence)} confidence, at least {_pct(bound)} of {domain} "
            f"within {tolerance:g}")
    if rule == "count":
        return text + " (a count of successes, not a certified target)"
    if coverage is not None and bound < coverage:
        return text + f" (the target {_pct(coverage)} is not certified)"
    return text
