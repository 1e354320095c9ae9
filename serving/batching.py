"""Micro-batching: concurrent requests gathered into one model call, off the event loop.

A :class:`MicroBatcher` owns a bounded queue and one worker task. ``await batcher.submit(x)``
enqueues ``x`` and waits for its result; the worker takes the first waiting item, then keeps taking
items until it holds ``max_batch_size`` or its wait for company is over, and runs
``fn(items) -> results`` in a single worker thread (so the event loop keeps answering ``/health``
while the model runs, and model calls never overlap). A full queue raises :class:`Overloaded`
at once (the route answers 503 with ``Retry-After``): memory stays bounded under any load, and the
service recovers as soon as the load stops.

**How long a batch waits for company** adapts to the load. The batcher expects as many requests as
were active during the last call (those it ran plus those that queued meanwhile): it runs as soon
as it has that many (plus whatever is already queued), and
waits for them at most ``wait_fraction`` of the last model call's duration (capped by
``max_wait_ms``). So requests that come one at a time never wait, and under steady concurrent load
batches fill without a fixed delay. Why: closed-loop clients (each sends its next request when its
last returns) arrive spread over several milliseconds after a batch completes; a fixed 2 ms wait
gathered batches of 4 from 8 such clients on a 2-core CPU where a forward takes ~250 ms, and
the fraction keeps the wait proportionate on any device (25 ms there, 1 ms for a 5 ms GPU forward).

An exception raised by ``fn`` for a batch is re-raised in every request of that batch; ``fn`` may
instead return an exception instance in a request's slot to fail that request alone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class Overloaded(Exception):
    """The queue is full; retry after ``retry_after_s``."""

    def __init__(self, what: str, limit: int, retry_after_s: int = 1) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(f"{what}: {limit} requests are already waiting (max_queue); retry after {retry_after_s} s")


class MicroBatcher:
    """Gathers ``submit`` calls into batches for ``fn`` (see module doc).

    Args:
        fn: ``items -> results`` (same length), run in the worker thread.
        max_batch_size: most items per call.
        max_wait_ms: the longest the first item of a batch waits for company.
        wait_fraction: the wait for company as a fraction of the last call's duration (see above).
        max_queue: most items waiting; more raise :class:`Overloaded`.
        executor: the thread model calls run in (shared by several batchers so that models on one
            device take turns); a private single thread by default.
        on_batch: called after each call with (batch size, queue depth when it started, seconds) (metrics).
    """

    def __init__(self, fn: Callable[[list[Any]], Sequence[Any]], name: str, max_batch_size: int = 8,
                 max_wait_ms: float = 50.0, max_queue: int = 64, executor: ThreadPoolExecutor | None = None,
                 on_batch: Callable[[int, int, float], None] | None = None, wait_fraction: float = 0.2) -> None:
        self.fn, self.name = fn, name
        self.max_batch_size, self.max_wait_s, self.max_queue = max_batch_size, max_wait_ms / 1000, max_queue
        self.wait_fraction = wait_fraction
        self._last_size, self._last_seconds = 0, 0.0
        self._own_executor = executor is None
        self.executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"batcher-{name}")
        self.on_batch = on_batch
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    @property
    def depth(self) -> int:
        """Items waiting (not yet taken by the worker)."""
        return 0 if self._queue is None else self._queue.qsize()

    def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.max_queue)
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._own_executor:
            self.executor.shutdown(wait=True)

    async def submit(self, item: Any) -> Any:
        """The result of ``item`` once its batch has run."""
        if self._queue is None:
            raise RuntimeError(f"batcher {self.name} is not started")
        future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((item, future))
        except asyncio.QueueFull:
            raise Overloaded(f"model {self.name!r}", self.max_queue) from None
        return await future

    @property
    def expected(self) -> int:
        """Requests the next batch waits for: those active during the last call (module doc)."""
        return max(1, min(self.max_batch_size, self._last_size))

    @property
    def wait_s(self) -> float:
        """The longest the next batch's first item waits for the expected company (module doc)."""
        if self.expected <= 1:
            return 0.0
        return min(self.max_wait_s, self.wait_fraction * self._last_seconds)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline, expected = time.monotonic() + self.wait_s, self.expected
            while len(batch) < self.max_batch_size:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                if len(batch) >= expected:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            live = [(item, fut) for item, fut in batch if not fut.cancelled()]  # clients that gave up
            if not live:
                continue
            depth = self._queue.qsize()
            start = time.monotonic()
            try:
                results = await loop.run_in_executor(self.executor, self.fn, [item for item, _ in live])
            except Exception as error:  # noqa: BLE001 - handed to every waiting request, which maps it
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(error)
                continue
            finally:  # those it ran + those that queued meanwhile: the load the next batch can expect
                self._last_size, self._last_seconds = len(live) + self._queue.qsize(), time.monotonic() - start
                if self.on_batch is not None:
                    self.on_batch(len(live), depth, self._last_seconds)
            for (_, fut), result in zip(live, results):
                if fut.done():
                    continue
                if isinstance(result, BaseException):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)
