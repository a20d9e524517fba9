"""Micro-batching: concurrent single-query searches merged into one batched search (one text-tower call)."""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Sequence

from starlette.concurrency import run_in_threadpool

SearchMany = Callable[[list[str], int], Sequence[Any]]


class QueryBatcher:
    """Queue single queries and answer them with batched searches, one batch at a time, in a worker thread.

    While one batch runs (TensorFlow and NumPy release the GIL), new requests queue up; the next batch takes
    all of them (up to `max_batch`), waiting at most `max_wait` seconds for more when the queue runs dry
    first. A batch searches with the largest `k` asked in it; callers cut the hits to their own `k`.
    One batch at a time, because parallel searches do not pay on a few cores: over 100k items on 2 cores,
    32 threads of single searches gave 80 queries/s against 71 one after another (one BLAS thread), and
    collapsed to 2 against 15 with two BLAS threads; batches of 32 gave 334.

    Args:
        search_many: `(queries, k) -> results`, one result per query, in order.
        max_batch: most queries in one search call.
        max_wait: seconds a non-full batch waits for more queries before it runs.
    """

    def __init__(self, search_many: SearchMany, max_batch: int = 32, max_wait: float = 0.002):
        self.search_many = search_many
        self.max_batch = max_batch
        self.max_wait = max_wait
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None

    async def start(self) -> None:
        # The queue belongs to the running event loop, so it is made here rather than in __init__.
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        while self._queue is not None and not self._queue.empty():
            _, _, future = self._queue.get_nowait()
            future.cancel()
        self._queue = self._worker = None

    async def search(self, query: str, k: int) -> Any:
        """One query's result; raises what searching that query alone would raise."""
        if self._queue is None:
            raise RuntimeError("QueryBatcher.start() was not awaited (run the app with its lifespan)")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((query, k, future))
        return await future

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            deadline = asyncio.get_running_loop().time() + self.max_wait
            while len(batch) < self.max_batch:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                    break
            await self._answer(batch)

    async def _answer(self, batch: list) -> None:
        queries = [query for query, _, _ in batch]
        k = max(k for _, k, _ in batch)
        try:
            results = await run_in_threadpool(self._search_each_on_failure, queries, k)
        except Exception as error:  # noqa: BLE001 — handed to every waiting caller, not swallowed
            results = [error] * len(batch)
        for (_, _, future), result in zip(batch, results):
            if future.done():  # the caller went away (client disconnected)
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    def _search_each_on_failure(self, queries: list[str], k: int) -> list:
        """Search the batch at once; if that fails, search each query alone so that only the callers whose
        queries fail get an error (one empty query must not spoil its neighbours' searches)."""
        try:
            return list(self.search_many(queries, k))
        except Exception:
            if len(queries) == 1:
                raise
        results = []
        for query in queries:
            try:
                results.append(self.search_many([query], k)[0])
            except Exception as error:  # noqa: BLE001 — becomes this caller's exception
                results.append(error)
        return results
