"""model/fast.py: every speed switch computes what the plain model computes and keeps its layout."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ChineseCLIPModel

from zhclip.model import build_model, load_model, lock_image_tower, save_model
from zhclip.model.fast import (
    FusedQKVAttention,
    PaddingFreeTextModel,
    apply_speedups,
    jagged_attention,
    per_sequence_attention,
)
from zhclip.model.pixels import pixels_on_device
from zhclip.model.presets import CLIP_MEAN, CLIP_STD


@pytest.fixture(scope="module")
def plain():
    model, processor = build_model("tiny")
    return model.eval(), processor


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(106, 21128, (4, 16), generator=generator)
    mask = torch.ones(4, 16, dtype=torch.long)
    mask[1, 9:] = mask[3, 4:] = 0  # padded captions exercise the attention mask
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(4, 3, 32, 32, generator=generator)}


def embeddings(model, batch):
    out = model(**batch)
    return out.image_embeds, out.text_embeds


def sped_up(plain_model, **switches):
    model = copy.deepcopy(plain_model)
    apply_speedups(model, **switches)
    return model


@pytest.mark.parametrize(
    "switches",
    [
        {"fused_qkv": True},
        {"fused_qkv": True, "sdpa_backend": "math"},
        {"fused_qkv": True, "sdpa_backend": "flash"},
        {"channels_last": True},
        {
            "fused_qkv": True,
            "channels_last": True,
            "compile_scope": "regional",
            "compile_options": {"backend": "aot_eager"},
        },
        {"compile_scope": "model", "compile_options": {"backend": "aot_eager"}},
        {"fused_qkv": True, "padding_free": True},
        {
            "fused_qkv": True,
            "padding_free": True,
            "compile_scope": "regional",
            "compile_options": {"backend": "aot_eager"},
        },
    ],
    ids=[
        "fused",
        "fused-math",
        "fused-flash",
        "channels-last",
        "all-regional-compile",
        "model-compile",
        "padding-free",
        "padding-free-compiled",
    ],
)
def test_switches_give_the_plain_models_embeddings(plain, batch, switches):
    model = sped_up(plain[0], **switches)
    with torch.no_grad():
        for fast, reference in zip(embeddings(model, batch), embeddings(plain[0], batch)):
            torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)


def test_fused_qkv_replaces_every_attention_and_gives_the_same_gradients(plain, batch):
    model = sped_up(plain[0], fused_qkv=True)
    layers = len(model.text_model.encoder.layer) + len(model.vision_model.encoder.layers)
    assert sum(isinstance(m, FusedQKVAttention) for m in model.modules()) == layers
    reference = copy.deepcopy(plain[0])
    for m in (model, reference):  # eval: no dropout, so both runs see the same function
        image, text = embeddings(m, batch)
        (image.square().sum() + text.square().sum()).backward()
    fused = model.text_model.encoder.layer[0].attention.self.qkv.weight.grad
    original = reference.text_model.encoder.layer[0].attention.self
    torch.testing.assert_close(
        fused,
        torch.cat([original.query.weight.grad, original.key.weight.grad, original.value.weight.grad]),
        atol=1e-5,
        rtol=1e-4,
    )
    fused = model.vision_model.encoder.layers[1].self_attn.qkv.bias.grad
    original = reference.vision_model.encoder.layers[1].self_attn
    torch.testing.assert_close(
        fused,
        torch.cat([original.q_proj.bias.grad, original.k_proj.bias.grad, original.v_proj.bias.grad]),
        atol=1e-5,
        rtol=1e-4,
    )


def _text_gradients(model, batch, parameter_names):
    model(**batch).text_embeds.square().sum().backward()
    parameters = dict(model.named_parameters())
    return [parameters[name].grad for name in parameter_names]


def test_padding_free_text_tower_computes_real_tokens_only_with_the_same_gradients(plain, batch):
    model = sped_up(plain[0], fused_qkv=True, padding_free=True)
    assert isinstance(model.text_model, PaddingFreeTextModel)
    names = [
        "text_model.embeddings.word_embeddings.weight",
        "text_model.encoder.layer.1.output.dense.weight",
        "text_model.encoder.layer.0.attention.output.LayerNorm.weight",
        "text_projection.weight",
    ]
    reference = copy.deepcopy(plain[0])
    for got, expected in zip(_text_gradients(model, batch, names), _text_gradients(reference, batch, names)):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    fused = model.text_model.encoder.layer[0].attention.self.qkv.weight.grad
    original = reference.text_model.encoder.layer[0].attention.self
    torch.testing.assert_close(
        fused,
        torch.cat([original.query.weight.grad, original.key.weight.grad, original.value.weight.grad]),
        atol=1e-5,
        rtol=1e-4,
    )
    with torch.no_grad():
        hidden = model.text_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        padded = (
            plain[0].text_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        )
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(hidden[real], padded[real], atol=1e-5, rtol=1e-5)
    assert not hidden[~real].any(), "padded positions are never computed: zeros"


def test_jagged_attention_the_gpu_path_equals_one_sequence_at_a_time():
    """The GPU's packed attention (nested tensors) against the CPU's, here on the CPU's math kernel."""
    generator = torch.Generator().manual_seed(3)
    cu_seqlens = torch.tensor([0, 3, 8, 10, 16])
    query, key, value = (torch.randn(16, 2, 4, generator=generator, requires_grad=True) for _ in range(3))
    outputs, gradients = [], []
    compiled = torch.compile(jagged_attention, backend="aot_eager")  # as regional compile runs it on GPUs
    for attention in (jagged_attention, per_sequence_attention, compiled):
        out = attention(query, key, value, cu_seqlens, (2, 6), torch.nn.functional.scaled_dot_product_attention)
        outputs.append(out)
        gradients.append(torch.autograd.grad(out.square().sum(), (query, key, value)))
    for output, grads in zip(outputs[1:], gradients[1:]):
        torch.testing.assert_close(output, outputs[0])
        for got, expected in zip(grads, gradients[0]):
            torch.testing.assert_close(got, expected)
    # and it is attention within each sequence: the first three tokens see only each other
    alone = torch.nn.functional.scaled_dot_product_attention(*(t[:3].transpose(0, 1) for t in (query, key, value)))
    torch.testing.assert_close(outputs[0][:3], alone.transpose(0, 1))


