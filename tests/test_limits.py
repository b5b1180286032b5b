from __future__ import annotations

from pathlib import Path

import trio

from orchestrator.config import parse_config
from orchestrator.limits import Holder, Slots


def slots() -> Slots:
    data = {
        "pools": {"gpu": 1},
        "stages": [
            {"name": "a", "command": ["x"], "concurrency": 2, "pools": ["gpu"]},
            {"name": "b", "command": ["x"], "concurrency": 1, "pools": ["gpu"]},
        ],
    }
    return Slots(parse_config(data, base_dir=Path(".")))


async def test_pool_is_shared_fifo_and_waits_are_measured(autojump_clock: trio.abc.Clock) -> None:
    s = slots()
    order: list[str] = []

    async def run(name: str, stage: str, hold: float) -> None:
        h = Holder(name, stage)
        waited = await s.acquire(h)
        order.append(f"{name}@{trio.current_time():.0f}:{waited:.0f}")
        await trio.sleep(hold)
        s.release(h)

    async with trio.open_nursery() as n:
        n.start_soon(run, "x1", "a", 10)
        await trio.sleep(1)
        n.start_soon(run, "y1", "b", 10)  # waits for gpu
        await trio.sleep(1)
        n.start_soon(run, "x2", "a", 10)  # stage a has room, but gpu is queued FIFO after y1
        await trio.sleep(1)
        stats = {(st.kind, st.name): st for st in s.statistics()}
        assert stats["pool", "gpu"].busy == 1
        assert stats["pool", "gpu"].waiting == 2
        assert stats["pool", "gpu"].holders == ("x1",)
    assert order == ["x1@0:0", "y1@10:9", "x2@20:18"]
    assert all(st.busy == 0 for st in s.statistics())


async def test_cancelled_waiter_gives_back_what_it_took(autojump_clock: trio.abc.Clock) -> None:
    s = slots()
    holder = Holder("x1", "b")
    await s.acquire(holder)
    with trio.move_on_after(5):
        await s.acquire(Holder("x2", "a"))  # takes stage a, then waits for gpu
    stats = {(st.kind, st.name): st for st in s.statistics()}
    assert stats["stage", "a"].busy == 0
    assert stats["pool", "gpu"].waiting == 0
    s.release(holder)
