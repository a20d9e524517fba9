"""The micro-batcher: concurrent queries share one search call, and a bad query fails only its caller."""

import asyncio
import threading

import pytest

from dual_encoder.index.errors import QueryError
from dual_encoder.serve.batching import QueryBatcher


class RecordingSearch:
    """The real searcher, recording the size of every batch it is called with."""

    def __init__(self, searcher):
        self.searcher = searcher
        self.batches: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, queries, k):
        with self.lock:
            self.batches.append(len(queries))
        return self.searcher.search(queries, k=k)


async def _search_all(batcher, requests):
    await batcher.start()
    try:
        return await asyncio.gather(*(batcher.search(q, k) for q, k in requests), return_exceptions=True)
    finally:
        await batcher.stop()


def test_concurrent_queries_are_merged_into_few_calls(searcher):
    search = RecordingSearch(searcher)
    requests = [(f"a shape number {i}", 1 + i % 5) for i in range(20)]
    results = asyncio.run(_search_all(QueryBatcher(search, max_batch=8, max_wait=0.05), requests))
    assert sum(search.batches) == 20
    assert max(search.batches) == 8  # full batches, not one call per query
    assert len(search.batches) <= 4
    for (query, _), result in zip(requests, results):
        assert result.query == query
        # A batch searches with its largest k; the caller cuts to its own.
        assert len(result.hits) >= 1


def test_a_bad_query_fails_alone(searcher):
    search = RecordingSearch(searcher)
    requests = [("a red circle", 3), ("   ", 3), ("a blue star", 2)]
    results = asyncio.run(_search_all(QueryBatcher(search, max_batch=8, max_wait=0.05), requests))
    assert isinstance(results[1], QueryError)
    assert results[0].normalized_query == "a red circle"
    assert results[2].normalized_query == "a blue star"
    assert [hit.id for hit in results[0].hits] == [hit.id for hit in searcher.search("a red circle", k=3).hits]


def test_search_before_start_is_a_clear_error(searcher):
    with pytest.raises(RuntimeError, match="start"):
        asyncio.run(QueryBatcher(RecordingSearch(searcher)).search("a red circle", 1))
