"""The multi-worker contrastive loss equals the single-worker loss on the same global batch
(two CPU processes, gloo backend)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from zhclip.model import contrastive_loss

WORLD = 2
BATCH = 6  # per worker


def _global_batch():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(WORLD * BATCH, 16, generator=generator), torch.randn(WORLD * BATCH, 16, generator=generator)


def _worker(rank, port, options, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        images, texts = _global_batch()
        rows = slice(rank * BATCH, (rank + 1) * BATCH)
        image = images[rows].clone().requires_grad_(True)
        text = texts[rows].clone().requires_grad_(True)
        loss = contrastive_loss(image, text, torch.tensor(2.5), **options)
        loss.backward()
        results[rank] = (loss.item(), image.grad.clone(), text.grad.clone())
    finally:
        dist.destroy_process_group()


def _run(options):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(port, options, results), nprocs=WORLD, join=True)
    return [results[rank] for rank in range(WORLD)]


def _single():
    images, texts = _global_batch()
    images.requires_grad_(True)
    texts.requires_grad_(True)
    loss = contrastive_loss(images, texts, torch.tensor(2.5))
    loss.backward()
    return loss.item(), images.grad, texts.grad


@pytest.mark.timeout(180)
def test_gathered_loss_equals_the_single_worker_loss_and_gradients():
    loss, image_grad, text_grad = _single()
    for rank, (worker_loss, worker_image_grad, worker_text_grad) in enumerate(_run({"gather_with_grad": True})):
        assert worker_loss == pytest.approx(loss, rel=1e-6)
        rows = slice(rank * BATCH, (rank + 1) * BATCH)
        # Every worker's loss is the global loss, and the gather's backward sums them: WORLD x the
        # single-worker gradient, which DDP's gradient averaging divides back out.
        torch.testing.assert_close(worker_image_grad, WORLD * image_grad[rows])
        torch.testing.assert_close(worker_text_grad, WORLD * text_grad[rows])


@pytest.mark.timeout(180)
def test_local_loss_averages_to_the_global_loss():
    loss, _, _ = _single()
    local = [worker_loss for worker_loss, _, _ in _run({"local_loss": True})]
    assert sum(local) / WORLD == pytest.approx(loss, rel=1e-6)
    assert local[0] != pytest.approx(local[1])
