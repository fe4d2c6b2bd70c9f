"""Speed switches for training and inference, applied in place to a built or loaded model.

Each switch computes what the plain model computes (tested on CPU against it) and keeps the
Hugging Face state-dict layout, so a sped-up model saves, loads and converts like any other.
Apply them before building the optimizer (fused QKV replaces parameters) and before `.to(device)`
or after it, as convenient:

    apply_speedups(model, fused_qkv=True, padding_free=True, channels_last=True, compile_scope="regional")
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.chinese_clip.modeling_chinese_clip import (
    ChineseCLIPTextEncoder,
    ChineseCLIPTextModel,
    ChineseCLIPTextSelfAttention,
    ChineseCLIPVisionAttention,
)

from .specs import COMPILE_SCOPES, SDPA_BACKENDS

# torch's kernel for each name of SDPA_BACKENDS, in the order tried after the preferred one
_KERNELS = {name: getattr(SDPBackend, member) for name, member in SDPA_BACKENDS.items()}


class FusedQKVAttention(nn.Module):
    """Self-attention whose query, key and value projections are one matmul, then SDPA.

    Replaces transformers' ChineseCLIP attention modules (the text tower's self-attention and the
    vision tower's attention with its output projection). `state_dict` and `load_state_dict` use
    the replaced module's per-projection names, so checkpoints keep the standard layout.
    """

    def __init__(
        self,
        projections: dict[str, nn.Linear],
        num_heads: int,
        scaling: float,
        dropout: float,
        out_proj: nn.Linear | None = None,
        sdpa_backend: str | None = None,
    ):
        super().__init__()
        self.projection_names = tuple(projections)  # query, key, value order
        first = next(iter(projections.values()))
        self.qkv = nn.Linear(
            first.in_features, 3 * first.out_features, device=first.weight.device, dtype=first.weight.dtype
        )
        with torch.no_grad():
            self.qkv.weight.copy_(torch.cat([p.weight for p in projections.values()]))
            self.qkv.bias.copy_(torch.cat([p.bias for p in projections.values()]))
        self.qkv.requires_grad_(first.weight.requires_grad)
        self.out_proj = out_proj
        self.num_heads, self.scaling, self.dropout = num_heads, scaling, dropout
        # The chosen kernel first, the others as fallbacks: flash takes no attention mask, so padded
        # text falls back to the next kernel that does instead of failing.
        self.backends = None
        if sdpa_backend:
            preferred = _KERNELS[sdpa_backend]
            self.backends = [preferred, *(backend for backend in _KERNELS.values() if backend != preferred)]
        self.register_state_dict_post_hook(_split_qkv)
        self.register_load_state_dict_pre_hook(_merge_qkv)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *_args,
        cu_seqlens: torch.Tensor | None = None,
        min_seqlen: int = 0,
        max_seqlen: int = 0,
        **_kwargs,
    ):
        """Padded (batch, length, width) input with an optional attention mask, or, with `cu_seqlens`,
        a packed (1, tokens, width) input whose sequences start at those offsets (PaddingFreeTextModel)."""
        # Extra arguments (head masks, output_attentions...) are what other transformers versions
        # pass the replaced modules; self-attention of a CLIP tower uses none of them.
        batch, length, width = hidden_states.shape
        qkv = self.qkv(hidden_states)
        with sdpa_kernel(self.backends, set_priority=True) if self.backends else contextlib.nullcontext():
            if cu_seqlens is not None:
                out = self._packed_attention(qkv[0], cu_seqlens, min_seqlen, max_seqlen).view(batch, length, width)
            else:
                query, key, value = qkv.view(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
                out = self._attention(query, key, value, attention_mask).transpose(1, 2).reshape(batch, length, width)
        if self.out_proj is not None:
            out = self.out_proj(out)
        return out, None  # (output, attention weights) as the replaced modules return

    def _attention(self, query, key, value, attention_mask=None):
        return F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_mask,
            scale=self.scaling,
            dropout_p=self.dropout if self.training else 0.0,
        )

    def _packed_attention(
        self, qkv: torch.Tensor, cu_seqlens: torch.Tensor, min_seqlen: int, max_seqlen: int
    ) -> torch.Tensor:
        query, key, value = qkv.view(qkv.shape[0], 3, self.num_heads, -1).unbind(1)  # (tokens, heads, head size)
        attention = jagged_attention if qkv.is_cuda else per_sequence_attention
        return attention(query, key, value, cu_seqlens, (min_seqlen, max_seqlen), self._attention)


Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def jagged_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    seqlens: tuple[int, int],
    attention: Attention,
) -> torch.Tensor:
    """Attention within each packed sequence through jagged nested tensors: on GPUs the flash and
    memory-efficient kernels take the sequences' offsets, so there is neither a mask nor a padded
    position, and attention dropout is kept (torch's varlen_attn has none). (tokens, heads, head
    size) in and out; `seqlens` is the (shortest, longest) sequence length."""
    # Given the extremes, nested SDPA need not compute them (a GPU sync each) for every tensor of
    # every layer; and it wants each of query, key and value contiguous.
    shortest, longest = seqlens
    nested = (
        torch.nested.nested_tensor_from_jagged(
            part.contiguous(), cu_seqlens, min_seqlen=shortest, max_seqlen=longest
        ).transpose(1, 2)
        for part in (query, key, value)
    )
    return attention(*nested).transpose(1, 2).values()


def per_sequence_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    _seqlens: tuple[int, int],
    attention: Attention,
) -> torch.Tensor:
    """What jagged_attention computes, one sequence at a time: the CPU path. On the CPU torch's nested
    SDPA falls back to strided nested tensors that neither non-reentrant activation checkpointing
    nor the FLOP counter can follow."""
    bounds = cu_seqlens.tolist()
    return torch.cat(
        [
            attention(*(part[start:end].transpose(0, 1) for part in (query, key, value))).transpose(0, 1)
            for start, end in zip(bounds, bounds[1:])
        ]
    )


def _split_qkv(module: FusedQKVAttention, state_dict: dict, prefix: str, _metadata) -> None:
    for kind in ("weight", "bias"):
        fused = state_dict.pop(f"{prefix}qkv.{kind}")
        # clones: safetensors refuses tensors that share storage
        for name, part in zip(module.projection_names, fused.chunk(3)):
            state_dict[f"{prefix}{name}.{kind}"] = part.clone()


def _merge_qkv(module: FusedQKVAttention, state_dict: dict, prefix: str, *_args) -> None:
    for kind in ("weight", "bias"):
        keys = [f"{prefix}{name}.{kind}" for name in module.projection_names]
        if all(key in state_dict for key in keys):
            state_dict[f"{prefix}qkv.{kind}"] = torch.cat([state_dict.pop(key) for key in keys])


def _fused(
    attention: ChineseCLIPTextSelfAttention | ChineseCLIPVisionAttention, sdpa_backend: str | None
) -> FusedQKVAttention:
    # Heads, head size and dropout probability from attributes that transformers 5.17 (the GPU
    # hosts') and 5.24 (the lock) both have.
    if isinstance(attention, ChineseCLIPTextSelfAttention):
        projections = {"query": attention.query, "key": attention.key, "value": attention.value}
        fused = FusedQKVAttention(
            projections,
            attention.num_attention_heads,
            attention.attention_head_size**-0.5,
            attention.dropout.p,
            sdpa_backend=sdpa_backend,
        )
    else:
        projections = {"q_proj": attention.q_proj, "k_proj": attention.k_proj, "v_proj": attention.v_proj}
        assert attention.dropout is not None  # the vision config's attention_dropout, a number (0.0 by default)
        fused = FusedQKVAttention(
            projections,
            attention.num_heads,
            attention.scale,
            attention.dropout,
            out_proj=attention.out_proj,
            sdpa_backend=sdpa_backend,
        )
    return fused.train(attention.training)


def _attention_modules(
    model: nn.Module,
) -> Iterator[tuple[nn.Module, str, ChineseCLIPTextSelfAttention | ChineseCLIPVisionAttention]]:
    attention_types = (ChineseCLIPTextSelfAttention, ChineseCLIPVisionAttention)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, attention_types):
                yield parent, name, child


def fuse_qkv(model: nn.Module, sdpa_backend: str | None = None) -> int:
    """Replace every text and vision attention with FusedQKVAttention; returns how many were replaced.

    `sdpa_backend` (flash, cudnn, efficient, math) puts that scaled-dot-product attention kernel first
    in PyTorch's choice (the others remain as fallbacks for inputs it cannot take); None keeps
    PyTorch's default order.
    """
    if sdpa_backend is not None and sdpa_backend not in SDPA_BACKENDS:
        raise ValueError(f"sdpa_backend must be one of {sorted(SDPA_BACKENDS)}, got {sdpa_backend!r}")
    replaced = 0
    for parent, name, attention in _attention_modules(model):
        setattr(parent, name, _fused(attention, sdpa_backend))
        replaced += 1
    return replaced


class PaddingFreeTextModel(nn.Module):
    """The text tower computing only the real tokens of each caption.

    Captions are padded to the context length, and the plain tower runs every layer, matmuls
    included, over the padding too. This one packs the tokens the attention mask keeps into one
    sequence, runs the embeddings and every layer on it (attention within each caption only, see
    FusedQKVAttention) and scatters the result back to (batch, length, width), zeros at the padded
    positions, so the towers' pooling ([CLS]) and everything downstream are unchanged. The real tokens
    get what the plain tower gives them. It holds the replaced tower's own submodules under their
    own names: state dicts and saved folders keep the standard layout.
    """

    embeddings: nn.Module
    encoder: ChineseCLIPTextEncoder
    pooler: nn.Module | None

    def __init__(self, text_model: ChineseCLIPTextModel | PaddingFreeTextModel):
        super().__init__()
        self.config = text_model.config
        self.embeddings, self.encoder, self.pooler = text_model.embeddings, text_model.encoder, text_model.pooler

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        unsupported = [
            name for name in ("inputs_embeds", "output_attentions", "output_hidden_states") if kwargs.get(name)
        ]
        if unsupported:
            raise NotImplementedError(
                f"the padding-free text tower does not take {unsupported}; "
                "build the model without padding_free for them"
            )
        batch, length = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kept = attention_mask.flatten().nonzero().squeeze(1)
        lengths = attention_mask.sum(1)
        cu_seqlens = F.pad(lengths.cumsum(0), (1, 0))
        shortest, longest = torch.stack([lengths.min(), lengths.max()]).tolist()  # one sync, as nonzero's
        if position_ids is None:
            position_ids = torch.arange(length, device=input_ids.device).expand(batch, length)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        packed = [ids.flatten()[kept][None] for ids in (input_ids, token_type_ids, position_ids)]
        hidden = self.embeddings(input_ids=packed[0], token_type_ids=packed[1], position_ids=packed[2])
        for layer in self.encoder.layer:
            hidden = layer(hidden, None, cu_seqlens=cu_seqlens, min_seqlen=shortest, max_seqlen=longest)
        unpacked = hidden.new_zeros(batch * length, hidden.shape[-1]).index_copy(0, kept, hidden[0])
        sequence = unpacked.view(batch, length, -1)
        return BaseModelOutputWithPooling(
            last_hidden_state=sequence, pooler_output=self.pooler(sequence) if self.pooler is not None else None
        )


def padding_free_text(model: nn.Module) -> None:
    """Swap the text tower for PaddingFreeTextModel; its attention must be fused first (fuse_qkv),
    since the packed attention lives in FusedQKVAttention."""
    attention = model.get_submodule("text_model.encoder.layer.0.attention.self")
    if not isinstance(attention, FusedQKVAttention):
        raise ValueError("padding_free needs the fused attention: set fused_qkv as well")
    text_model = model.get_submodule("text_model")
    assert isinstance(text_model, ChineseCLIPTextModel | PaddingFreeTextModel)  # both tower kinds' text tower
    model.text_model = PaddingFreeTextModel(text_model)


def channels_last_patch_embedding(model: nn.Module) -> bool:
    """Run the ViT patch-embedding convolution in channels-last layout (cuDNN's fast NHWC kernels).

    Returns False for towers without a patch embedding (ResNet presets), which are left alone.
    """
    vision = getattr(model, "vision_model", None)
    if vision is None:
        return False
    conv = vision.embeddings.patch_embedding
    conv.to(memory_format=torch.channels_last)
    conv.register_forward_pre_hook(
        lambda _module, args: (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
    )
    # safetensors saves contiguous tensors only
    conv.register_state_dict_post_hook(
        lambda _module, state_dict, prefix, _metadata: state_dict.update(
            {f"{prefix}weight": state_dict[f"{prefix}weight"].contiguous()}
        )
    )
    return True


def encoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer layers of both towers (ResNet image towers have none)."""
    text = _module_list(model, "text_model.encoder.layer")
    vision = _module_list(model, "vision_model.encoder.layers") if hasattr(model, "vision_model") else []
    return [*text, *vision]


def _module_list(model: nn.Module, path: str) -> nn.ModuleList:
    layers = model.get_submodule(path)
    assert isinstance(layers, nn.ModuleList)  # transformers keeps each tower's layers in one
    return layers


def compile_model(model: nn.Module, scope: str = "regional", **options: object) -> None:
    """torch.compile in place: `regional` compiles each encoder layer (the layers share one
    compiled graph, so warm-up is short); `model` compiles the whole forward. `options` go to
    torch.compile (e.g. mode="max-autotune-no-cudagraphs", or mode="reduce-overhead" for CUDA
    graphs when shapes are static)."""
    if scope not in COMPILE_SCOPES:
        raise ValueError(f"compile scope must be one of {COMPILE_SCOPES}, got {scope!r}")
    if scope == "regional":
        for layer in encoder_layers(model):
            layer.compile(**options)
    elif scope == "model":
        model.compile(**options)


def apply_speedups(
    model: nn.Module,
    fused_qkv: bool = False,
    sdpa_backend: str | None = None,
    padding_free: bool = False,
    channels_last: bool = False,
    compile_scope: str = "none",
    compile_options: dict | None = None,
) -> dict[str, object]:
    """Apply the chosen switches in place; returns what was applied (for logs and benchmarks).

    `sdpa_backend` and `padding_free` need `fused_qkv` (both live in the fused attention).
    """
    if sdpa_backend and not fused_qkv:
        raise ValueError("sdpa_backend is applied by the fused attention: set fused_qkv as well")
    applied: dict[str, object] = {}
    if fused_qkv:
        applied["fused_qkv"] = fuse_qkv(model, sdpa_backend)
        applied["sdpa_backend"] = sdpa_backend or "auto"
    if padding_free:
        padding_free_text(model)
        applied["padding_free"] = True
    if channels_last:
        applied["channels_last"] = channels_last_patch_embedding(model)
    compile_model(model, compile_scope, **(compile_options or {}))
    applied["compile"] = compile_scope
    return applied
