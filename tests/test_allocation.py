"""Tests for orchestrator.allocation: hostlists, CPU counts, detection, slots."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from orchestrator.allocation import (
    Allocation,
    Node,
    Placement,
    SlotPool,
    expand_cpus_per_node,
    expand_nodelist,
)

# ---------------------------------------------------------------- nodelists

NODELIST_CASES = [
    ("n1", ["n1"]),
    ("n[1-3,7]", ["n1", "n2", "n3", "n7"]),
    ("node[01-03]", ["node01", "node02", "node03"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("n[08-10]", ["n08", "n09", "n10"]),
    ("n[007]", ["n007"]),
    ("a[1-2],b3", ["a1", "a2", "b3"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("n[1-2][3-4]", ["n13", "n14", "n23", "n24"]),
    ("gpu-[1-2].cluster", ["gpu-1.cluster", "gpu-2.cluster"]),
    ("n1,n[3-4],m5", ["n1", "n3", "n4", "m5"]),
]


@pytest.mark.parametrize(("expr", "expected"), NODELIST_CASES)
def test_expand_nodelist(expr: str, expected: list[str]) -> None:
    assert expand_nodelist(expr) == expected


@pytest.mark.parametrize(
    "expr",
    ["", "   ", "n[1-2", "n1]", "n[]", "n[a-b]", "n[3-1]", "n[1-2,]", "n[[1]]", "n[1--2]", "n[-1]"],
)
def test_expand_nodelist_malformed(expr: str) -> None:
    with pytest.raises(ValueError) as info:
        expand_nodelist(expr)
    assert repr(expr) in str(info.value)


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="scontrol not installed")
@pytest.mark.parametrize(("expr", "expected"), NODELIST_CASES[:-2])
def test_expand_nodelist_matches_scontrol(expr: str, expected: list[str], tmp_path: Path) -> None:
    """Slurm's own expansion agrees (scontrol needs a config, not a daemon)."""
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=x\nSlurmctldHost=localhost\n")
    out = subprocess.run(
        ["scontrol", "show", "hostnames", expr],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
        env={**os.environ, "SLURM_CONF": str(conf)},
    )
    if out.returncode != 0:
        pytest.skip(f"scontrol show hostnames failed here: {out.stderr.strip()}")
    assert out.stdout.split() == expected == expand_nodelist(expr)


# ---------------------------------------------------------------- cpus per node


@pytest.mark.parametrize(
    ("text", "nnodes", "expected"),
    [
        ("4", 1, [4]),
        ("4(x3)", 3, [4, 4, 4]),
        ("8(x2),4", 3, [8, 8, 4]),
        ("4,1", 2, [4, 1]),
        ("2,8(x2),1(x1)", 4, [2, 8, 8, 1]),
    ],
)
def test_expand_cpus_per_node(text: str, nnodes: int, expected: list[int]) -> None:
    assert expand_cpus_per_node(text, nnodes) == expected


@pytest.mark.parametrize(("text", "nnodes"), [("4", 3), ("8(x2),4", 2), ("4(x3)", 4)])
def test_expand_cpus_per_node_mismatch_names_both(text: str, nnodes: int) -> None:
    with pytest.raises(ValueError) as info:
        expand_cpus_per_node(text, nnodes)
    message = str(info.value)
    assert repr(text) in message
    assert str(nnodes) in message


@pytest.mark.parametrize("text", ["", "x", "4(x)", "4(3)", "4(x0)", "-1", "4,,4", "4(x2"])
def test_expand_cpus_per_node_malformed(text: str) -> None:
    with pytest.raises(ValueError):
        expand_cpus_per_node(text, 2)


# ---------------------------------------------------------------- detect


def test_detect_from_slurm_env() -> None:
    env = {
        "SLURM_JOB_ID": "42",
        "SLURM_JOB_NODELIST": "n[1-3]",
        "SLURM_JOB_CPUS_PER_NODE": "8(x2),4",
    }
    alloc = Allocation.detect(env)
    assert alloc.in_slurm
    assert alloc.job_id == "42"
    assert alloc.nodes == (Node("n1", 8), Node("n2", 8), Node("n3", 4))
    assert alloc.total_cpus == 20
    assert alloc.node_names == ("n1", "n2", "n3")


