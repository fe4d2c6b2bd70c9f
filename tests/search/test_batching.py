"""The search service's text batcher: concurrent clients share model calls; one client never waits."""

from __future__ import annotations

import threading
import time

import numpy as np

from zhclip.components.search.observability import ServiceMetrics
from zhclip.components.search.service import _TextBatcher

MODEL_CALL_S = 0.05  # a model call's cost, whatever the batch (as a CPU text tower, roughly)


class _Model:
    """Records the size of each call and takes MODEL_CALL_S for it."""

    def __init__(self):
        self.sizes: list[int] = []

    def __call__(self, embedder, frame) -> np.ndarray:
        self.sizes.append(len(frame))
        time.sleep(MODEL_CALL_S)
        return np.ones((len(frame), 4), dtype=np.float32) * embedder


def _clients(batcher: _TextBatcher, clients: int, queries: int) -> list[float]:
    """`clients` threads, each sending `queries` texts one after another; each answer's time."""
    times: list[float] = []

    def client(number: int) -> None:
        for query in range(queries):
            started = time.perf_counter()
            vector = batcher(7.0, f"第{number}位第{query}次")
            times.append(time.perf_counter() - started)
            assert vector.shape == (1, 4) and vector[0, 0] == 7.0

    threads = [threading.Thread(target=client, args=(number,)) for number in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return times


def test_concurrent_clients_merge_into_full_batches():
    model = _Model()
    batcher = _TextBatcher(model, max_batch=32, wait_s=0.03, metrics=ServiceMetrics())
    _clients(batcher, clients=8, queries=12)
    assert sum(model.sizes) == 8 * 12
    settled = model.sizes[4:]  # once the clients' groups have merged
    assert np.mean(settled) >= 7, model.sizes


def test_without_the_wait_clients_split_into_groups_that_take_turns():
    model = _Model()
    batcher = _TextBatcher(model, max_batch=32, wait_s=0.0, metrics=ServiceMetrics())
    _clients(batcher, clients=8, queries=12)
    assert sum(model.sizes) == 8 * 12 and np.mean(model.sizes[4:]) < 7, model.sizes


def test_one_client_never_waits_for_company():
    model = _Model()
    batcher = _TextBatcher(model, max_batch=32, wait_s=0.5, metrics=ServiceMetrics())
    times = _clients(batcher, clients=1, queries=5)
    assert model.sizes == [1] * 5
    assert max(times) < MODEL_CALL_S + 0.25  # far below the 0.5 s it would wait for a second text
