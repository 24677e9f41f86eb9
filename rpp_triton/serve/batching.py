"""Dynamic batching: requests from many clients share one model forward.

Handlers on the event loop `await batcher.submit(items)`; one worker thread takes items from a
bounded FIFO and runs `run_batch(items) -> results` on as many as fit, then resolves each request's
futures on its loop. A batch closes when it holds `max_batch_size` sequences, when one more item
would push its padded size (sequences x longest) past `max_batch_tokens`, or `max_wait_s` after its
oldest item arrived, whichever comes first. While the worker is busy, new requests queue up, so the
next batch fills by itself under load and the wait only costs latency when the server is idle.

The forward runs outside the event loop (PyTorch releases the GIL in its kernels), so the loop keeps
answering health checks, metrics and rejections while a batch runs.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rpp_triton.serve.errors import Kind, ServeError

log = logging.getLogger("rpp_triton.serve")


class QueueFull(ServeError):
    """The queue has no room for the request's items."""

    kind = Kind.OVERLOADED


class BatcherClosed(ServeError):
    """The batcher is shutting down and takes no new work."""

    kind = Kind.UNAVAILABLE


class RequestTimeout(ServeError):
    """The request's items were not computed within its timeout."""

    kind = Kind.TIMEOUT


@dataclass(eq=False)
class _Item:
    payload: Any
    cost: int
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float
    deadline: float


def _resolve(future: asyncio.Future, result: Any = None, error: BaseException | None = None) -> None:
    if future.done():  # timed out or the client went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def split_by_budget(costs: Sequence[int], max_size: int, max_tokens: int) -> list[int]:
    """Sizes of consecutive chunks of `costs` (sequence lengths) where each chunk has at most
    `max_size` sequences and `len(chunk) * max(chunk) <= max_tokens` (a single over-budget
    sequence still forms a chunk of its own)."""
    sizes, n, longest = [], 0, 0
    for c in costs:
        wider = max(longest, c)
        if n and (n + 1 > max_size or (n + 1) * wider > max_tokens):
            sizes.append(n)
            n, wider = 0, c
        n, longest = n + 1, wider
    if n:
        sizes.append(n)
    return sizes


class DynamicBatcher:
    """Bounded queue + one worker thread running `run_batch` on batches of queued items."""

    def __init__(
        self,
        run_batch: Callable[[list[Any]], list[Any]],
        *,
        max_batch_size: int = 32,
        max_batch_tokens: int = 16384,
        max_wait_s: float = 0.005,
        max_queue: int = 512,
        on_batch: Callable[[int, int, float], None] | None = None,
        name: str = "rpp-batcher",
    ):
        if max_batch_size < 1 or max_batch_tokens < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("batch size, batch tokens and queue size must be >= 1 and the wait >= 0")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.on_batch = on_batch
        self._pending: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._busy = 0  # items in the batch being computed
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Items waiting for a batch (not counting the batch being computed)."""
        return len(self._pending)

    @property
    def in_flight(self) -> int:
        return len(self._pending) + self._busy

    async def submit(
        self, payloads: Sequence[Any], costs: Sequence[int], timeout: float | None = None
    ) -> list:
        """Queue `payloads` (with their sequence lengths) and wait for their results, in order.

        Raises QueueFull at once when the queue cannot take them all, RequestTimeout when they are
        not done within `timeout` seconds, BatcherClosed after `close()`, and whatever `run_batch`
        raised for the batch an item was in."""
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        deadline = now + timeout if timeout else float("inf")
        items = [_Item(p, c, loop.create_future(), loop, now, deadline) for p, c in zip(payloads, costs)]
        with self._cond:
            if self._closed:
                raise BatcherClosed("the server is shutting down")
            if len(self._pending) + len(items) > self.max_queue:
                raise QueueFull(
                    "server busy: "
                    f"the queue holds {len(self._pending)} of {self.max_queue} inputs; "
                    f"no room for {len(items)} more"
                )
            self._pending.extend(items)
            self._cond.notify()
        try:
            return await asyncio.wait_for(asyncio.gather(*(it.future for it in items)), timeout)
        except asyncio.TimeoutError:
            self._withdraw(items)
            raise RequestTimeout(f"the request was not served within {timeout:g} s") from None
        except BaseException:  # cancelled (the client went away) or a batch failed
            self._withdraw(items)
            raise

    def _withdraw(self, items: list[_Item]) -> None:
        """Take the `items` of a request that timed out or was cancelled off the queue at once: they
        free their slots and are never computed."""
        for it in items:
            it.future.cancel()
        withdrawn = set(items)
        with self._cond:
            self._pending = deque(it for it in self._pending if it not in withdrawn)

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking work. With `drain`, queued items are still computed before the worker
        stops; otherwise they fail with BatcherClosed. Waits up to `timeout` for the worker."""
        with self._cond:
            self._closed = True
            if not drain:
                while self._pending:
                    it = self._pending.popleft()
                    self._call(it, error=BatcherClosed("the server shut down before this input ran"))
            self._cond.notify_all()
        self._thread.join(timeout)

    # ------------------------------------------------------------ worker side
    @staticmethod
    def _call(item: _Item, result: Any = None, error: BaseException | None = None) -> None:
        try:
            item.loop.call_soon_threadsafe(_resolve, item.future, result, error)
        except RuntimeError:  # the loop is gone; nobody is waiting any more
            pass

    def _plan(self) -> int:
        """How many items from the front of the queue fit in one batch (at least one)."""
        n, longest = 0, 0
        for it in self._pending:
            wider = max(longest, it.cost)
            if n and (n + 1 > self.max_batch_size or (n + 1) * wider > self.max_batch_tokens):
                break
            n, longest = n + 1, wider
        return n

    def _drop_dead(self) -> None:
        now = time.monotonic()
        if any(it.future.done() or it.deadline <= now for it in self._pending):
            alive = [it for it in self._pending if not (it.future.done() or it.deadline <= now)]
            self._pending = deque(alive)

    def _next_batch(self) -> list[_Item] | None:
        with self._cond:
            while True:
                self._drop_dead()
                if self._pending:
                    break
                if self._closed:
                    return None
                self._cond.wait()
            close_at = self._pending[0].enqueued + self.max_wait_s
            while not self._closed:
                n = self._plan()
                if n < len(self._pending) or n >= self.max_batch_size:
                    break  # full
                remaining = close_at - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            self._drop_dead()
            batch = [self._pending.popleft() for _ in range(self._plan())]
            self._busy = len(batch)
            return batch

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if not batch:
                continue
            start = time.perf_counter()
            try:
                results = self.run_batch([it.payload for it in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} inputs")
            except Exception as exc:  # noqa: BLE001 - the error belongs to the batch's requests
                log.exception("batch of %d failed", len(batch))
                for it in batch:
                    self._call(it, error=exc)
            else:
                for it, result in zip(batch, results):
                    self._call(it, result)
            finally:
                self._busy = 0
            if self.on_batch is not None:
                tokens = len(batch) * max(it.cost for it in batch)
                try:
                    self.on_batch(len(batch), tokens, time.perf_counter() - start)
                except Exception:  # noqa: BLE001 - metrics must never stop the worker
                    log.exception("on_batch hook failed")
