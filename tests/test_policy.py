"""The policy, as pure data in and actions out."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from orchestrator.config import PolicyConfig, TargetConfig
from orchestrator.policy import (
    StartChecks,
    StartGenerates,
    StartPrechecks,
    StartTraining,
    Stop,
    StopReason,
    View,
    decide,
    sampling_window,
)

T = TargetConfig(tolerance=0.05, successes=5, max_rounds=4, time_budget_s=100)
SEQ = PolicyConfig(pipeline=False, max_inflight=1)
PIPE = PolicyConfig(pipeline=True, max_inflight=4, generates_per_round=2)


def test_fresh_campaign_generates_first() -> None:
    assert decide(View(), T, SEQ) == [StartGenerates(1)]


def test_no_double_generate_while_one_in_flight() -> None:
    assert decide(View(generates_inflight=1), T, SEQ) == []


def test_data_in_trains_and_sequential_mode_waits() -> None:
    assert decide(View(untrained_runs=1), T, SEQ) == [StartTraining()]


def test_pipelined_mode_prefetches_next_rounds_data_while_training() -> None:
    acts = decide(View(untrained_runs=2, checks_known=1), T, PIPE)
    assert acts == [StartTraining(), StartGenerates(4)]
    # and keeps up to max_inflight runs ahead of the training while it runs
    training = View(model_version=1, training=True, generates_inflight=1, checks_known=1)
    assert decide(replace(training, untrained_runs=1), T, PIPE) == [StartGenerates(2)]
    assert decide(replace(training, untrained_runs=3), T, PIPE) == []
    # bounded by the data budget
    budget = PolicyConfig(pipeline=True, max_inflight=4, max_data_points=100)
    assert decide(View(model_version=1, training=True, data_points=100, checks_known=1), T, budget) == []


def test_pipelined_mode_waits_for_a_rounds_worth_of_data() -> None:
    assert decide(View(untrained_runs=1, generates_inflight=1, checks_known=1), T, PIPE) == []


def test_trained_model_gets_checked() -> None:
    assert decide(View(model_version=1), T, PolicyConfig(checks_per_round=3)) == [StartChecks(3)]
    assert decide(View(model_version=1, checks_inflight=2), T, PolicyConfig(checks_per_round=3)) == [StartChecks(1)]


def test_no_checks_during_training() -> None:
    assert StartChecks(1) not in decide(View(model_version=1, training=True), T, SEQ)


def test_failed_check_asks_for_data_then_retrains() -> None:
    v = View(model_version=1, failed_current=True)
    assert decide(v, T, SEQ) == [StartGenerates(1)]
    v = View(model_version=1, failed_current=True, untrained_runs=1)
    assert decide(v, T, SEQ) == [StartTraining()]


def test_prefetched_data_trains_at_once_after_a_failure() -> None:
    v = View(model_version=1, failed_current=True, untrained_runs=2)
    assert decide(v, T, PIPE)[0] == StartTraining()


@pytest.mark.parametrize(
    ("view", "reason"),
    [
        (View(model_version=1, successes=5), StopReason.TARGET_MET),
        (View(model_version=1, successes=1, elapsed_s=100.0), StopReason.TIME_BUDGET),
        (View(model_version=4, failed_current=True), StopReason.MAX_ROUNDS),
    ],
)
def test_stop_criteria(view: View, reason: StopReason) -> None:
    assert decide(view, T, SEQ) == [Stop(reason)]


def test_target_met_wins_over_everything_in_flight() -> None:
    v = View(model_version=2, successes=5, training=True, generates_inflight=3, checks_inflight=1)
    assert decide(v, T, PIPE) == [Stop(StopReason.TARGET_MET)]


def test_last_round_model_is_still_checked() -> None:
    # max_rounds reached but the model has not failed: keep checking it
    assert decide(View(model_version=4), T, SEQ) == [StartChecks(1)]


def test_last_round_training_does_not_prefetch() -> None:
    v = View(model_version=3, training=True, checks_known=1)
    assert decide(v, T, PIPE) == []


def test_data_budget() -> None:
    p = PolicyConfig(max_data_points=512, pipeline=False)
    assert decide(View(model_version=1, failed_current=True, data_points=512), T, p) == [
        Stop(StopReason.DATA_BUDGET)
    ]
    # untrained data left: train it first
    assert decide(View(model_version=1, failed_current=True, data_points=512, untrained_runs=1), T, p) == [
        StartTraining()
    ]


def test_uniform_sampling_is_the_domain() -> None:
    lo, hi = np.array([-1.0]), np.array([1.0])
    wlo, whi = sampling_window(lo, hi, [[0.5]], "uniform", 0.25, np.random.default_rng(0))
    assert (wlo, whi) == (lo, hi)


def test_near_failures_window_is_inside_the_domain() -> None:
    lo, hi = np.array([-1.0, 0.0]), np.array([1.0, 10.0])
    rng = np.random.default_rng(0)
    for point in ([0.0, 5.0], [0.99, 9.9], [-1.0, 0.0]):
        wlo, whi = sampling_window(lo, hi, [point], "near-failures", 0.25, rng)
        assert np.all(wlo >= lo) and np.all(whi <= hi)
        assert np.allclose(whi - wlo, (hi - lo) * 0.25)
        assert np.all(wlo <= point) and np.all(np.array(point) <= whi)


def test_training_waits_for_workers_but_sims_do_not() -> None:
    v = View(untrained_runs=1, trainer_ready=False, checks_known=1)
    assert decide(v, T, PIPE) == [StartGenerates(1)]
    assert decide(View(untrained_runs=2, trainer_ready=False, checks_known=1), T, PIPE) == []


def test_prechecks_run_the_next_models_check_sims_while_it_trains() -> None:
    p = PolicyConfig(pipeline=True, precheck=True, checks_per_round=3, max_inflight=1)
    assert StartPrechecks(3) in decide(View(model_version=1, training=True), T, p)
    assert StartPrechecks(3) not in decide(View(model_version=1, training=True), T, PolicyConfig(checks_per_round=3))
    assert StartPrechecks(1) in decide(View(model_version=1, training=True, checks_known=1, prechecks_inflight=1),
                                       T, p)
    assert not any(isinstance(a, StartPrechecks) for a in decide(View(model_version=1, training=True,
                                                                     checks_known=3), T, p))
    # before the first model: once its data waits for the workers (the sim slots are idle), not before
    assert StartPrechecks(3) in decide(View(untrained_runs=1, trainer_ready=False), T, p)
    assert not any(isinstance(a, StartPrechecks) for a in decide(View(trainer_ready=False, generates_inflight=1),
                                                                 T, p))
    # not while a trained model is being checked, and never in sequential mode
    assert not any(isinstance(a, StartPrechecks) for a in decide(View(model_version=1), T, p))
    assert not any(isinstance(a, StartPrechecks) for a in decide(View(model_version=1, training=True), T, SEQ))


CERT = TargetConfig(tolerance=0.05, coverage=0.95, confidence=0.95, max_rounds=4)


def test_certified_rule_starts_as_many_checks_as_slots_allow_up_to_its_plan() -> None:
    p = PolicyConfig(checks_per_round=1)
    assert decide(View(model_version=1, check_slots=12), CERT, p) == [StartChecks(12)]
    assert decide(View(model_version=1, check_slots=12, checks_inflight=12), CERT, p) == []
    # 59 needed, 50 passed, 4 in flight: 5 more, though 8 slots are free
    assert decide(View(model_version=1, check_slots=12, checks_inflight=4, successes=50), CERT, p) == [StartChecks(5)]
    assert not any(isinstance(a, StartChecks) for a in decide(View(model_version=1, check_slots=12, training=True),
                                                              CERT, p))


def test_certified_rule_meets_the_target_at_the_plans_passes_not_at_successes() -> None:
    p = PolicyConfig()
    assert decide(View(model_version=1, successes=58, check_slots=4), CERT, p) == [StartChecks(1)]
    assert decide(View(model_version=1, successes=59), CERT, p) == [Stop(StopReason.TARGET_MET)]
    one = CERT.model_copy(update={"allowed_failures": 1})  # 93 checks, one may fail
    assert decide(View(model_version=1, successes=92, failures_current=1), one, p) == [Stop(StopReason.TARGET_MET)]
    assert decide(View(model_version=1, successes=91, failures_current=1), one, p) != [Stop(StopReason.TARGET_MET)]


def test_a_rejected_version_starts_no_more_checks_and_goes_back_to_training() -> None:
    p = PolicyConfig(pipeline=False)
    rejected = View(model_version=1, successes=3, failures_current=1, failed_current=True, check_slots=12,
                    untrained_runs=1)
    assert decide(rejected, CERT, p) == [StartTraining()]


def test_evidence_states_what_each_rule_certifies() -> None:
    from orchestrator.policy import evidence

    count = evidence(5, 0, T)
    assert (count.rule, count.checks_used, count.checks_failed, count.checks_needed) == ("count", 5, 0, None)
    assert count.certified_coverage == pytest.approx(0.05 ** 0.2)
    assert count.certified_statement.startswith(
        "5/5 successes: at 95% confidence, at least 54.9% of the domain within 0.05")
    cert = evidence(59, 0, CERT)
    assert (cert.rule, cert.checks_needed, cert.confidence) == ("certified", 59, 0.95)
    assert cert.certified_coverage >= 0.95
    # decided early (no failure where two were allowed): what the plan certifies, not the 122/122 bound
    early = evidence(122, 0, CERT.model_copy(update={"allowed_failures": 2}))
    assert 0.95 <= early.certified_coverage < 0.951
    assert "not certified" in evidence(40, 1, CERT).certified_statement
