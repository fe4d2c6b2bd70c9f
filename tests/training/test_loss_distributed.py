"""The multi-worker losses equal the single-worker loss on the same global batch (two CPU
processes, gloo backend): InfoNCE, its multi-positive form with keys repeated within and across
workers, and SigLIP's sigmoid loss chunked over workers."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from zhclip.model.loss import contrastive_loss, distillation_loss, sigmoid_loss

WORLD = 2
BATCH = 6  # per worker
# repeated images and captions, within a worker's rows and across the two workers
IMAGE_KEYS = torch.tensor([0, 1, 1, 2, 3, 4, 5, 0, 6, 7, 7, 8])
TEXT_KEYS = torch.tensor([10, 11, 12, 12, 13, 14, 15, 16, 13, 17, 18, 19])


def _loss(name: str, images, texts, image_keys, text_keys, options):
    keys = {"image_keys": image_keys, "text_keys": text_keys} if options.get("keys") else {}
    if name == "distill":  # the texts play the teacher's embeddings of the same rows
        return distillation_loss(images, texts.detach())
    if name == "siglip":
        return sigmoid_loss(images, texts, torch.tensor(2.5), torch.tensor(-3.0), *keys.values())
    return contrastive_loss(
        images, texts, torch.tensor(2.5), **{k: v for k, v in options.items() if k != "keys"}, **keys
    )


def _global_batch():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(WORLD * BATCH, 16, generator=generator), torch.randn(WORLD * BATCH, 16, generator=generator)


def _worker(rank, port, name, options, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        images, texts = _global_batch()
        rows = slice(rank * BATCH, (rank + 1) * BATCH)
        image = images[rows].clone().requires_grad_(True)
        text = texts[rows].clone().requires_grad_(True)
        loss = _loss(name, image, text, IMAGE_KEYS[rows], TEXT_KEYS[rows], options)
        loss.backward()
        results[rank] = (loss.item(), image.grad.clone(), None if text.grad is None else text.grad.clone())
    finally:
        dist.destroy_process_group()


def _run(name, options):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(port, name, options, results), nprocs=WORLD, join=True)
    return [results[rank] for rank in range(WORLD)]


def _single(name, keys=False):
    images, texts = _global_batch()
    images.requires_grad_(True)
    texts.requires_grad_(True)
    loss = _loss(name, images, texts, IMAGE_KEYS, TEXT_KEYS, {"keys": keys})
    loss.backward()
    return loss.item(), images.grad, texts.grad


@pytest.mark.timeout(180)
@pytest.mark.parametrize("keys", [False, True], ids=["infonce", "multi-positive"])
def test_gathered_loss_equals_the_single_worker_loss_and_gradients(keys):
    loss, image_grad, text_grad = _single("infonce", keys)
    for rank, (worker_loss, worker_image_grad, worker_text_grad) in enumerate(
        _run("infonce", {"gather_with_grad": True, "keys": keys})
    ):
        assert worker_loss == pytest.approx(loss, rel=1e-6)
        rows = slice(rank * BATCH, (rank + 1) * BATCH)
        # Every worker's loss is the global loss, and the gather's backward sums them: WORLD x the
        # single-worker gradient, which DDP's gradient averaging divides back out.
        torch.testing.assert_close(worker_image_grad, WORLD * image_grad[rows])
        torch.testing.assert_close(worker_text_grad, WORLD * text_grad[rows])


@pytest.mark.timeout(180)
@pytest.mark.parametrize("keys", [False, True], ids=["infonce", "multi-positive"])
def test_local_loss_averages_to_the_global_loss(keys):
    loss, _, _ = _single("infonce", keys)
    local = [worker_loss for worker_loss, _, _ in _run("infonce", {"local_loss": True, "keys": keys})]
    assert sum(local) / WORLD == pytest.approx(loss, rel=1e-6)
    assert local[0] != pytest.approx(local[1])


@pytest.mark.timeout(180)
@pytest.mark.parametrize("keys", [False, True], ids=["siglip", "siglip-multi-positive"])
def test_chunked_sigmoid_loss_averages_to_the_single_worker_loss_and_gradients(keys):
    loss, image_grad, text_grad = _single("siglip", keys)
    results = _run("siglip", {"keys": keys})
    assert sum(worker_loss for worker_loss, _, _ in results) / WORLD == pytest.approx(loss, rel=1e-6)
    for rank, (_, worker_image_grad, worker_text_grad) in enumerate(results):
        rows = slice(rank * BATCH, (rank + 1) * BATCH)
        # each worker's loss covers its own images; its texts take every worker's gradient
        torch.testing.assert_close(worker_image_grad, WORLD * image_grad[rows])
        torch.testing.assert_close(worker_text_grad, WORLD * text_grad[rows])


@pytest.mark.timeout(180)
def test_distillation_averages_to_the_single_worker_loss():
    loss, image_grad, _ = _single("distill")
    results = _run("distill", {})
    assert sum(worker_loss for worker_loss, _, _ in results) / WORLD == pytest.approx(loss, rel=1e-6)
    for rank, (_, worker_image_grad, _) in enumerate(results):
        # a row mean over the local batch: WORLD x the global mean's gradient, which DDP averages back
        torch.testing.assert_close(worker_image_grad, WORLD * image_grad[slice(rank * BATCH, (rank + 1) * BATCH)])
