"""Where generate sims evaluate: the sampling strategies of ``policy.sampling``.

A strategy is a function of one :class:`SampleRequest` (what is known: the candidate
pool with the ensemble's mean and spread there, the data so far, the points still
being simulated, a seeded RNG) returning the points to simulate, an array of shape
``(request.count, n_inputs)`` inside the domain. The built-in ones:

- ``uniform``: uniform over the domain;
- ``space-filling``: a Latin hypercube over the domain (every input's range cut
  into ``count`` strata, one point in each);
- ``near-failures``: uniform in a window around a failed check's point;
- ``ensemble``: the candidates where the ensemble members disagree most, picked
  greedily with a minimum separation so no two points sit on top of each other;
- ``module:function``: a user's own, found next to loop.yml (docs/sampling.md).

What the strategy returns is checked (:func:`validate_points`): the wrong shape,
NaN or a point outside the domain stops the campaign with one line naming the
strategy. Nothing here touches processes, Dask or files (the user's module is
imported once, at start); the :class:`Sampler` keeps the strategy's RNG, whose
state travels in state.json so a resumed campaign draws what it would have drawn.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from orchestrator.config import BUILTIN_SAMPLING, LoopConfig, PolicyConfig, Sampling
from orchestrator.errors import ConfigError, SamplingError
from orchestrator.userref import import_module

log = logging.getLogger(__name__)

Points = NDArray[np.float64]


@dataclass(frozen=True)
class SampleRequest:
    """Everything a strategy may use to choose ``count`` points. Arrays are float64."""

    count: int
    """Points wanted."""
    lo: Points
    """Lower ends of the domain, shape (n_inputs,)."""
    hi: Points
    """Upper ends of the domain, shape (n_inputs,)."""
    candidates: Points
    """A uniform random pool in the domain, shape (c, n_inputs); fresh after every training.
    Before the first model it is empty (shape (0, n_inputs))."""
    mean: Points | None
    """The ensemble's mean prediction at each candidate, shape (c, n_outputs); None before
    the first model."""
    spread: Points | None
    """The ensemble's spread (standard deviation over members) at each candidate, shape
    (c, n_outputs); zeros when ``policy.ensemble_size`` is 1; None before the first model."""
    x: Points
    """Inputs of every accepted data row so far, shape (n, n_inputs)."""
    y: Points
    """Outputs of those rows, shape (n, n_outputs)."""
    pending: Points
    """Points already chosen for generate runs still in flight, shape (p, n_inputs)."""
    failed: Points
    """Query points whose check failed, shape (k, n_inputs)."""
    rng: np.random.Generator
    """Seeded from loop.yml's seed; its state is saved with the campaign."""
    model_version: int = 0
    """Trainings finished (0: no model yet)."""


Strategy = Callable[[SampleRequest], ArrayLike]
"""A sampling strategy: points out, shape (request.count, n_inputs), inside the domain."""


# -- built-in strategies ----------------------------------------------------------------


def uniform(req: SampleRequest) -> Points:
    """Uniform over the domain."""
    return req.rng.uniform(req.lo, req.hi, size=(req.count, req.lo.size))


def latin_hypercube(rng: np.random.Generator, n: int, d: int) -> Points:
    """``n`` points in the unit cube, one in each of ``n`` strata of every axis."""
    strata = np.stack([rng.permutation(n) for _ in range(d)], axis=1)
    return (strata + rng.uniform(size=(n, d))) / n


def space_filling(req: SampleRequest) -> Points:
    """A Latin hypercube over the domain."""
    return req.lo + latin_hypercube(req.rng, req.count, req.lo.size) * (req.hi - req.lo)


def near_failures(req: SampleRequest, width: float = 0.25) -> Points:
    """Uniform in a window (``width`` of each input's range) around failed points; uniform without any."""
    if req.failed.shape[0] == 0:
        return uniform(req)
    centres = req.failed[req.rng.integers(req.failed.shape[0], size=req.count)]
    wlo, _ = window_around(centres, req.lo, req.hi, width)
    return wlo + req.rng.uniform(size=centres.shape) * ((req.hi - req.lo) * width)


def window_around(centre: Points, lo: Points, hi: Points, width: float) -> tuple[Points, Points]:
    """The box ``width`` of each input's range wide around ``centre`` (one point, or one per row),
    shifted to lie inside the domain [lo, hi]."""
    half = (hi - lo) * width / 2
    wlo = np.clip(centre - half, lo, hi - 2 * half)
    return wlo, wlo + 2 * half


def disagreement(req: SampleRequest) -> Points:
    """Each candidate's score: its spread summed over outputs, each output scaled by the data's spread."""
    assert req.spread is not None
    scale = req.y.std(axis=0) if req.y.shape[0] > 1 else np.ones(req.spread.shape[1])
    scale = np.where(scale > 0, scale, 1.0)
    score: Points = (req.spread / scale).sum(axis=1)
    return score