def test_padding_free_keeps_attention_dropout_and_activation_checkpointing(plain, batch):
    model = sped_up(plain[0], fused_qkv=True, padding_free=True).train()
    for module in model.modules():  # only attention dropout left on
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for layer in model.text_model.encoder.layer:
        layer.attention.self.dropout = 0.5
    torch.manual_seed(0)
    first, second = model(**batch).text_embeds, model(**batch).text_embeds
    assert not torch.allclose(first, second), "attention dropout draws anew at each call"
    for layer in model.text_model.encoder.layer:
        layer.attention.self.dropout = 0.0
    names = ["text_model.encoder.layer.0.intermediate.dense.weight"]
    expected = _text_gradients(model, batch, names)[0].clone()
    model.zero_grad()
    model.activation_checkpointing_enable()
    torch.testing.assert_close(_text_gradients(model, batch, names)[0], expected, atol=1e-6, rtol=1e-5)


def test_sped_up_model_keeps_the_standard_layout_and_round_trips(plain, batch, tmp_path):
    model = sped_up(plain[0], fused_qkv=True, padding_free=True, channels_last=True)
    assert model.state_dict().keys() == plain[0].state_dict().keys()
    save_model(model, plain[1], tmp_path)
    reloaded = ChineseCLIPModel.from_pretrained(tmp_path).eval()  # plain transformers reads it
    with torch.no_grad():
        for got, expected in zip(embeddings(reloaded, batch), embeddings(plain[0], batch)):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # and a standard checkpoint loads into a sped-up model
    other = sped_up(build_model("tiny", seed=7)[0].eval(), fused_qkv=True)
    other.load_state_dict(load_model(tmp_path)[0].state_dict())
    with torch.no_grad():
        torch.testing.assert_close(embeddings(other, batch)[1], embeddings(plain[0], batch)[1], atol=1e-5, rtol=1e-5)


