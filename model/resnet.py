"""The RN50 image tower: OpenAI-CLIP's modified ResNet with attention pooling, and a Chinese CLIP
model that pairs it with the BERT text tower.

transformers has no CLIP ResNet tower, so it is written here (after OpenAI CLIP, MIT licence) with
the reference's parameter names, which makes released RN50 checkpoints map one to one. The model is
a transformers `PreTrainedModel` registered with the Auto classes, so `save_pretrained`,
safetensors and `AutoModel.from_pretrained` work as for the ViT models.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, ChineseCLIPTextConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.chinese_clip.modeling_chinese_clip import (
    ChineseCLIPModel,
    ChineseCLIPOutput,
    ChineseCLIPPreTrainedModel,
    ChineseCLIPTextModel,
)

from .embedding import projected_features


class Bottleneck(nn.Module):
    """ResNet bottleneck whose strided convolutions are anti-aliased: average pool, then stride 1."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", nn.AvgPool2d(stride)),
                        ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, stride=1, bias=False)),
                        ("1", nn.BatchNorm2d(planes * self.expansion)),
                    ]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = self.downsample(x) if self.downsample is not None else x
        return self.relu(out + identity)


class AttentionPool2d(nn.Module):
    """QKV attention of the mean feature over the spatial grid, replacing global average pooling."""

    def __init__(self, spacial_dim: int, embed_dim: int, num_heads: int, output_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spacial_dim**2 + 1, embed_dim) / embed_dim**0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).permute(2, 0, 1)  # NCHW -> (HW)NC
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)
        x = x + self.positional_embedding[:, None, :].to(x.dtype)
        x, _ = F.multi_head_attention_forward(
            query=x,
            key=x,
            value=x,
            embed_dim_to_check=x.shape[-1],
            num_heads=self.num_heads,
            q_proj_weight=self.q_proj.weight,
            k_proj_weight=self.k_proj.weight,
            v_proj_weight=self.v_proj.weight,
            in_proj_weight=None,
            in_proj_bias=torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
            bias_k=None,
            bias_v=None,
            add_zero_attn=False,
            dropout_p=0.0,
            out_proj_weight=self.c_proj.weight,
            out_proj_bias=self.c_proj.bias,
            use_separate_proj_weight=True,
            training=self.training,
            need_weights=False,
        )
        return x[0]


class ModifiedResNet(nn.Module):
    """Three-convolution stem with average pooling, anti-aliased bottleneck stages, attention pooling."""

    def __init__(self, layers: list[int], output_dim: int, heads: int, input_resolution: int, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width // 2, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        self.relu = nn.ReLU(inplace=True)
        inplanes = width
        stages = []
        for index, blocks in enumerate(layers):
            planes, stride = width * 2**index, 1 if index == 0 else 2
            stage = [Bottleneck(inplanes, planes, stride)]
            inplanes = planes * Bottleneck.expansion
            stage += [Bottleneck(inplanes, planes) for _ in range(1, blocks)]
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.attnpool = AttentionPool2d(input_resolution // 32, width * 32, heads, output_dim)

    def stem(self) -> list[nn.Module]:
        return [self.conv1, self.bn1, self.conv2, self.bn2, self.conv3, self.bn3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.type(self.conv1.weight.dtype)
        for conv, bn in zip(self.stem()[::2], self.stem()[1::2]):
            x = self.relu(bn(conv(x)))
        x = self.avgpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.attnpool(x)


class ChineseCLIPResNetConfig(PreTrainedConfig):
    """A BERT text tower (ChineseCLIPTextConfig) with a modified-ResNet image tower."""

    model_type = "zhclip_chinese_clip_resnet"
    # what transformers makes of a bare config class (PreTrainedConfig.__init_subclass__), written out
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=ChineseCLIPTextConfig)}

    text_config: dict | ChineseCLIPTextConfig | None = None
    vision_layers: list[int] | None = None  # bottleneck blocks per stage; RN50: [3, 4, 6, 3]
    vision_width: int = 64
    vision_heads: int = 32
    image_size: int = 224
    projection_dim: int = 1024
    logit_scale_init_value: float = 2.6592
    initializer_factor: float = 1.0
    initializer_range: float = 0.02


class ChineseCLIPResNetModel(ChineseCLIPPreTrainedModel):
    """ChineseCLIPModel's interface (get_text_features, get_image_features, forward) over a ResNet tower."""

    config_class = ChineseCLIPResNetConfig

    def __init__(self, config: ChineseCLIPResNetConfig):
        super().__init__(config)
        # PreTrainedConfig turns a text_config dict into the config (sub_configs_defaults); the
        # presets and saved configs always give vision_layers
        assert isinstance(config.text_config, ChineseCLIPTextConfig) and config.vision_layers is not None
        self.text_model = ChineseCLIPTextModel(config.text_config, add_pooling_layer=False)
        self.visual = ModifiedResNet(
            list(config.vision_layers),
            config.projection_dim,
            config.vision_heads,
            config.image_size,
            config.vision_width,
        )
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.post_init()

    get_text_features = ChineseCLIPModel.get_text_features

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        return BaseModelOutputWithPooling(pooler_output=self.visual(pixel_values))

    def forward(
        self, input_ids=None, pixel_values=None, attention_mask=None, token_type_ids=None, **kwargs
    ) -> ChineseCLIPOutput:
        assert input_ids is not None and pixel_values is not None, "the contrastive forward takes texts and images"
        image_embeds = F.normalize(projected_features(self.get_image_features(pixel_values)), dim=-1)
        text_embeds = F.normalize(
            projected_features(
                self.get_text_features(
                    input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
                )
            ),
            dim=-1,
        )
        logits_per_text = self.logit_scale.exp() * text_embeds @ image_embeds.t()
        return ChineseCLIPOutput(
            logits_per_image=logits_per_text.t(),
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
        )


AutoConfig.register(ChineseCLIPResNetConfig.model_type, ChineseCLIPResNetConfig)
AutoModel.register(ChineseCLIPResNetConfig, ChineseCLIPResNetModel)
