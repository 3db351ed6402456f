"""What the orchestrator may run on: the Slurm allocation, or the local box.

Pure parsing and bookkeeping, no Slurm query at import time:

* ``expand_nodelist`` / ``expand_cpus_per_node`` parse Slurm's compressed
  ``SLURM_JOB_NODELIST`` (``n[1-3,7]``) and ``SLURM_JOB_CPUS_PER_NODE``
  (``8(x2),4``) forms.
* ``Allocation.detect()`` builds the node list from the Slurm job environment,
  or describes the local machine when not inside a Slurm job.
* ``SlotPool`` hands out CPU slots per node to concurrent launches, never
  oversubscribing, with an asyncio ``acquire`` that waits for a ``release``.

A ``SlotPool`` is not thread-safe: use it from one thread (the event loop's).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)

__all__ = [
    "Allocation",
    "Node",
    "Placement",
    "SlotPool",
    "expand_cpus_per_node",
    "expand_nodelist",
]

_RANGE_RE = re.compile(r"(\d+)(?:-(\d+))?")
_CPUS_ITEM_RE = re.compile(r"(\d+)(?:\(x(\d+)\))?")


# --------------------------------------------------------------------------
# Slurm hostlist expressions


def _split_top_level(expr: str) -> list[str]:
    """Split ``expr`` on commas/whitespace that are outside ``[...]``."""
    items: list[str] = []
    depth = 0
    current: list[str] = []
    for ch in expr:
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested '[' in node list {expr!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in node list {expr!r}")
        if depth == 0 and (ch == "," or ch.isspace()):
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth != 0:
        raise ValueError(f"unbalanced '[' in node list {expr!r}")
    items.append("".join(current))
    return [item for item in items if item]


def _expand_ranges(body: str, expr: str) -> list[str]:
    """``"1-3,7"`` -> ``["1", "2", "3", "7"]``, keeping the low bound's zero padding."""
    values: list[str] = []
    for part in body.split(","):
        match = _RANGE_RE.fullmatch(part.strip())
        if match is None:
            raise ValueError(f"invalid range {part!r} in node list {expr!r}")
        lo_text, hi_text = match.group(1), match.group(2)
        lo = int(lo_text)
        hi = int(hi_text) if hi_text is not None else lo
        if hi < lo:
            raise ValueError(f"descending range {part!r} in node list {expr!r}")
        width = len(lo_text)
        values.extend(str(i).zfill(width) for i in range(lo, hi + 1))
    return values


def _expand_item(item: str, expr: str) -> list[str]:
    """Expand one host pattern such as ``rack[1-2]-n[01-02]`` (cartesian product)."""
    pieces: list[list[str]] = []
    pos = 0
    while pos < len(item):
        start = item.find("[", pos)
        if start < 0:
            pieces.append([item[pos:]])
            break
        end = item.find("]", start)
        if end < 0:  # _split_top_level already checks; keep the guard for safety
            raise ValueError(f"unbalanced '[' in node list {expr!r}")
        if start > pos:
            pieces.append([item[pos:start]])
        pieces.append(_expand_ranges(item[start + 1 : end], expr))
        pos = end + 1
    return ["".join(combo) for combo in itertools.product(*pieces)]


def expand_nodelist(s: str) -> list[str]:
    """Expand a Slurm hostlist expression into node names, in Slurm's order.

    >>> expand_nodelist("n[1-3,7]")
    ['n1', 'n2', 'n3', 'n7']
    >>> expand_nodelist("rack[1-2]-n[1-2]")
    ['rack1-n1', 'rack1-n2', 'rack2-n1', 'rack2-n2']

    Zero padding of the low bound is kept (``node[01-03]`` -> ``node01``...).
    Raises ValueError, quoting the input, when the expression is malformed.
    """
    items = _split_top_level(s)
    if not items:
        raise ValueError(f"empty node list {s!r}")
    names: list[str] = []
    for item in items:
        names.extend(_expand_item(item, s))
    return names


# --------------------------------------------------------------------------
# SLURM_JOB_CPUS_PER_NODE


