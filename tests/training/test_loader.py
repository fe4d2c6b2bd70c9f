"""The streaming training input: an epoch's order, its split across workers, resume, and the decoders."""

import io
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from builders import pil_decode_jpegs
from PIL import Image

from zhclip.components.data.shards import PreparedSplit, read_pairs
from zhclip.components.training.batch_decoder import BatchDecoder
from zhclip.components.training.epoch_plan import EpochPlan, pair_digest, read_window
from zhclip.components.training.loader import on_device, prepared_ahead, training_batches
from zhclip.model import build_model


@pytest.fixture(scope="module")
def small_groups(raw_dir, tmp_path_factory) -> PreparedSplit:
    """The tiny data in shards of 50 pairs and row groups of 16: 192 training pairs in 15 groups."""
    from zhclip.components.data.ingest import IngestConfig, ingest

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
        shares = [
            _epoch_pairs(EpochPlan(small_groups, 8, rank, world_size, seed=5, window_rows=40), epoch)
            for rank in range(world_size)
        ]
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
    shard_of = {
        pair: Path(group.path).name
        for group, table in zip(small_groups.groups, small_groups.tables(["text_id", "image_id"]))
        for pair in zip(table["text_id"].to_pylist(), table["image_id"].to_pylist())
    }
    shards_per_batch = [len({shard_of[pair] for pair in first[i : i + 8]}) for i in range(0, len(first), 8)]
    assert min(shards_per_batch) >= 2, f"a batch from a single shard: {shards_per_batch}"


def test_a_window_reads_only_its_row_groups_each_once(small_groups, monkeypatch):
    """Memory is a window's rows: reading an epoch touches each row group about once, never the split at once."""
    reads: list[int] = []
    original = PreparedSplit.read
    monkeypatch.setattr(
        PreparedSplit, "read", lambda self, group, columns=None: reads.append(group) or original(self, group, columns)
    )
    plan = EpochPlan(small_groups, 8, 0, 1, seed=0, window_rows=32)
    for window in plan.windows(0, plan.steps_per_epoch):
        before = len(reads)
        read_window(plan, window)
        assert len(reads) - before == len(set(reads[before:])) <= 32 // 16 + 1 + 1, (
            "a group read twice or too many read"
        )
    assert len(reads) <= len(small_groups.groups) + plan.steps_per_epoch * 8 // 32


@pytest.fixture(scope="module")
def decoder():
    _, processor = build_model("tiny")
    return BatchDecoder(processor, 52, augment=True, seed=3)


def _digests(batches) -> list[tuple[str, float]]:
    return [
        (pair_digest(b["text_id"], b["image_id"]), float(np.asarray(b["pixel_values"]).sum(dtype=np.float64)))
        for b in batches
    ]


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
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        assert _digests(training_batches(plan, decoder, 3, 30, loader_workers=2, on_ray=True)) == inline
    finally:
        ray.shutdown()


def test_pair_digest_is_order_free_and_tells_pairs_apart():
    assert pair_digest(np.array([1, 2, 3]), np.array([4, 5, 6])) == pair_digest(
        np.array([3, 1, 2]), np.array([6, 4, 5])
    )
    assert pair_digest(np.array([1, 2]), np.array([4, 5])) != pair_digest(np.array([1, 2]), np.array([5, 4]))


# Images of each kind a split may hold: what nvJPEG takes (baseline RGB or grey JPEG) and what the
# loaders decode instead (PNG, progressive JPEG, CMYK JPEG).
IMAGE_KINDS = [
    ("JPEG", "RGB", {}),
    ("JPEG", "L", {}),
    ("PNG", "RGB", {}),
    ("JPEG", "RGB", {"progressive": True}),
    ("JPEG", "CMYK", {}),
]