def greedy_separated(
    unit: Points, score: Points, count: int, taken: Points, min_separation: float
) -> NDArray[np.intp]:
    """Indices of up to ``count`` rows of ``unit`` (points in the unit cube), best ``score``
    first, none closer than ``min_separation`` to another chosen one or to ``taken``."""
    chosen: list[int] = []
    kept = [taken] if taken.size else []
    for i in np.argsort(-score, kind="stable"):
        if len(chosen) == count:
            break
        if kept:
            near = np.concatenate(kept)
            if np.min(np.linalg.norm(near - unit[i], axis=1)) < min_separation:
                continue
        chosen.append(int(i))
        kept.append(unit[i : i + 1])
    return np.asarray(chosen, dtype=np.intp)


def ensemble(req: SampleRequest, min_separation: float = 0.02) -> Points:
    """Where the members disagree most, at least ``min_separation`` apart (unit-cube units).

    Before the first model: a Latin hypercube. When too few candidates are far enough
    apart, the rest are the most-disputed candidates not yet chosen.
    """
    if req.spread is None or req.candidates.shape[0] == 0:
        return space_filling(req)
    span = req.hi - req.lo
    unit = (req.candidates - req.lo) / span
    score = disagreement(req)
    taken = (req.pending - req.lo) / span
    idx = greedy_separated(unit, score, req.count, taken, min_separation)
    if idx.size < req.count:
        rest = np.setdiff1d(np.argsort(-score, kind="stable"), idx, assume_unique=True)
        idx = np.concatenate([idx, rest[: req.count - idx.size]])
    if idx.size < req.count:  # a pool smaller than the batch
        extra = uniform(SampleRequest(**{**req.__dict__, "count": req.count - idx.size}))
        return np.concatenate([req.candidates[idx], extra])
    picked: Points = req.candidates[idx]
    return picked


# -- choosing a strategy ------------------------------------------------------------------


def builtin(name: str, policy: PolicyConfig) -> Strategy:
    """The built-in strategy called ``name``."""
    table: dict[Sampling, Strategy] = {
        Sampling.UNIFORM: uniform,
        Sampling.SPACE_FILLING: space_filling,
        Sampling.NEAR_FAILURES: partial(near_failures, width=policy.near_failures_width),
        Sampling.ENSEMBLE: partial(ensemble, min_separation=policy.min_separation),
    }
    return table[Sampling(name)]


def _user_function(key: str, spec: str, search: Sequence[Path]) -> Callable[..., Any]:
    """The function ``module:function`` names for loop.yml's ``key``, looking next to loop.yml (``search``)
    first; a ConfigError naming the key when it cannot be imported or is not a function."""
    module_name, _, attr = spec.partition(":")
    try:
        module = import_module(module_name, search)
    except ImportError as exc:
        where = ", ".join(str(p) for p in search) or "the Python path"
        raise ConfigError(f"{key} {spec!r}: cannot import {module_name!r} (looked in {where}): "
                          f"{exc}; put {module_name}.py next to loop.yml") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{key} {spec!r}: {module_name} has no function {attr!r}")
    return fn  # type: ignore[no-any-return]


def load_user_strategy(spec: str, search: Sequence[Path]) -> Strategy:
    """Import ``module:function``, looking next to loop.yml (``search``) first."""
    strategy: Strategy = _user_function("policy.sampling", spec, search)
    return strategy


CheckDraw = Callable[[np.random.Generator], list[float]]
"""One check point from the campaign's generator (``target.check_points``)."""


