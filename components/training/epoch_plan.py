"""The training order: which prepared pairs each worker reads, in which order, for every epoch.

The order (`EpochPlan`) depends only on (seed, epoch) and the split's row groups, never on the data's
bytes: the row groups are permuted, their rows laid end to end, and each of the `world_size` workers
takes an equal contiguous range of that sequence (disjoint; the remainder, less than one global batch
plus one row per worker, is dropped as in the reference). A worker's range is cut into windows of
about `window_rows` rows; the rows of a window, drawn from the several row groups of random shards it
spans, are shuffled. So every batch mixes shards, memory holds a window (not the split), and a run
resumed at step s computes, without reading anything, the window and row it continues from: it reads
exactly the batches an uninterrupted run reads, in the same order.

Why not Ray Data's own split and shuffle: `streaming_split` hands blocks to workers as they ask,
so which pairs a worker gets is not reproducible and an iterator has no state to resume from;
`random_shuffle` moves the whole split through the object store.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from zhclip.components.data.shards import PreparedSplit

PAIR_COLUMNS = ["text_id", "text", "image_id", "image"]
WINDOW_READERS = 8  # row groups of a window read at once


def steps_per_epoch(pairs: int, batch_size: int, world_size: int) -> int:
    """Full batches each worker gets per epoch (the remainder is dropped, as in the reference)."""
    return (pairs // world_size) // batch_size


@dataclass(frozen=True)
class Window:
    """Rows [skip, skip + take) of window `index` of an epoch: whole batches, in the window's shuffled order."""

    epoch: int
    index: int
    skip: int
    take: int


@dataclass
class EpochPlan:
    """Which rows of the split a worker reads, in which order, for every epoch (see the module doc)."""

    split: PreparedSplit
    batch_size: int
    rank: int
    world_size: int
    seed: int
    window_rows: int = 4096

    def __post_init__(self):
        self.group_rows = np.array([group.rows for group in self.split.groups], dtype=np.int64)
        self.first_rows = self.split.first_rows()
        self.pairs = self.split.rows
        self.steps_per_epoch = steps_per_epoch(self.pairs, self.batch_size, self.world_size)
        self.window_batches = max(1, round(self.window_rows / self.batch_size))

    def windows(self, start_step: int, end_step: int) -> Iterator[Window]:
        """The windows covering this worker's steps [start_step, end_step), across epochs."""
        step = start_step
        while step < end_step:
            epoch, in_epoch = divmod(step, self.steps_per_epoch)
            index, in_window = divmod(in_epoch, self.window_batches)
            window_steps = min(self.window_batches, self.steps_per_epoch - index * self.window_batches)
            steps = min(window_steps - in_window, end_step - step)
            yield Window(epoch, index, in_window * self.batch_size, steps * self.batch_size)
            step += steps

    def rows(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """(row group, row within it) of each row the window hands out, in order."""
        rng = np.random.default_rng([self.seed, window.epoch])
        order = rng.permutation(len(self.group_rows))
        ends = np.cumsum(self.group_rows[order])
        per_worker = self.steps_per_epoch * self.batch_size
        window_size = self.window_batches * self.batch_size
        first = self.rank * (self.pairs // self.world_size) + window.index * window_size
        positions = np.arange(first, first + min(window_size, per_worker - window.index * window_size))
        np.random.default_rng([self.seed, window.epoch, self.rank, window.index]).shuffle(positions)
        positions = positions[window.skip : window.skip + window.take]
        slot = np.searchsorted(ends, positions, side="right")
        return order[slot], positions - (ends[slot] - self.group_rows[order[slot]])


def read_window(plan: EpochPlan, window: Window) -> pa.Table:
    """The window's pairs in order, with their split-wide row number and epoch (augmentation seeds)."""
    groups, offsets = plan.rows(window)
    wanted = np.unique(groups)
    places = [np.flatnonzero(groups == group) for group in wanted]

    def piece(group: int, chosen: np.ndarray) -> pa.Table:
        return plan.split.read(int(group), PAIR_COLUMNS).take(offsets[chosen])

    # The row groups of a window at once: from MinIO each read is a round trip (Arrow releases the GIL).
    with ThreadPoolExecutor(WINDOW_READERS) as pool:
        pieces = list(pool.map(piece, wanted, places))
    table = pa.concat_tables(pieces).take(np.argsort(np.concatenate(places), kind="stable"))
    rows = plan.first_rows[groups] + offsets
    return table.append_column("row", pa.array(rows)).append_column("epoch", pa.array(np.full(len(rows), window.epoch)))


def pair_digest(text_ids: np.ndarray, image_ids: np.ndarray) -> str:
    """An order-free fingerprint of a batch's (text_id, image_id) pairs: equal digests, equal pairs
    (barring a 64-bit collision). The training history keeps one per step, so runs can be compared."""
    keys = (np.asarray(text_ids, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ np.asarray(
        image_ids, dtype=np.uint64
    )
    keys ^= keys >> np.uint64(31)
    keys *= np.uint64(0xBF58476D1CE4E5B9)
    keys ^= keys >> np.uint64(29)
    return f"{int(keys.sum(dtype=np.uint64)):016x}"