def _encoded(index: int) -> tuple[bytes, bool]:
    """A smooth photo-like image of a varying size in one of IMAGE_KINDS; and whether the device takes it."""
    fmt, mode, options = IMAGE_KINDS[index % len(IMAGE_KINDS)]
    rng = np.random.default_rng(index)
    size = (40 + 7 * index, 30 + 5 * (index % 4))
    image = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize(size, Image.BICUBIC).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}), **options)
    return buffer.getvalue(), fmt == "JPEG" and mode != "CMYK" and not options


@pytest.fixture(scope="module")
def mixed_split(tmp_path_factory) -> PreparedSplit:
    """A prepared split of 40 pairs whose images are of every kind in IMAGE_KINDS, in row groups of 8."""
    from zhclip.components.data.schema import PAIR_SCHEMA

    folder = tmp_path_factory.mktemp("mixed") / "train"
    folder.mkdir()
    ids = list(range(40))
    table = pa.Table.from_pydict(
        {"text_id": ids, "text": [f"第{i}张图" for i in ids], "image_id": ids, "image": [_encoded(i)[0] for i in ids]},
        schema=PAIR_SCHEMA,
    )
    pq.write_table(table, folder / "part-00000.parquet", row_group_size=8)
    return PreparedSplit.open(str(folder.parent), "train")


@pytest.mark.parametrize("augment", [False, True])
def test_images_decoded_on_the_device_match_the_loaders_pixels(mixed_split, monkeypatch, augment):
    """decode_on_device: the loaders send JPEG bytes and crop boxes (PNG, progressive and CMYK decoded
    by them instead); on the device the same crops come out as the loaders' 8-bit path makes them."""
    monkeypatch.setattr("zhclip.components.training.batch_decoder.decode_jpegs", pil_decode_jpegs)
    _, processor = build_model("tiny")
    plan = EpochPlan(mixed_split, 8, 0, 1, seed=0, window_rows=16)
    device_decoder = BatchDecoder(processor, 52, augment=augment, seed=3, on_device=True)
    loader_decoder = BatchDecoder(processor, 52, augment=augment, seed=3, eight_bit=True)
    for sent, decoded in zip(
        training_batches(plan, device_decoder, 0, 5, loader_workers=1), training_batches(plan, loader_decoder, 0, 5)
    ):
        assert "pixel_values" not in sent
        takes = [_encoded(int(i))[1] for i in sent["image_id"]]
        assert [len(blob) > 0 for blob in sent["jpeg"]] == takes
        assert [len(blob) > 0 for blob in sent["pixels"]] == [not t for t in takes]
        assert (np.asarray(sent["text_id"]) == decoded["text_id"]).all()
        ours = device_decoder.to_device(sent, torch.device("cpu"))
        theirs = loader_decoder.to_device(decoded, torch.device("cpu"))
        assert (ours["input_ids"] == theirs["input_ids"]).all()
        assert ours["pixel_values"].shape == theirs["pixel_values"].shape == (8, 3, 32, 32)
        # PIL's and torch's bicubic resizes differ by about one 8-bit level (~0.015); a wrong crop or row by far more
        difference = (ours["pixel_values"] - theirs["pixel_values"]).abs()
        assert difference.max() < 0.05 and difference.mean() < 0.01
        loader_rows = [index for index, blob in enumerate(sent["pixels"]) if len(blob)]
        assert torch.equal(ours["pixel_values"][loader_rows], theirs["pixel_values"][loader_rows])


def test_device_prefetch_keeps_order_raises_errors_and_stops_when_closed():
    assert [item for item, _ in prepared_ahead(iter(range(20)), lambda x: x * x, ahead=2)] == list(range(20))
    assert [done for _, done in prepared_ahead(iter(range(5)), lambda x: x * x, ahead=3)] == [0, 1, 4, 9, 16]

    def failing(item):
        if item == 3:
            raise ValueError("bad batch 3")
        return item

    with pytest.raises(ValueError, match="bad batch 3"):
        list(prepared_ahead(iter(range(10)), failing, ahead=2))
    prepared = []
    source = (i for i in range(10**9))
    stream = prepared_ahead(source, lambda x: prepared.append(x) or x, ahead=2)
    assert next(stream)[0] == 0
    stream.close()
    time.sleep(0.3)
    assert len(prepared) <= 4, "the thread went on preparing after the consumer stopped"
    assert not any(t.name == "zhclip-device-prefetch" for t in threading.enumerate())
    assert source.gi_frame is None, "the source was not closed"