def check_drawer(cfg: LoopConfig, search: Sequence[Path] = ()) -> CheckDraw | None:
    """``target.check_points``'s function, wrapped so each point it returns is checked (None: uniform draws)."""
    ref = cfg.target.check_points
    if ref is None:
        return None
    what = f"target.check_points {ref!r}"
    fn = _user_function("target.check_points", ref, search)
    lo = np.array([i.lo for i in cfg.inputs], dtype=np.float64)
    hi = np.array([i.hi for i in cfg.inputs], dtype=np.float64)

    def draw(rng: np.random.Generator) -> list[float]:
        try:
            raw = fn(rng, lo.copy(), hi.copy())
        except Exception as exc:  # a user's code: one line naming it, the campaign stops
            raise SamplingError(f"{what} raised {type(exc).__name__}: {exc}") from exc
        try:
            point = np.asarray(raw, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise SamplingError(f"{what} returned {type(raw).__name__}, not a point: {exc}") from exc
        if point.shape != lo.shape:
            raise SamplingError(f"{what} returned shape {point.shape}; expected one point of {lo.size} input(s)")
        if not (np.all(np.isfinite(point)) and np.all(point >= lo) and np.all(point <= hi)):
            raise SamplingError(f"{what} returned {[float(v) for v in point]}, not a point inside the domain "
                                "(each input within its lo..hi)")
        return [float(v) for v in point]

    return draw


def resolve(cfg: LoopConfig, search: Sequence[Path] = ()) -> Strategy:
    """The strategy loop.yml names (a user's module is imported here, once)."""
    name = cfg.policy.sampling
    if ":" in name:
        return load_user_strategy(name, search)
    return builtin(name, cfg.policy)


def validate_points(raw: Any, req: SampleRequest, name: str) -> Points:
    """The strategy's output as a (count, n_inputs) float64 array inside the domain, or a SamplingError."""
    what = f"sampling strategy {name!r}"
    d = req.lo.size
    try:
        pts = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SamplingError(f"{what} returned {type(raw).__name__}, not an array of points: {exc}") from exc
    if pts.ndim == 1 and d == 1:
        pts = pts.reshape(-1, 1)
    if pts.shape != (req.count, d):
        raise SamplingError(f"{what} returned an array of shape {pts.shape}; expected ({req.count}, {d}) "
                            f"({req.count} points of {d} input(s))")
    if not np.all(np.isfinite(pts)):
        raise SamplingError(f"{what} returned NaN or infinite coordinates")
    outside = np.any((pts < req.lo) | (pts > req.hi), axis=1)
    if outside.any():
        first = pts[int(np.argmax(outside))]
        raise SamplingError(f"{what} returned {int(outside.sum())} point(s) outside the domain, e.g. "
                            f"{[float(v) for v in first]}; each input must stay within its lo..hi")
    return pts


@dataclass
class Scores:
    """The ensemble evaluated on a candidate pool, for one model version."""

    version: int
    candidates: Points
    mean: Points
    spread: Points


@dataclass
class Sampler:
    """The campaign's strategy with its RNG and what it knows (pure: no I/O)."""

    cfg: LoopConfig
    strategy: Strategy
    rng: np.random.Generator
    scores: Scores | None = None
    pending: dict[str, Points] = field(default_factory=dict)
    """Points of generate runs in flight, by a key the campaign chooses."""

    @classmethod
    def create(cls, cfg: LoopConfig, strategy: Strategy | None = None, rng_state: dict[str, Any] | None = None
               ) -> Sampler:
        rng = np.random.default_rng([cfg.seed, 14])
        if rng_state:
            rng.bit_generator.state = rng_state
        return cls(cfg, strategy or resolve(cfg), rng)

    @property
    def name(self) -> str:
        return self.cfg.policy.sampling

    @property
    def lo(self) -> Points:
        return np.array([i.lo for i in self.cfg.inputs], dtype=np.float64)

    @property
    def hi(self) -> Points:
        return np.array([i.hi for i in self.cfg.inputs], dtype=np.float64)

    @property
    def wants_scores(self) -> bool:
        """The strategy uses the ensemble on the candidate pool (ensemble, or a user's own)."""
        return self.name == Sampling.ENSEMBLE or ":" in self.name

    def rng_state(self) -> dict[str, Any]:
        return dict(self.rng.bit_generator.state)

    def draw_candidates(self) -> Points:
        """A fresh candidate pool for the next model version."""
        return self.rng.uniform(self.lo, self.hi, size=(self.cfg.policy.candidates, self.lo.size))

    def request(self, count: int, x: Points, y: Points, failed: Sequence[Sequence[float]], version: int
                ) -> SampleRequest:
        d = self.lo.size
        s = self.scores
        pending = np.concatenate(list(self.pending.values())) if self.pending else np.empty((0, d))
        return SampleRequest(
            count=count, lo=self.lo, hi=self.hi,
            candidates=s.candidates if s else np.empty((0, d)), mean=s.mean if s else None,
            spread=s.spread if s else None, x=x, y=y, pending=pending,
            failed=np.asarray(failed, dtype=np.float64).reshape(-1, d), rng=self.rng, model_version=version,
        )

    def choose(self, count: int, x: Points, y: Points, failed: Sequence[Sequence[float]], version: int) -> Points:
        """``count`` points from the strategy (the first round's design before any model), checked."""
        req = self.request(count, x, y, failed, version)
        if version == 0 and self.cfg.policy.first_round == Sampling.SPACE_FILLING.value:
            return validate_points(space_filling(req), req, Sampling.SPACE_FILLING)
        try:
            raw = self.strategy(req)
        except Exception as exc:  # a user's code: one line naming it, the campaign stops
            raise SamplingError(f"sampling strategy {self.name!r} raised {type(exc).__name__}: {exc}") from exc
        return validate_points(raw, req, self.name)

    def window(self, x: Points, y: Points, failed: Sequence[Sequence[float]], version: int
               ) -> tuple[Points, Points]:
        """Window mode (the generate sim draws its own points) for strategies other than
        uniform and near-failures: a window of ``near_failures_width`` around the strategy's
        first point (the whole domain for ``space-filling`` and before any model)."""
        if self.name == Sampling.SPACE_FILLING or version == 0:
            return self.lo, self.hi
        centre = self.choose(1, x, y, failed, version)[0]
        return window_around(centre, self.lo, self.hi, self.cfg.policy.near_failures_width)


def chooses(cfg: LoopConfig) -> bool:
    """The strategy (not the legacy window draw) decides where a generate run evaluates:
    the sim takes a ``{points_file}``, or the strategy is neither uniform nor near-failures."""
    name = cfg.policy.sampling
    return cfg.chosen_points or name not in BUILTIN_SAMPLING or not Sampling(name).windowed
