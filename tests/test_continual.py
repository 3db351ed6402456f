"""Continual mode's pure decisions: the drift rule, the recent-data window, champion/challenger."""

from __future__ import annotations

import pytest

from orchestrator.config import ContinualConfig
from orchestrator.loop import continual as ct


def cfg(**kw: object) -> ContinualConfig:
    return ContinualConfig.model_validate({"max_rounds": 5, **kw})


def test_drift_needs_a_full_window_at_the_failure_rate() -> None:
    c = cfg(drift_window=4, drift_failure_rate=0.5)
    assert not ct.drift_detected([True, True, True], c)  # not 4 checks yet
    assert not ct.drift_detected([False, False, False, True], c)
    assert ct.drift_detected([False, False, True, True], c)
    assert ct.drift_detected([True, True, True, True, False, False, True, True], c)  # only the last 4 count
    assert not ct.drift_detected([True, True, True, False, False, False], c)


def files(*spec: tuple[int, float]) -> list[ct.DataFile]:
    return [ct.DataFile(f"data/{i}.npy", rows, t) for i, (rows, t) in enumerate(spec)]


def test_window_by_rows_takes_the_newest_whole_files() -> None:
    fs = files((256, 1.0), (128, 2.0), (64, 3.0), (64, 4.0))
    assert [f.path for f in ct.recent_window(fs, cfg(window_rows=128), now=5.0)] == ["data/2.npy", "data/3.npy"]
    assert [f.path for f in ct.recent_window(fs, cfg(window_rows=10), now=5.0)] == ["data/3.npy"]  # newest always
    assert len(ct.recent_window(fs, cfg(), now=5.0)) == 4  # no window: all data


def test_window_by_age() -> None:
    fs = files((256, 1.0), (128, 2.0), (64, 3.0), (64, 4.0))
    assert [f.path for f in ct.recent_window(fs, cfg(window_s=2.5), now=5.0)] == ["data/2.npy", "data/3.npy"]
    assert [f.path for f in ct.recent_window(fs, cfg(window_s=10, window_rows=100), now=5.0)] == ["data/3.npy"]


def test_challenger_promoted_only_when_it_beats_the_champion_on_the_same_checks() -> None:
    c = cfg()
    assert ct.verdict([0.5, 0.6], [0.01, 0.02], c) is ct.Verdict.PROMOTED
    assert ct.verdict([0.01, 0.02], [0.8, 0.8], c) is ct.Verdict.KEPT
    assert ct.verdict([0.1, 0.1], [0.1, 0.1], c) is ct.Verdict.KEPT  # a tie keeps the champion
    assert ct.verdict([0.1, 0.1], [0.095, 0.095], cfg(promote_margin=0.1)) is ct.Verdict.KEPT
    assert ct.verdict([0.1], [0.01, 0.01], c) is ct.Verdict.KEPT  # not the same checks


def test_phase_ends_at_its_rounds_or_budget_but_not_with_a_challenger_pending() -> None:
    s = ct.ContinualState(active=True, rounds_done=5, started_elapsed_s=10.0)
    assert ct.phase_over(s, cfg(max_rounds=5), elapsed_s=11.0)
    s.challenger_model = 3
    assert not ct.phase_over(s, cfg(max_rounds=5), elapsed_s=11.0)
    assert ct.phase_over(s, ContinualConfig(time_budget_s=5), elapsed_s=15.0)


def test_continual_needs_an_end_besides_a_signal() -> None:
    with pytest.raises(ValueError, match="max_rounds or time_budget_s"):
        ContinualConfig(enabled=True)


def test_state_round_trips_through_json() -> None:
    s = ct.ContinualState(active=True, clock=3, champion_model=2, recent_failures=[True, False],
                          data=[{"path": "data/a.npy", "rows": 5, "t": 1.0}])
    again = ct.ContinualState.from_json(s.to_json())
    assert again == s and again.data_files() == [ct.DataFile("data/a.npy", 5, 1.0)]
