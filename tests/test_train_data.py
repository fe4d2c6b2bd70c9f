"""The streaming training input: an epoch's order, its split across workers, resume, and the decoders."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from components.shards import PreparedSplit, read_pairs
from components.train_data import BatchDecoder, EpochPlan, pair_digest, read_window, training_batches
from model import build_model


@pytest.fixture(scope="module")
def small_groups(raw_dir, tmp_path_factory) -> PreparedSplit:
    """The tiny data in shards of 50 pairs and row groups of 16: 192 training pairs in 15 groups."""
    from components.ingest import IngestConfig, ingest

    out = tmp_path_factory.mktemp("small_groups")
    ingest(raw_dir, out, IngestConfig(shard_rows=50, row_group_rows=16))
    return PreparedSplit.open(str(out), "train")


def _epoch_pairs(plan: EpochPlan, epoch: int) -> list[tuple[int, int]]:
    steps = range(epoch * plan.steps_per_epoch, (epoch + 1) * plan.steps_per_epoch)
    pairs = []
    for window in plan.windows(steps.start, steps.stop):
        table = read_window(plan, window)
        pairs += zip(table["text_id"].to_pylist(), table["image_id"].to_pylist())
    return pairs


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_pair_once_per_epoch_and_workers_disjoint(small_groups, world_size):
    pairs = read_pairs(small_groups.uri, "train")
    everything = set(zip(pairs["text_id"], pairs["image_id"]))
    for epoch in range(3):
        shares = [_epoch_pairs(EpochPlan(small_groups, 8, rank, world_size, seed=5, window_rows=40), epoch)
                  for rank in range(world_size)]
        seen = [pair for share in shares for pair in share]
        assert len(seen) == len(set(seen)), "a pair twice in one epoch"
        assert set(seen) <= everything
        assert len({len(share) for share in shares}) == 1, "every worker the same number of batches"
        assert len(everything) - len(seen) < world_size * 8 + world_size, "only the remainder is dropped"


def test_the_order_depends_on_seed_and_epoch_only_and_batches_mix_shards(small_groups):
    plan = EpochPlan(small_groups, 8, 0, 1, seed=0, window_rows=64)
    first = _epoch_pairs(plan, 0)
    assert _epoch_pairs(EpochPlan(small_groups, 8, 0, 1, seed=0, window_rows=64), 0) == first
    assert _epoch_pairs(plan, 1) != first
    assert _epoch_pairs(EpochPlan(small_groups, 8, 0, 1, seed=1, window_rows=64), 0) != first
    shard_of = {pair: Path(group.path).name for group, table in zip(small_groups.groups, small_groups.tables(["text_id", "image_id"]))
                for pair in zip(table["text_id"].to_pylist(), table["image_id"].to_pylist())}
    shards_per_batch = [len({shard_of[pair] for pair in first[i:i + 8]}) for i in range(0, len(first), 8)]
    assert min(shards_per_batch) >= 2, f"a batch from a single shard: {shards_per_batch}"


def test_a_window_reads_only_its_row_groups_each_once(small_groups, monkeypatch):
    """Memory is a window's rows: reading an epoch touches each row group about once, never the split at once."""
    reads: list[int] = []
    original = PreparedSplit.read
    monkeypatch.setattr(PreparedSplit, "read", lambda self, group, columns=None: reads.append(group) or original(self, group, columns))
    plan = EpochPlan(small_groups, 8, 0, 1, seed=0, window_rows=32)
    for window in plan.windows(0, plan.steps_per_epoch):
        before = len(reads)
        read_window(plan, window)
        assert len(reads) - before == len(set(reads[before:])) <= 32 // 16 + 1 + 1, "a group read twice or too many read"
    assert len(reads) <= len(small_groups.groups) + plan.steps_per_epoch * 8 // 32


@pytest.fixture(scope="module")
def decoder():
    _, processor = build_model("tiny")
    return BatchDecoder(processor, 52, augment=True, seed=3)


def _digests(batches) -> list[tuple[str, float]]:
    return [(pair_digest(b["text_id"], b["image_id"]), float(np.asarray(b["pixel_values"]).sum(dtype=np.float64)))
            for b in batches]


def test_a_resumed_stream_continues_inside_the_epoch_with_the_same_batches(small_groups, decoder):
    plan = EpochPlan(small_groups, 8, 1, 2, seed=0, window_rows=24)
    whole = _digests(training_batches(plan, decoder, 0, 3 * plan.steps_per_epoch))
    for start in (1, 5, plan.steps_per_epoch + 2):
        assert _digests(training_batches(plan, decoder, start, 3 * plan.steps_per_epoch)) == whole[start:]
    assert Counter(d for d, _ in whole) == Counter(d for d, _ in whole[:5] + whole[5:]), "no batch repeated or skipped"


def test_decoding_processes_give_the_same_batches_as_the_training_process(small_groups, decoder):
    plan = EpochPlan(small_groups, 8, 0, 1, seed=0, window_rows=24)
    inline = _digests(training_batches(plan, decoder, 3, 30))
    assert _digests(training_batches(plan, decoder, 3, 30, loader_workers=2)) == inline


@pytest.mark.slow
def test_ray_data_decoders_give_the_same_batches_as_the_training_process(small_groups, decoder):
    import ray

    plan = EpochPlan(small_groups, 8, 0, 1, seed=0, window_rows=24)
    inline = _digests(training_batches(plan, decoder, 3, 30))
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        assert _digests(training_batches(plan, decoder, 3, 30, loader_workers=2, on_ray=True)) == inline
    finally:
        ray.shutdown()


def test_pair_digest_is_order_free_and_tells_pairs_apart():
    assert pair_digest(np.array([1, 2, 3]), np.array([4, 5, 6])) == pair_digest(np.array([3, 1, 2]), np.array([6, 4, 5]))
    assert pair_digest(np.array([1, 2]), np.array([4, 5])) != pair_digest(np.array([1, 2]), np.array([5, 4]))
