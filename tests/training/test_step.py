"""The Ray-free training step: accumulation, precision, masking, locking, checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch

from zhclip.components.training.checkpoint import load_checkpoint, restore_state, save_checkpoint
from zhclip.components.training.step import (
    TrainStep,
    add_logit_bias,
    build_optimizer,
    image_tower_locked,
    warmup_cosine,
)
from zhclip.components.training.step_config import StepConfig
from zhclip.model import build_model, lock_image_tower
from zhclip.model.masking import keep_random_patches


def _batch(size: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(106, 21128, (size, 52), generator=generator),
        "attention_mask": torch.ones(size, 52, dtype=torch.long),
        "pixel_values": torch.randn(size, 3, 32, 32, generator=generator),
    }


def _tiny_without_dropout():
    """Training mode with every dropout at zero, so two forward passes of one batch agree."""
    model, processor = build_model("tiny")
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    return model, processor


def _gradients_after_step(model, config: StepConfig, batch) -> tuple[float, dict[str, torch.Tensor]]:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    result = TrainStep(model, optimizer, None, config)(batch)
    return result["loss"], {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("stage", [1, 2])
def test_accumulation_gives_the_loss_and_gradients_of_the_whole_batch(stage):
    model, _ = _tiny_without_dropout()
    if stage == 1:
        lock_image_tower(model)
    batch = _batch(12)
    loss_once, grads_once = _gradients_after_step(copy.deepcopy(model), StepConfig(accum_steps=1), batch)
    loss_accum, grads_accum = _gradients_after_step(copy.deepcopy(model), StepConfig(accum_steps=3), batch)
    assert loss_accum == pytest.approx(loss_once, abs=1e-5)
    assert grads_once.keys() == grads_accum.keys() and "logit_scale" in grads_once
    for name, grad in grads_once.items():
        torch.testing.assert_close(grads_accum[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_accumulation_rejects_a_batch_that_does_not_split():
    model, _ = _tiny_without_dropout()
    step = TrainStep(model, build_optimizer(model, 1e-3, 0.1), None, StepConfig(accum_steps=3))
    with pytest.raises(ValueError, match="accum_steps=3"):
        step(_batch(8))


def test_bf16_step_matches_fp32_step_within_bf16_tolerance():
    model, _ = _tiny_without_dropout()
    batch = _batch(8)
    loss_fp32, _ = _gradients_after_step(copy.deepcopy(model), StepConfig(precision="fp32"), batch)
    loss_bf16, _ = _gradients_after_step(copy.deepcopy(model), StepConfig(precision="bf16"), batch)
    assert loss_bf16 == pytest.approx(loss_fp32, rel=2e-2)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_locked_tower_gets_no_gradient_graph_and_no_optimizer_state():
    model, _ = build_model("tiny")
    lock_image_tower(model)
    assert image_tower_locked(model)
    output = model(**_batch(4))
    assert output.image_embeds.grad_fn is None and output.text_embeds.grad_fn is not None
    optimizer = build_optimizer(model, 1e-3, 0.1)
    TrainStep(model, optimizer)(_batch(4))
    frozen = {id(p) for p in model.vision_model.parameters()} | {id(p) for p in model.visual_projection.parameters()}
    assert optimizer.state and not frozen & {id(p) for p in optimizer.state}


def test_cached_image_embeddings_give_the_same_loss_as_pixels():
    model, _ = _tiny_without_dropout()
    lock_image_tower(model)
    batch = _batch(8)
    with torch.no_grad():
        image_embeds = model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
    loss_pixels, _ = _gradients_after_step(copy.deepcopy(model), StepConfig(), batch)
    cached = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "image_embeds": image_embeds}
    loss_cached, _ = _gradients_after_step(copy.deepcopy(model), StepConfig(), cached)
    assert loss_cached == pytest.approx(loss_pixels, abs=1e-5)


def test_patch_masking_keeps_the_class_token_and_a_share_of_patches_in_training_only():
    tokens = torch.arange(2 * 17 * 3, dtype=torch.float32).reshape(2, 17, 3)
    kept = keep_random_patches(tokens, 0.5)
    assert kept.shape == (2, 9, 3)
    assert torch.equal(kept[:, 0], tokens[:, 0])
    for row in range(2):  # kept patches are real patches of that image, in their original order
        firsts = kept[row, 1:, 0].tolist()
        assert firsts == sorted(firsts) and set(firsts) <= set(tokens[row, 1:, 0].tolist())
    model, _ = build_model("tiny")
    step = TrainStep(model, build_optimizer(model, 1e-3, 0.1), None, StepConfig(mask_ratio=0.75))
    pixels = _batch(2)["pixel_values"]
    model.train()
    assert model.vision_model(pixel_values=pixels).last_hidden_state.shape[1] == 1 + 4
    model.eval()
    assert model.vision_model(pixel_values=pixels).last_hidden_state.shape[1] == 1 + 16
    assert step.mask_hook is not None


def test_patch_masking_is_refused_for_a_resnet_tower():
    model, _ = build_model("tiny-rn")
    with pytest.raises(ValueError, match="ViT"):
        TrainStep(model, build_optimizer(model, 1e-3, 0.1), None, StepConfig(mask_ratio=0.5))


def test_schedule_warms_up_linearly_then_decays_to_zero():
    model, _ = build_model("tiny")
    optimizer = build_optimizer(model, 1.0, 0.1)
    scheduler = warmup_cosine(optimizer, warmup_steps=4, total_steps=12)
    rates = []
    for _ in range(12):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert rates[4:] == sorted(rates[4:], reverse=True) and rates[-1] < 0.05


def test_weight_decay_spares_biases_norms_embeddings_and_logit_scale():
    model, _ = build_model("tiny")
    decay, no_decay = build_optimizer(model, 1e-3, 0.1).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = [names[id(p)] for p in no_decay["params"]]
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "logit_scale" in exempt and "text_model.embeddings.word_embeddings.weight" in exempt
    assert all(n.endswith("bias") or "norm" in n.lower() or "embed" in n or n == "logit_scale" for n in exempt)
    assert "text_model.encoder.layer.0.attention.self.query.weight" in {names[id(p)] for p in decay["params"]}


def test_resumed_steps_repeat_the_uninterrupted_ones(tmp_path):
    """Save after 2 steps, continue to 4 in a fresh model from the checkpoint: the same losses."""

    def new_step(model):
        optimizer = build_optimizer(model, 1e-3, 0.1)
        return TrainStep(model, optimizer, warmup_cosine(optimizer, 2, 4), StepConfig(mask_ratio=0.5))

    model, processor = build_model("tiny")
    model.train()
    step = new_step(model)
    straight = [step(_batch(8, seed=i))["loss"] for i in range(2)]
    save_checkpoint(tmp_path / "ckpt", model, processor, step, {"step": 2})
    straight += [step(_batch(8, seed=i))["loss"] for i in range(2, 4)]

    restored, _, state = load_checkpoint(tmp_path / "ckpt")
    restored.train()
    resumed_step = new_step(restored)
    assert restore_state(resumed_step, state) == {"step": 2}
    resumed = [resumed_step(_batch(8, seed=i))["loss"] for i in range(2, 4)]
    assert resumed == pytest.approx(straight[2:], abs=1e-6)


def test_activation_checkpointing_changes_neither_loss_nor_gradients():
    model, _ = _tiny_without_dropout()
    checkpointed = copy.deepcopy(model)
    checkpointed.gradient_checkpointing_enable()
    loss, grads = _gradients_after_step(model, StepConfig(), _batch(8))
    loss_ckpt, grads_ckpt = _gradients_after_step(checkpointed, StepConfig(), _batch(8))
    assert loss_ckpt == pytest.approx(loss, abs=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, msg=name)


@pytest.mark.parametrize("loss", ["infonce", "siglip"])
def test_accumulation_keeps_the_fine_tuning_losses_and_gradients(loss):
    """False-negative keys, the sigmoid loss's bias and both distillation terms under the feature
    cache: the loss and gradients of the whole batch."""
    model, _ = _tiny_without_dropout()
    if loss == "siglip":
        add_logit_bias(model, -10.0)
    teacher = build_model("tiny", seed=1)[0].eval()
    batch = _batch(12) | {
        "image_key": torch.tensor([0, 0, 1, 2, 3, 3, 4, 5, 6, 7, 8, 8]),
        "text_key": torch.tensor([0, 1, 1, 2, 3, 4, 5, 6, 6, 7, 8, 9]),
    }
    settings = {"loss": loss, "false_negatives": True, "distill_image_weight": 0.5, "distill_text_weight": 1.0}

    def step(accum_steps: int) -> tuple[float, dict[str, torch.Tensor]]:
        trained = copy.deepcopy(model)
        optimizer = torch.optim.SGD([p for p in trained.parameters() if p.requires_grad], lr=0.0)
        result = TrainStep(trained, optimizer, None, StepConfig(accum_steps=accum_steps, **settings), teacher=teacher)(
            batch
        )
        return result["loss"], {name: p.grad.clone() for name, p in trained.named_parameters() if p.grad is not None}

    (loss_once, grads_once), (loss_accum, grads_accum) = step(1), step(3)
    assert loss_accum == pytest.approx(loss_once, abs=1e-5)
    assert grads_once.keys() == grads_accum.keys() and "logit_scale" in grads_once
    assert ("logit_bias" in grads_once) == (loss == "siglip")
    for name, grad in grads_once.items():
        torch.testing.assert_close(grads_accum[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    # the terms are in the loss: without the teacher and keys it is another number
    plain = TrainStep(copy.deepcopy(model), torch.optim.SGD(model.parameters(), lr=0.0), None, StepConfig(loss=loss))
    assert plain(batch)["loss"] != pytest.approx(loss_once, abs=1e-3)