def test_on_device_hands_over_each_batch_with_its_inputs(mixed_split, monkeypatch):
    monkeypatch.setattr("zhclip.components.training.batch_decoder.decode_jpegs", pil_decode_jpegs)
    _, processor = build_model("tiny")
    decoder = BatchDecoder(processor, 52, on_device=True)
    plan = EpochPlan(mixed_split, 8, 0, 1, seed=0, window_rows=16)
    pairs = [
        (batch["text_id"].tolist(), inputs["pixel_values"].shape)
        for batch, inputs in on_device(training_batches(plan, decoder, 0, 5), decoder, torch.device("cpu"))
    ]
    assert pairs == [(b["text_id"].tolist(), (8, 3, 32, 32)) for b in training_batches(plan, decoder, 0, 5)]


def test_decode_on_device_without_torchvision_is_a_clear_error(monkeypatch):
    from zhclip.components.training.config import TrainConfig

    monkeypatch.setattr("zhclip.components.training.config.torchvision_installed", lambda: False)
    with pytest.raises(ValueError, match=r"decode_on_device needs torchvision.*zhclip\[gpu-decode\]"):
        TrainConfig(decode_on_device=True)


REFERENCE_PYTHON = Path(__file__).resolve().parents[2] / ".venv-reference" / "bin" / "python"
DECODE_WITH_TORCHVISION = """
import importlib.util, io, sys, numpy, torch
spec = importlib.util.spec_from_file_location("gpu_decode", sys.argv[1])
gpu_decode = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_decode)
blobs = numpy.load(sys.argv[2], allow_pickle=True)
boxes = [tuple(int(v) for v in box) for box in numpy.load(sys.argv[3])]
encoded = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
images = gpu_decode.decode_jpegs(encoded, boxes, torch.device("cpu"))
numpy.savez(sys.argv[4], *[image.numpy() for image in images])
"""


@pytest.mark.slow
def test_torchvision_decodes_and_crops_the_jpegs_as_pil_does(tmp_path):
    """zhclip.components.training.gpu_decode.decode_jpegs with the real torchvision (the reference environment's; on
    the CPU it decodes with libjpeg-turbo) against PIL, for RGB and grey JPEGs."""
    if not REFERENCE_PYTHON.is_file():
        pytest.fail("the reference environment is missing: run `make reference-env` (make test does)")
    blobs = [blob for blob, takes in map(_encoded, range(12)) if takes]
    sizes = [Image.open(io.BytesIO(blob)).size for blob in blobs]
    boxes = np.array([(index % 3, 1, width - index % 2, height - 2) for index, (width, height) in enumerate(sizes)])
    np.save(tmp_path / "blobs.npy", np.array(blobs, dtype=object), allow_pickle=True)
    np.save(tmp_path / "boxes.npy", boxes)
    module = Path(__file__).resolve().parents[2] / "components" / "training" / "gpu_decode.py"
    result = subprocess.run(
        [
            str(REFERENCE_PYTHON),
            "-c",
            DECODE_WITH_TORCHVISION,
            str(module),
            str(tmp_path / "blobs.npy"),
            str(tmp_path / "boxes.npy"),
            str(tmp_path / "out.npz"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    decoded = np.load(tmp_path / "out.npz")
    assert len(decoded.files) == len(blobs) >= 4
    for index, (blob, box) in enumerate(zip(blobs, boxes)):
        theirs = decoded[f"arr_{index}"].astype(int)
        ours = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB").crop(tuple(box))).transpose(2, 0, 1).astype(int)
        assert theirs.shape == ours.shape
        assert np.abs(theirs - ours).max() <= 1, f"image {index}: torchvision and PIL decode differently"