def test_fusing_keeps_a_locked_tower_locked_and_the_training_mode(plain):
    model = copy.deepcopy(plain[0]).train()
    lock_image_tower(model)
    apply_speedups(model, fused_qkv=True)
    vision_attention = model.vision_model.encoder.layers[0].self_attn
    assert not vision_attention.qkv.weight.requires_grad and not vision_attention.training
    text_attention = model.text_model.encoder.layer[0].attention.self
    assert text_attention.qkv.weight.requires_grad and text_attention.training


def test_channels_last_puts_the_patch_embedding_in_nhwc(plain):
    model = sped_up(plain[0], channels_last=True)
    weight = model.vision_model.embeddings.patch_embedding.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


def test_bad_switches_are_clear_errors(plain):
    with pytest.raises(ValueError, match="sdpa_backend must be one of"):
        sped_up(plain[0], fused_qkv=True, sdpa_backend="fastest")
    with pytest.raises(ValueError, match="set fused_qkv as well"):
        sped_up(plain[0], sdpa_backend="flash")
    with pytest.raises(ValueError, match="padding_free needs the fused attention"):
        sped_up(plain[0], padding_free=True)
    with pytest.raises(ValueError, match="compile scope must be one of"):
        sped_up(plain[0], compile_scope="everything")


def test_on_device_preprocessing_matches_the_image_processor(plain):
    rng = np.random.default_rng(0)
    coarse = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).resize((70, 50), Image.BICUBIC)
    images = [coarse, coarse.transpose(Image.FLIP_LEFT_RIGHT).resize((60, 40))]  # mixed sizes
    processor = plain[1].image_processor
    expected = processor(images=images, return_tensors="pt")["pixel_values"]
    tensors = [torch.from_numpy(np.array(image)).permute(2, 0, 1) for image in images]
    got = pixels_on_device(tensors, 32, CLIP_MEAN, CLIP_STD)
    assert got.shape == expected.shape == (2, 3, 32, 32)
    # PIL's and torch's bicubic kernels differ slightly: one 8-bit level at most (~0.015 here)
    assert (got - expected).abs().max() < 0.05
    assert (got - expected).abs().mean() < 0.01


def graph_counting_backend() -> tuple[list, object]:
    """A torch.compile backend that runs each graph as traced and records it: (graphs, backend)."""
    graphs = []

    def backend(graph_module, _inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    return graphs, backend


def test_regional_compile_traces_one_graph_per_layer_kind_without_breaks(plain, batch):
    graphs, backend = graph_counting_backend()
    model = sped_up(
        plain[0], fused_qkv=True, compile_scope="regional", compile_options={"backend": backend, "dynamic": False}
    )
    for _ in range(2):
        with torch.no_grad():
            embeddings(model, batch)
    # the text layers share one graph and the vision layers another: compiled once, reused, unbroken
    assert len(graphs) == 2


def test_padding_free_compiled_layers_stop_recompiling_as_token_counts_change(plain, batch):
    graphs, backend = graph_counting_backend()
    model = sped_up(
        plain[0], fused_qkv=True, padding_free=True, compile_scope="regional", compile_options={"backend": backend}
    )
    counts = []
    for cut in (16, 12, 9, 5):  # a different number of real tokens in every batch
        shorter = {**batch, "attention_mask": batch["attention_mask"].clone()}
        shorter["attention_mask"][:, cut:] = 0
        with torch.no_grad():
            torch.testing.assert_close(
                embeddings(model, shorter)[1], embeddings(plain[0], shorter)[1], atol=1e-5, rtol=1e-5
            )
        counts.append(len(graphs))
    # the second token count makes the graphs dynamic; later ones reuse them
    assert counts[1] > counts[0] and counts[3] == counts[2] == counts[1]
