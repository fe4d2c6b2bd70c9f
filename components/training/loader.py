"""Training input: each worker's decoded batches, as a stream, in the order of its `EpochPlan`.

Ray Data runs the work: the plan's windows are read and their batches decoded (`BatchDecoder`: image,
augmentation, tokens) by `loader_workers` actors that can sit on any CPU node of the cluster, in order
(`preserve_order`). Without Ray (a bare GPU host, `bench/`), local processes run the same decoder; with
0 workers, the training process. On a GPU a thread prepares the next batches on the device while the
step runs (`on_device`).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from queue import Full, Queue
from typing import cast

import numpy as np
import pyarrow as pa
import torch

from zhclip.components.training.batch_decoder import BatchDecoder
from zhclip.components.training.epoch_plan import EpochPlan, Window, read_window

PREFETCH_BATCHES = 4  # decoded batches in flight per training worker (bounds the loader's memory)
DEVICE_PREFETCH_BATCHES = 2  # batches prepared on the GPU ahead of the step (decoded images held there)


def on_device(
    batches: Iterator[dict[str, np.ndarray]],
    decoder: BatchDecoder,
    device: torch.device,
    ahead: int = DEVICE_PREFETCH_BATCHES,
) -> Iterator[tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]]:
    """Each decoded batch with its model inputs on `device`. On a GPU a thread prepares the next
    `ahead` batches (copies, nvJPEG decoding, resizing) on a CUDA stream of its own while the step
    runs, so the GPU's decoding and the CPU's launches of it overlap training; elsewhere each batch
    is prepared when it is asked for."""
    if device.type != "cuda":
        return ((batch, decoder.to_device(batch, device)) for batch in batches)
    stream = torch.cuda.Stream(device)

    def prepare(batch: dict[str, np.ndarray]):
        with torch.cuda.device(device), torch.cuda.stream(stream):
            inputs = decoder.to_device(batch, device)
            ready = torch.cuda.Event()
            ready.record(stream)
        return inputs, ready

    def handed_over(items):
        for batch, (inputs, ready) in items:
            current = torch.cuda.current_stream(device)
            current.wait_event(ready)
            for tensor in inputs.values():
                tensor.record_stream(current)  # made on the side stream, freed after the step's use
            yield batch, inputs

    return handed_over(prepared_ahead(batches, prepare, ahead))


def prepared_ahead(items: Iterator, prepare, ahead: int) -> Iterator[tuple]:
    """(item, prepare(item)) for each item, in order, prepared by a thread up to `ahead` items ahead;
    an error in either is raised here, and closing this generator stops the thread."""
    queue: Queue = Queue(maxsize=ahead)
    stop = threading.Event()
    finished = object()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                queue.put(entry, timeout=0.1)
                return True
            except Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put((item, prepare(item))):
                    return
            put(finished)
        except BaseException as err:  # handed to the consumer, raised there
            put(err)

    thread = threading.Thread(target=work, name="zhclip-device-prefetch", daemon=True)
    thread.start()
    try:
        while (entry := queue.get()) is not finished:
            if isinstance(entry, BaseException):
                raise entry
            yield entry
    finally:
        stop.set()
        thread.join()
        close = getattr(items, "close", None)  # a generator's
        if close is not None:
            close()  # the thread no longer runs it: free its processes or Ray actors now


def _batches_of(table: pa.Table, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    for start in range(0, len(table), batch_size):
        piece = table.slice(start, batch_size)
        yield {name: piece.column(name).to_numpy(zero_copy_only=False) for name in piece.column_names}


def _raw_batches(plan: EpochPlan, start_step: int, end_step: int) -> Iterator[dict[str, np.ndarray]]:
    for window in plan.windows(start_step, end_step):
        yield from _batches_of(read_window(plan, window), plan.batch_size)


_process_decoder: BatchDecoder | None = None


def _start_decoder(decoder: BatchDecoder) -> None:
    global _process_decoder
    torch.set_num_threads(1)  # one decoding core per process
    _process_decoder = decoder


def _decode_in_process(rows: dict[str, np.ndarray]) -> dict[str, torch.Tensor | np.ndarray]:
    # As tensors: torch hands them back through shared memory, where numpy arrays would be pickled
    # through a pipe. Byte strings (images for the device) can only be pickled.
    assert _process_decoder is not None  # set by the pool's initializer, _start_decoder
    return {
        name: values if values.dtype == object else torch.from_numpy(values)
        for name, values in _process_decoder(rows).items()
    }


def _decoded_by_processes(
    plan: EpochPlan, decoder: BatchDecoder, start_step: int, end_step: int, workers: int
) -> Iterator[dict[str, np.ndarray]]:
    """Batches decoded by local processes, `PREFETCH_BATCHES` per process in flight, in order."""
    with ProcessPoolExecutor(workers, initializer=_start_decoder, initargs=(decoder,)) as pool:
        pending: deque = deque()
        for rows in _raw_batches(plan, start_step, end_step):
            pending.append(pool.submit(_decode_in_process, rows))
            if len(pending) >= PREFETCH_BATCHES * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _windows_read(rows: dict[str, np.ndarray], plan: EpochPlan) -> Iterator[pa.Table]:
    """A window's pairs as one block per batch, so that the decoders share a window's batches."""
    for spec in zip(rows["epoch"], rows["index"], rows["skip"], rows["take"]):
        table = read_window(plan, Window(*spec))
        for start in range(0, len(table), plan.batch_size):
            yield table.slice(start, plan.batch_size)


class _DecoderActor:
    """A Ray Data actor holding one decoder, on one core (torch's own threads would oversubscribe the node)."""

    def __init__(self, decoder: BatchDecoder):
        torch.set_num_threads(1)
        self.decoder = decoder

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.decoder(rows)


def _decoded_by_ray_data(
    plan: EpochPlan, decoder: BatchDecoder, start_step: int, end_step: int, workers: int
) -> Iterator[dict[str, np.ndarray]]:
    """Batches decoded by `workers` Ray Data actors (anywhere in the cluster), in order."""
    import logging

    import ray.data

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its notices per dataset are not the trainer's business
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    windows = [vars(window) for window in plan.windows(start_step, end_step)]
    dataset = (
        ray.data.from_items(windows, override_num_blocks=len(windows))
        # Reading is light (no decoding): it takes no core, so it never waits behind the decoders.
        # Ray's map_batches types fn as batch -> batch; a numpy-format fn with fn_kwargs is outside it
        .map_batches(
            _windows_read,  # pyright: ignore[reportArgumentType]
            batch_size=1,
            batch_format="numpy",
            fn_kwargs={"plan": plan},
            num_cpus=0,
            compute=ray.data.TaskPoolStrategy(size=2),
        )
        .map_batches(
            _DecoderActor,
            batch_size=plan.batch_size,
            batch_format="numpy",
            fn_constructor_args=(decoder,),
            num_cpus=1,
            compute=ray.data.ActorPoolStrategy(size=workers),
        )
    )
    # batch_format="numpy": dicts of arrays (Ray types the batches of every format alike)
    batches = dataset.iter_batches(batch_size=plan.batch_size, batch_format="numpy", prefetch_batches=PREFETCH_BATCHES)
    yield from cast(Iterator[dict[str, np.ndarray]], batches)


def training_batches(
    plan: EpochPlan,
    decoder: BatchDecoder,
    start_step: int,
    end_step: int,
    loader_workers: int = 0,
    on_ray: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """This worker's decoded batches for steps [start_step, end_step), in the plan's order.

    Decoded by `loader_workers` Ray Data actors when `on_ray`, by as many local processes otherwise,
    in this process when 0; the batches are the same either way.
    """
    if not loader_workers:
        return (decoder(rows) for rows in _raw_batches(plan, start_step, end_step))
    if on_ray:
        return _decoded_by_ray_data(plan, decoder, start_step, end_step, loader_workers)
    return _decoded_by_processes(plan, decoder, start_step, end_step, loader_workers)
