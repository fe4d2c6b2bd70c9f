"""The losses of model/loss.py against values computed by hand: multi-positive InfoNCE (false
negatives), SigLIP's sigmoid loss and feature distillation."""

import math

import pytest
import torch

from zhclip.model.loss import contrastive_loss, distillation_loss, pair_positives, sigmoid_loss

# Four pairs: 0 and 1 share an image, 2 and 3 share a caption. Unit features, scale 1 (log scale 0).
IMAGES = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
TEXTS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
IMAGE_KEYS = torch.tensor([7, 7, 8, 9])
TEXT_KEYS = torch.tensor([1, 2, 3, 3])
LOG_SCALE_ONE = torch.tensor(0.0)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_pairs_sharing_an_image_or_a_caption_are_positives():
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(pair_positives(IMAGE_KEYS, TEXT_KEYS, IMAGE_KEYS, TEXT_KEYS), expected)


def softmax_cross_entropy(logits: list[list[float]], targets: list[list[float]]) -> float:
    """Mean over rows of -sum_j target_ij log softmax(row)_j, in plain Python."""
    total = 0.0
    for row, target in zip(logits, targets):
        log_norm = math.log(sum(math.exp(value) for value in row))
        total -= sum(t * (value - log_norm) for value, t in zip(row, target))
    return total / len(logits)


def test_multi_positive_loss_equals_the_hand_computed_value():
    # image->text logits: rows [1,0,0,1], [1,0,0,1], [0,1,1,0], [0,1,1,0]; each row's target is half
    # on its two matches, one scoring e and one 1 out of 2(e+1): loss log(2(e+1)) - 1/2 per row.
    # text->image (the transpose): rows alternate log(2(e+1)) - 1 and log(2(e+1)); same mean.
    expected = math.log(2 * (math.e + 1)) - 0.5
    loss = contrastive_loss(IMAGES, TEXTS, LOG_SCALE_ONE, image_keys=IMAGE_KEYS, text_keys=TEXT_KEYS)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_multi_positive_loss_differs_from_the_diagonal_one_where_pairs_repeat():
    images = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.0, 1.0]])
    scale = 2.0
    logits = (scale * images @ TEXTS.T).tolist()
    columns = [list(column) for column in zip(*logits)]
    halves = [[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5]]
    diagonal = [[float(i == j) for j in range(4)] for i in range(4)]
    aware = (softmax_cross_entropy(logits, halves) + softmax_cross_entropy(columns, halves)) / 2
    plain = (softmax_cross_entropy(logits, diagonal) + softmax_cross_entropy(columns, diagonal)) / 2
    assert abs(aware - plain) > 0.05
    log_scale = torch.tensor(math.log(scale))
    loss = contrastive_loss(images, TEXTS, log_scale, image_keys=IMAGE_KEYS, text_keys=TEXT_KEYS)
    assert loss.item() == pytest.approx(aware, abs=1e-6)
    assert contrastive_loss(images, TEXTS, log_scale).item() == pytest.approx(plain, abs=1e-6)


def test_multi_positive_loss_is_infonce_when_every_pair_is_unique():
    generator = torch.Generator().manual_seed(0)
    images, texts = torch.randn(16, 8, generator=generator), torch.randn(16, 8, generator=generator)
    keys = torch.arange(16)
    for local_loss in (False, True):
        plain = contrastive_loss(images, texts, torch.tensor(2.5), local_loss=local_loss)
        aware = contrastive_loss(
            images, texts, torch.tensor(2.5), local_loss=local_loss, image_keys=keys, text_keys=keys + 100
        )
        assert abs(aware.item() - plain.item()) < 1e-6


def test_sigmoid_loss_equals_the_hand_computed_value():
    images, texts = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    bias = torch.tensor(-1.0)
    # logits = cosine + bias = [[0, 0], [-1, -1]]; labels +1 on the diagonal, -1 off it; / 2 pairs
    expected = -(log_sigmoid(0) + log_sigmoid(-0.0) + log_sigmoid(1) + log_sigmoid(-1)) / 2
    assert sigmoid_loss(images, texts, LOG_SCALE_ONE, bias).item() == pytest.approx(expected, abs=1e-6)
    # the two pairs share their caption: all four are matches, labels +1 everywhere
    same_caption = -(2 * log_sigmoid(0) + 2 * log_sigmoid(-1)) / 2
    loss = sigmoid_loss(images, texts, LOG_SCALE_ONE, bias, torch.tensor([1, 2]), torch.tensor([5, 5]))
    assert loss.item() == pytest.approx(same_caption, abs=1e-6)


def test_sigmoid_loss_with_repeated_images_and_captions():
    bias = torch.tensor(-2.0)
    positives = pair_positives(IMAGE_KEYS, TEXT_KEYS, IMAGE_KEYS, TEXT_KEYS)
    logits = (IMAGES @ TEXTS.T).tolist()
    expected = (
        -sum(log_sigmoid((1 if positives[i, j] else -1) * (logits[i][j] - 2)) for i in range(4) for j in range(4)) / 4
    )
    loss = sigmoid_loss(IMAGES, TEXTS, LOG_SCALE_ONE, bias, IMAGE_KEYS, TEXT_KEYS)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_distillation_loss_is_the_mean_cosine_distance():
    student = torch.tensor([[2.0, 0.0], [1.0, 1.0]], requires_grad=True)
    teacher = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    loss = distillation_loss(student, teacher)
    assert loss.item() == pytest.approx((0 + 1 - 1 / math.sqrt(2)) / 2, abs=1e-6)
    loss.backward()
    assert (
        student.grad is not None and student.grad[1].abs().sum() > 0
    )  # the student learns (the reference detaches it)
    with pytest.raises(ValueError, match="projection_dim"):
        distillation_loss(student, torch.zeros(2, 3))
