"""The dynamic batcher on its own: batches within their budgets, in order, a bounded queue, and
queue slots given back as soon as a request stops waiting."""

import asyncio
import threading

import pytest

from rpp_triton.serve.batching import DynamicBatcher, QueueFull, RequestTimeout, split_by_budget


def test_split_by_budget():
    assert split_by_budget([5, 5, 5, 5], max_size=2, max_tokens=100) == [2, 2]
    assert split_by_budget([4, 4, 10, 2], max_size=8, max_tokens=20) == [2, 2]  # 3 x 10 > 20
    assert split_by_budget([50, 1], max_size=8, max_tokens=20) == [1, 1]  # alone when over budget
    assert split_by_budget([], max_size=8, max_tokens=20) == []


def test_batcher_respects_budgets_and_order():
    seen = []

    def run_batch(items):
        seen.append(list(items))
        return [x * 10 for x in items]

    batcher = DynamicBatcher(run_batch, max_batch_size=3, max_batch_tokens=12, max_wait_s=0.05, max_queue=8)

    async def main():
        costs = [2, 2, 2, 2, 5, 5, 1]
        out = await batcher.submit(list(range(7)), costs, timeout=10)
        with pytest.raises(QueueFull):
            await batcher.submit(list(range(9)), [1] * 9)
        return costs, out

    costs, out = asyncio.run(main())
    batcher.close()
    assert out == [x * 10 for x in range(7)]
    assert [x for b in seen for x in b] == list(range(7))
    for b in seen:
        assert len(b) <= 3 and len(b) * max(costs[i] for i in b) <= 12


def test_a_request_that_stops_waiting_frees_its_slots_at_once():
    release = threading.Event()
    batcher = DynamicBatcher(lambda items: release.wait(30) and items, max_wait_s=0, max_queue=3)

    async def main():
        busy = asyncio.ensure_future(batcher.submit(["busy"], [1]))
        while batcher.depth or not batcher.in_flight:  # the worker holds "busy"
            await asyncio.sleep(0.01)
        with pytest.raises(RequestTimeout):
            await batcher.submit(["a", "b", "c"], [1, 1, 1], timeout=0.05)
        assert batcher.depth == 0
        waiting = asyncio.ensure_future(batcher.submit(["d", "e", "f"], [1, 1, 1]))
        while batcher.depth < 3:
            await asyncio.sleep(0.01)
        waiting.cancel()  # what a disconnected client's request does
        await asyncio.gather(waiting, return_exceptions=True)
        assert batcher.depth == 0
        release.set()
        return await busy

    assert asyncio.run(main()) == ["busy"]
    batcher.close()
