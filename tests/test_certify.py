"""The certified rule's arithmetic: exact binomial values, the plan, the sequential stop."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest

from orchestrator.certify import (
    Plan,
    Verdict,
    checks_needed,
    checks_to_start,
    lower_bound,
    statement,
    tail_at_least,
    verdict,
)


def exact_tail(x: int, n: int, p: Fraction) -> Fraction:
    """P(X >= x), X ~ Binomial(n, p), in exact rational arithmetic."""
    return sum((math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(x, n + 1)), Fraction(0))


def exact_needed(coverage: Fraction, alpha: Fraction, k: int) -> int:
    n = k + 1
    while exact_tail(n - k, n, coverage) > alpha:
        n += 1
    return n


@pytest.mark.parametrize(("k", "n"), [(0, 59), (1, 93), (2, 124)])
def test_checks_needed_for_95_95_are_wilks_numbers(k: int, n: int) -> None:
    assert checks_needed(0.95, 0.95, k) == n
    assert exact_needed(Fraction(95, 100), Fraction(5, 100), k) == n
    # n checks certify, n - 1 do not: the bound with k failures crosses 0.95 exactly there
    assert lower_bound(n - k, n, 0.95) >= 0.95 > lower_bound(n - 1 - k, n - 1, 0.95)


@pytest.mark.parametrize(("coverage", "confidence", "k"),
                         [(0.8, 0.8, 0), (0.9, 0.99, 0), (0.9, 0.9, 1), (0.99, 0.95, 2), (0.6, 0.7, 3)])
def test_checks_needed_matches_exact_rationals(coverage: float, confidence: float, k: int) -> None:
    exact = exact_needed(Fraction(coverage).limit_denominator(1000),
                         Fraction(1 - confidence).limit_denominator(1000), k)
    assert checks_needed(coverage, confidence, k) == exact


def test_lower_bound_all_passed_is_the_closed_form() -> None:
    assert lower_bound(5, 5, 0.95) == pytest.approx(0.05 ** (1 / 5), rel=1e-12)  # 0.549
    assert lower_bound(59, 59, 0.95) == pytest.approx(0.05 ** (1 / 59), rel=1e-12)
    assert lower_bound(0, 10, 0.95) == 0.0


@pytest.mark.parametrize(("passed", "n", "expected"), [
    (8, 10, 0.49309869893676),      # Beta(0.05; 8, 3), the textbook Clopper-Pearson value
    (92, 93, 0.950006021612011),    # one failure of 93
    (122, 124, 0.950101),           # two failures of 124
])
def test_lower_bound_matches_beta_quantiles(passed: int, n: int, expected: float) -> None:
    bound = lower_bound(passed, n, 0.95)
    assert bound == pytest.approx(expected, abs=2e-6)
    # the defining equation, checked in exact arithmetic around the bound
    alpha = Fraction(5, 100)
    assert exact_tail(passed, n, Fraction(bound - 1e-9)) < alpha < exact_tail(passed, n, Fraction(bound + 1e-9))


def test_tail_edges() -> None:
    assert tail_at_least(0, 5, 0.3) == 1.0
    assert tail_at_least(6, 5, 0.3) == 0.0
    assert tail_at_least(3, 5, 0.0) == 0.0
    assert tail_at_least(3, 5, 1.0) == 1.0
    assert tail_at_least(3, 5, 0.3) == pytest.approx(float(exact_tail(3, 5, Fraction(3, 10))), rel=1e-12)


@pytest.mark.parametrize("bad", [1.0, 0.0, 1.5, -0.1])
def test_coverage_and_confidence_outside_the_open_interval_are_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="coverage"):
        checks_needed(bad, 0.95)
    with pytest.raises(ValueError, match="confidence"):
        checks_needed(0.95, bad)
    with pytest.raises(ValueError, match="confidence"):
        lower_bound(3, 5, bad)


def test_bad_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="passed"):
        lower_bound(6, 5, 0.95)
    with pytest.raises(ValueError, match="allowed_failures"):
        checks_needed(0.95, 0.95, -1)
    with pytest.raises(ValueError, match="more than"):
        checks_needed(0.999999, 0.999999)


def test_sequential_stop_rejects_as_soon_as_the_version_cannot_pass() -> None:
    plan = Plan.of(0.95, 0.95, 1)  # 93 checks, one may fail
    assert (plan.checks, plan.passes_needed) == (93, 92)
    assert verdict(0, 0, plan) is Verdict.OPEN
    assert verdict(50, 1, plan) is Verdict.OPEN
    assert verdict(1, 2, plan) is Verdict.REJECTED  # after 3 checks, without waiting for 90 more
    assert verdict(92, 0, plan) is Verdict.CERTIFIED  # 92 passes: whatever the 93rd gives, <= 1 fails
    assert verdict(92, 1, plan) is Verdict.CERTIFIED
    zero = Plan.of(0.95, 0.95)
    assert verdict(58, 0, zero) is Verdict.OPEN
    assert verdict(58, 1, zero) is Verdict.REJECTED
    assert verdict(59, 0, zero) is Verdict.CERTIFIED


def test_checks_to_start_never_exceeds_the_plan() -> None:
    plan = Plan.of(0.95, 0.95, 1)
    assert checks_to_start(0, 0, 0, plan) == 92
    assert checks_to_start(0, 0, 12, plan) == 80
    assert checks_to_start(40, 1, 12, plan) == 40  # one failure: still 92 passes to get, 93 draws in all
    assert checks_to_start(40, 1, 52, plan) == 0
    assert checks_to_start(1, 2, 0, plan) == 0  # rejected
    assert checks_to_start(92, 0, 0, plan) == 0  # certified
    # at most plan.checks points ever drawn for one version, whatever the outcomes
    for failed in range(plan.allowed_failures + 1):
        drawn = (plan.passes_needed - 1) + failed + checks_to_start(plan.passes_needed - 1, failed, 0, plan)
        assert drawn <= plan.checks


def test_statements_say_what_the_evidence_certifies() -> None:
    assert statement(5, 5, 0.95, 0.05, rule="count").startswith(
        "5/5 successes: at 95% confidence, at least 54.9% of the domain within 0.05")
    assert "not a certified target" in statement(5, 5, 0.95, 0.05, rule="count")
    assert statement(59, 59, 0.95, 0.05, coverage=0.95) == (
        "59/59 checks passed: at 95% confidence, at least 95% of the domain within 0.05")
    assert "is not certified" in statement(30, 31, 0.95, 0.05, coverage=0.95)
    assert statement(0, 0, 0.95, 0.1).startswith("no check yet")