@pytest.mark.parametrize(
    ("gpu_env", "expected"),
    [
        ({"SLURM_GPUS_ON_NODE": "2"}, 2),
        ({"SLURM_JOB_GPUS": "0,1,3"}, 3),
        ({"SLURM_JOB_GPUS": "0"}, 1),
        ({"SLURM_GPUS_PER_NODE": "a100:4"}, 4),
        ({"SLURM_GPUS_ON_NODE": "junk"}, 0),
        ({}, 0),
    ],
)
def test_detect_gpus(gpu_env: dict[str, str], expected: int) -> None:
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "g[1-2]", "SLURM_JOB_CPUS_PER_NODE": "4(x2)"}
    alloc = Allocation.detect({**env, **gpu_env})
    assert [node.gpus for node in alloc.nodes] == [expected, expected]


def test_detect_cpu_mismatch_raises() -> None:
    env = {"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "n[1-3]", "SLURM_JOB_CPUS_PER_NODE": "4(x2)"}
    with pytest.raises(ValueError, match="3"):
        Allocation.detect(env)


def test_detect_missing_cpus_raises() -> None:
    with pytest.raises(ValueError, match="SLURM_JOB_CPUS_PER_NODE"):
        Allocation.detect({"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "n1"})


@pytest.mark.parametrize("env", [{}, {"SLURM_JOB_ID": "5"}, {"SLURM_JOB_NODELIST": "n1"}])
def test_detect_local_box(env: dict[str, str]) -> None:
    alloc = Allocation.detect(env)
    assert not alloc.in_slurm
    assert alloc.job_id is None
    assert len(alloc.nodes) == 1
    node = alloc.nodes[0]
    assert node.name == socket.gethostname()
    assert 1 <= node.cpus <= (os.cpu_count() or 1)
    assert alloc.total_cpus == node.cpus


def test_detect_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "99")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "x[1-2]")
    monkeypatch.setenv("SLURM_JOB_CPUS_PER_NODE", "3(x2)")
    alloc = Allocation.detect()
    assert alloc.job_id == "99"
    assert alloc.total_cpus == 6


# ---------------------------------------------------------------- SlotPool


def pool_of(*cpus: int) -> SlotPool:
    return SlotPool([Node(f"n{i + 1}", c) for i, c in enumerate(cpus)])


def test_placement_properties() -> None:
    p = Placement((("n1", 3), ("n2", 1)))
    assert p.nodes == ("n1", "n2")
    assert p.ntasks == 4
    assert p.nodelist == "n1,n2"


def test_single_node_prefers_most_free() -> None:
    pool = pool_of(4, 8, 6)
    p = pool.try_acquire(3)
    assert p is not None
    assert p.per_node == (("n2", 3),)
    assert pool.free == {"n1": 4, "n2": 5, "n3": 6}
    q = pool.try_acquire(2)
    assert q is not None
    assert q.per_node == (("n3", 2),)


def test_multi_node_placement_spreads() -> None:
    pool = pool_of(8, 8, 8)
    p = pool.try_acquire(20)
    assert p is not None
    assert p.ntasks == 20
    assert p.per_node == (("n1", 8), ("n2", 8), ("n3", 4))
    assert pool.free_total == 4
    assert pool.try_acquire(5) is None
    pool.release(p)
    assert pool.free == {"n1": 8, "n2": 8, "n3": 8}


def test_max_nodes_is_respected() -> None:
    pool = pool_of(4, 4, 4)
    assert pool.try_acquire(9, max_nodes=2) is None
    p = pool.try_acquire(8, max_nodes=2)
    assert p is not None
    assert len(p.nodes) == 2
    assert pool.try_acquire(2, max_nodes=1) is not None
    assert pool.try_acquire(3, max_nodes=1) is None


def test_never_oversubscribes_random() -> None:
    rng = random.Random(1234)
    capacity = {"n1": 8, "n2": 3, "n3": 5}
    pool = SlotPool([Node(name, c) for name, c in capacity.items()])
    held: list[Placement] = []
    for _ in range(2000):
        if held and rng.random() < 0.45:
            pool.release(held.pop(rng.randrange(len(held))))
        else:
            n = rng.randint(1, 10)
            max_nodes = rng.choice([None, 1, 2])
            p = pool.try_acquire(n, max_nodes=max_nodes)
            if p is not None:
                assert p.ntasks == n
                assert len(set(p.nodes)) == len(p.nodes)
                if max_nodes is not None:
                    assert len(p.nodes) <= max_nodes
                held.append(p)
        used = {name: 0 for name in capacity}
        for p in held:
            for name, count in p.per_node:
                assert count > 0
                used[name] += count
        for name, cap in capacity.items():
            assert used[name] <= cap
            assert pool.free[name] == cap - used[name]


def test_release_errors() -> None:
    pool = pool_of(2)
    p = pool.try_acquire(2)
    assert p is not None
    pool.release(p)
    with pytest.raises(ValueError, match="twice"):
        pool.release(p)
    with pytest.raises(ValueError, match="unknown"):
        pool.release(Placement((("zz", 1),)))


def test_invalid_requests() -> None:
    pool = pool_of(2)
    with pytest.raises(ValueError):
        pool.try_acquire(0)
    with pytest.raises(ValueError):
        pool.try_acquire(1, max_nodes=0)
    with pytest.raises(ValueError):
        SlotPool([])
    with pytest.raises(ValueError, match="duplicate"):
        SlotPool([Node("a", 1), Node("a", 2)])


def test_acquire_too_big_fails_fast() -> None:
    pool = pool_of(4, 4)

    async def main() -> None:
        with pytest.raises(ValueError) as info:
            await asyncio.wait_for(pool.acquire(9), timeout=1)
        message = str(info.value)
        assert "9" in message and "8" in message
        assert "ranks" in message and "nodes" in message
        with pytest.raises(ValueError):
            await asyncio.wait_for(pool.acquire(5, max_nodes=1), timeout=1)

    asyncio.run(main())


def test_release_wakes_waiter() -> None:
    pool = pool_of(4, 2)

    async def main() -> None:
        first = await pool.acquire(5)
        assert first.ntasks == 5
        waiter = asyncio.create_task(pool.acquire(4))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        pool.release(first)
        second = await asyncio.wait_for(waiter, timeout=2)
        assert second.ntasks == 4
        assert second.per_node == (("n1", 4),)

    asyncio.run(main())


def test_many_waiters_all_served_without_oversubscription() -> None:
    pool = pool_of(3, 3)
    running = 0
    peak = 0

    async def job(n: int) -> None:
        nonlocal running, peak
        p = await pool.acquire(n)
        running += n
        peak = max(peak, running)
        assert running <= 6
        await asyncio.sleep(0.01)
        running -= n
        pool.release(p)

    async def main() -> None:
        await asyncio.wait_for(asyncio.gather(*(job(1 + i % 4) for i in range(40))), timeout=10)

    asyncio.run(main())
    assert peak <= 6
    assert pool.free_total == 6


def test_pool_reusable_across_event_loops() -> None:
    pool = pool_of(1)

    async def once() -> None:
        p = await pool.acquire(1)
        waiter = asyncio.create_task(pool.acquire(1))
        await asyncio.sleep(0.01)
        pool.release(p)
        pool.release(await asyncio.wait_for(waiter, timeout=2))

    asyncio.run(once())
    asyncio.run(once())
    assert pool.free == {"n1": 1}


def test_release_from_another_thread_wakes_waiter() -> None:
    pool = pool_of(2)

    async def main() -> None:
        held = await pool.acquire(2)
        waiter = asyncio.create_task(pool.acquire(1))
        await asyncio.sleep(0.01)
        await asyncio.get_running_loop().run_in_executor(None, pool.release, held)
        got = await asyncio.wait_for(waiter, timeout=2)
        assert got.ntasks == 1

    asyncio.run(main())


def test_per_node_cap_spreads_a_request() -> None:
    pool = SlotPool([Node("n1", 8), Node("n2", 8), Node("n3", 8)])
    placement = pool.try_acquire(6, per_node=2)
    assert placement is not None and placement.per_node == (("n1", 2), ("n2", 2), ("n3", 2))
    assert pool.try_acquire(7, per_node=2) is None  # only 6 more at 2 per node
    with pytest.raises(ValueError, match="with at most 2 per node"):
        asyncio.run(pool.acquire(7, per_node=2))