def expand_cpus_per_node(s: str, nnodes: int) -> list[int]:
    """Expand ``SLURM_JOB_CPUS_PER_NODE`` (``4``, ``4(x3)``, ``8(x2),4``).

    The result must have exactly ``nnodes`` entries; otherwise ValueError names
    both the string and the expected node count.
    """
    counts: list[int] = []
    for part in s.split(","):
        match = _CPUS_ITEM_RE.fullmatch(part.strip())
        if match is None:
            raise ValueError(f"invalid CPUs-per-node item {part!r} in {s!r}")
        repeat = int(match.group(2)) if match.group(2) is not None else 1
        if repeat < 1:
            raise ValueError(f"invalid repeat count in {part!r} of {s!r}")
        counts.extend([int(match.group(1))] * repeat)
    if len(counts) != nnodes:
        raise ValueError(
            f"CPUs per node {s!r} describes {len(counts)} node(s) but the node list has {nnodes}"
        )
    return counts


# --------------------------------------------------------------------------
# Nodes and allocations


@dataclass(frozen=True)
class Node:
    """One node of the allocation: its Slurm name and what we may use on it."""

    name: str
    cpus: int
    gpus: int = 0


def _local_cpu_count() -> int:
    """CPUs this process may run on (affinity-aware where the OS supports it)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _parse_gpu_count(value: str) -> int | None:
    """A GPU count such as ``"2"`` or ``"a100:2"``; None when unparsable."""
    last = value.strip().rsplit(":", 1)[-1]
    return int(last) if last.isdigit() else None


def _parse_gpu_ids(value: str) -> int | None:
    """Number of GPU ids in ``"0,1"``; None when unparsable."""
    ids = [part.strip() for part in value.split(",")]
    if ids and all(part.isdigit() for part in ids):
        return len(ids)
    return None


def _gpus_per_node(env: Mapping[str, str]) -> int:
    """Best effort: GPUs on each node (Slurm reports them for the batch node only)."""
    parsers = (
        ("SLURM_GPUS_ON_NODE", _parse_gpu_count),
        ("SLURM_GPUS_PER_NODE", _parse_gpu_count),
        ("SLURM_JOB_GPUS", _parse_gpu_ids),
    )
    for key, parse in parsers:
        if key in env:
            count = parse(env[key])
            if count is not None:
                return count
            logger.warning("ignoring unparsable %s=%r", key, env[key])
    return 0


@dataclass(frozen=True)
class Allocation:
    """The nodes the orchestrator may use, and whether they come from Slurm."""

    nodes: tuple[Node, ...]
    in_slurm: bool
    job_id: str | None

    @property
    def total_cpus(self) -> int:
        """Sum of CPUs over all nodes."""
        return sum(node.cpus for node in self.nodes)

    @property
    def node_names(self) -> tuple[str, ...]:
        """Node names in allocation order."""
        return tuple(node.name for node in self.nodes)

    @classmethod
    def detect(cls, env: Mapping[str, str] | None = None) -> Allocation:
        """Describe the current Slurm job, or the local machine outside Slurm.

        ``env`` defaults to ``os.environ``. Inside Slurm (``SLURM_JOB_ID`` and
        ``SLURM_JOB_NODELIST`` set) nodes come from ``SLURM_JOB_NODELIST`` and
        ``SLURM_JOB_CPUS_PER_NODE``; GPUs from ``SLURM_GPUS_ON_NODE`` /
        ``SLURM_JOB_GPUS`` when present (assumed equal on every node).
        """
        env = os.environ if env is None else env
        job_id = env.get("SLURM_JOB_ID")
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if job_id and nodelist:
            return cls._from_slurm(env, job_id, nodelist)
        return cls.local()

    @classmethod
    def _from_slurm(cls, env: Mapping[str, str], job_id: str, nodelist: str) -> Allocation:
        names = expand_nodelist(nodelist)
        cpus_text = env.get("SLURM_JOB_CPUS_PER_NODE")
        if cpus_text is None:
            raise ValueError(f"inside Slurm job {job_id} but SLURM_JOB_CPUS_PER_NODE is not set")
        cpus = expand_cpus_per_node(cpus_text, len(names))
        gpus = _gpus_per_node(env)
        nodes = tuple(Node(name, n, gpus) for name, n in zip(names, cpus, strict=True))
        alloc = cls(nodes=nodes, in_slurm=True, job_id=job_id)
        logger.debug("Slurm job %s: %d node(s), %d CPUs", job_id, len(nodes), alloc.total_cpus)
        return alloc

    @classmethod
    def local(cls) -> Allocation:
        """The local machine as a one-node allocation."""
        node = Node(socket.gethostname(), _local_cpu_count())
        logger.debug("not inside a Slurm job; using local node %s (%d CPUs)", node.name, node.cpus)
        return cls(nodes=(node,), in_slurm=False, job_id=None)


# --------------------------------------------------------------------------
# Slot accounting


@dataclass(frozen=True)
class Placement:
    """Where one launch runs: ``(node name, ranks on that node)`` pairs."""

    per_node: tuple[tuple[str, int], ...]

    @property
    def nodes(self) -> tuple[str, ...]:
        """Node names used, in placement order."""
        return tuple(name for name, _ in self.per_node)

    @property
    def ntasks(self) -> int:
        """Total ranks/slots of this placement."""
        return sum(count for _, count in self.per_node)

    @property
    def nodelist(self) -> str:
        """Comma-separated node names, e.g. for ``srun --nodelist``."""
        return ",".join(self.nodes)


class SlotPool:
    """Per-node CPU slot accounting for concurrent launches in one allocation.

    ``try_acquire`` fills the node with the most free slots first and spreads
    over further nodes only when the request does not fit on one; it never
    hands out more slots than a node has. ``acquire`` waits (on an
    ``asyncio.Condition``, no polling) until a ``release`` makes room.
    Waiters are woken together and retry in arrival order; a large request
    may wait while smaller ones keep fitting.
    """

    def __init__(self, nodes: Sequence[Node]) -> None:
        if not nodes:
            raise ValueError("SlotPool needs at least one node")
        self._capacity: dict[str, int] = {}
        for node in nodes:
            if node.name in self._capacity:
                raise ValueError(f"duplicate node name {node.name!r} in SlotPool")
            if node.cpus < 0:
                raise ValueError(f"node {node.name!r} has negative CPUs ({node.cpus})")
            self._capacity[node.name] = node.cpus
        self._free: dict[str, int] = dict(self._capacity)
        self._free_total = sum(self._free.values())
        self._by_free: dict[int, dict[str, None]] = {}
        """Nodes by free-slot count (insertion-ordered sets): a placement walks only the nodes it
        takes, so acquire and release cost the same on 3 nodes or 30,000."""
        for name, free in self._free.items():
            self._by_free.setdefault(free, {})[name] = None
        self._possible: dict[tuple[int | None, int | None], int] = {}
        self._cond: asyncio.Condition | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending_wakeups: set[asyncio.Task[None]] = set()

    # -- introspection

    @property
    def free(self) -> dict[str, int]:
        """Free slots per node (a copy)."""
        return dict(self._free)

    @property
    def free_total(self) -> int:
        """Free slots over all nodes."""
        return self._free_total

    @property
    def capacity(self) -> int:
        """Total slots over all nodes, free or not."""
        return self._max_possible(None)

    # -- synchronous API

    def _check_request(self, n: int, max_nodes: int | None) -> None:
        if n < 1:
            raise ValueError(f"must ask for at least 1 slot, got {n}")
        if max_nodes is not None and max_nodes < 1:
            raise ValueError(f"max_nodes must be at least 1, got {max_nodes}")

    def _plan(self, n: int, max_nodes: int | None, per_node: int | None = None) -> list[tuple[str, int]] | None:
        """Greedy most-free-first plan; it uses the fewest nodes possible (at most
        ``per_node`` slots on each). Among nodes with equal free slots, the one that
        has had that count longest comes first (allocation order while none is used)."""
        if n > self._free_total:
            return None
        plan: list[tuple[str, int]] = []
        remaining = n
        limit = max_nodes if max_nodes is not None else len(self._free)
        for free in sorted(self._by_free, reverse=True):
            if free == 0:
                break
            for name in self._by_free[free]:
                if remaining == 0 or len(plan) == limit:
                    break
                take = min(free, remaining, per_node or free)
                plan.append((name, take))
                remaining -= take
            if remaining == 0 or len(plan) == limit:
                break
        return plan if remaining == 0 else None

    def _move(self, name: str, delta: int) -> None:
        """Change one node's free count, keeping the by-free index."""
        old = self._free[name]
        bucket = self._by_free[old]
        del bucket[name]
        if not bucket:
            del self._by_free[old]
        self._free[name] = old + delta
        self._by_free.setdefault(old + delta, {})[name] = None
        self._free_total += delta

    def try_acquire(
        self, n: int, *, max_nodes: int | None = None, per_node: int | None = None
    ) -> Placement | None:
        """Take ``n`` slots now on at most ``max_nodes`` nodes (``per_node`` at most on
        each), or return None."""
        self._check_request(n, max_nodes)
        plan = self._plan(n, max_nodes, per_node)
        if plan is None:
            return None
        for name, count in plan:
            self._move(name, -count)
        placement = Placement(tuple(plan))
        logger.debug("acquired %s (free now %d)", placement.per_node, self._free_total)
        return placement

    def release(self, placement: Placement) -> None:
        """Give a placement's slots back and wake waiting ``acquire`` calls."""
        for name, count in placement.per_node:
            if name not in self._capacity:
                raise ValueError(f"release of unknown node {name!r}")
            if self._free[name] + count > self._capacity[name]:
                raise ValueError(
                    f"release of {count} slot(s) on {name!r} exceeds its capacity "
                    f"{self._capacity[name]} (released twice?)"
                )
        for name, count in placement.per_node:
            self._move(name, count)
        logger.debug("released %s (free now %d)", placement.per_node, self._free_total)
        self._wake_waiters()

    # -- asyncio API

    def _max_possible(self, max_nodes: int | None, per_node: int | None = None) -> int:
        key = (max_nodes, per_node)
        if key not in self._possible:  # capacities never change: once per request shape
            sizes = sorted((min(c, per_node or c) for c in self._capacity.values()), reverse=True)
            self._possible[key] = sum(sizes if max_nodes is None else sizes[:max_nodes])
        return self._possible[key]

    def _condition(self) -> asyncio.Condition:
        loop = asyncio.get_running_loop()
        if self._cond is None or self._loop is not loop:
            self._cond = asyncio.Condition()
            self._loop = loop
        return self._cond

    async def acquire(self, n: int, *, max_nodes: int | None = None, per_node: int | None = None) -> Placement:
        """Wait until ``n`` slots are free, take them and return the placement.

        Raises ValueError at once when ``n`` can never fit in the pool.
        """
        self._check_request(n, max_nodes)
        possible = self._max_possible(max_nodes, per_node)
        if n > possible:
            where = f"{len(self._capacity)} node(s)"
            if max_nodes is not None:
                where = f"at most {max_nodes} of {where}"
            if per_node is not None:
                where += f" with at most {per_node} per node"
            raise ValueError(
                f"asked for {n} slots but only {possible} exist on {where} "
                f"(capacity {self.capacity}); lower the number of ranks or ask "
                f"Slurm for more nodes/CPUs"
            )
        cond = self._condition()
        async with cond:
            while (placement := self.try_acquire(n, max_nodes=max_nodes, per_node=per_node)) is None:
                await cond.wait()
            return placement

    def _wake_waiters(self) -> None:
        cond, loop = self._cond, self._loop
        if cond is None or loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._spawn_notify(cond)
        else:  # released from another thread or outside the loop
            loop.call_soon_threadsafe(self._spawn_notify, cond)

    def _spawn_notify(self, cond: asyncio.Condition) -> None:
        task = asyncio.get_running_loop().create_task(_notify_all(cond))
        self._pending_wakeups.add(task)
        task.add_done_callback(self._pending_wakeups.discard)


async def _notify_all(cond: asyncio.Condition) -> None:
    async with cond:
        cond.notify_all()
