"""FastViTHD, the image encoder of FastVLM, in the re-parameterised (inference) form of Apple's weights.

Module names follow timm's FastViT (`stem`, `stages.N.downsample`, `stages.N.pos_emb`, `stages.N.blocks.M`,
`token_mixer`, `mlp`, `final_conv`, `se`) so that foreign checkpoints map with one rename table each. Every forward
here is the computation as written; at inference on a CPU, `fastvlm_hf.cpu.routes` gives some blocks a faster route to
the same result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndNoAttention
from transformers.utils import can_return_tuple

from .compat import weight_init, without_hub_kernels_unless_asked
from .configuration_fastvithd import FastViTHDConfig
from .cpu.routes import CPURoutesMixin, fit_cpu_routes_after_loading


class FastViTHDActivation(nn.Module):
    """The config's activation, applied through the (B, H, W, C) view of a channels-last feature map.

    Same values; the view is contiguous, the (tokens, channels) layout element-wise kernels (the Hub's activation
    kernels among them) are written for.
    """

    def __init__(self, hidden_act: str):
        super().__init__()
        self.fn = ACT2FN[hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fn(hidden_states.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class FastViTHDSqueezeExcite(nn.Module):
    """Channel gating from the global (whole-image) mean: mean → 1×1 conv → ReLU → 1×1 conv → sigmoid → scale."""

    def __init__(self, channels: int, hidden_channels: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden_channels, kernel_size=1)
        self.fc2 = nn.Conv2d(hidden_channels, channels, kernel_size=1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate = hidden_states.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1) at any resolution
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(gate))))
        return hidden_states * gate


class FastViTHDConvAct(nn.Module):
    """A re-parameterised MobileOne-style block: one biased convolution, optional squeeze-excite, activation."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        hidden_act: str,
        stride: int = 1,
        groups: int = 1,
        se_hidden_size: int | None = None,
    ):
        super().__init__()
        self.reparam_conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, groups=groups
        )
        self.se = FastViTHDSqueezeExcite(out_channels, se_hidden_size) if se_hidden_size else nn.Identity()
        self.act = FastViTHDActivation(hidden_act)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.act(self.se(self.reparam_conv(hidden_states)))


class FastViTHDReparamDepthwiseConv(nn.Module):
    """RepMixer token mixer or RepCPE positional encoding after re-parameterisation.

    Training-time both are `x + f(x)`; folding the identity into the kernel leaves one biased depthwise
    convolution whose output replaces its input, so there is no residual here.
    """

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.reparam_conv = nn.Conv2d(
            channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=True
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.reparam_conv(hidden_states)


class FastViTHDConvNorm(nn.Module):
    """Bias-free depthwise convolution followed by BatchNorm (not fused in the released weights).

    In eval mode the BatchNorm is an affine map per channel, so it is folded into the convolution on the fly: one
    pass over the feature map instead of two. Training keeps the BatchNorm, which then uses and updates batch
    statistics; the parameters and buffers stay in the published layout either way.
    """

    def __init__(self, channels: int, kernel_size: int, eps: float):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=False)
        self.bn = nn.BatchNorm2d(channels, eps=eps)

    def folded_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The convolution's kernel and bias with the eval-mode BatchNorm folded in, computed in at least float32."""
        bn, dtype = self.bn, self.conv.weight.dtype
        compute_dtype = torch.promote_types(dtype, torch.float32)
        scale = bn.weight.to(compute_dtype) * torch.rsqrt(bn.running_var.to(compute_dtype) + bn.eps)
        weight = self.conv.weight.to(compute_dtype) * scale[:, None, None, None]
        bias = bn.bias.to(compute_dtype) - bn.running_mean.to(compute_dtype) * scale
        return weight.to(dtype), bias.to(dtype)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # Weights offloaded by accelerate are only loaded when their own module runs: no folding then.
        if self.training or not self.bn.track_running_stats or self.conv.weight.is_meta:
            return self.bn(self.conv(hidden_states))
        weight, bias = self.folded_weight_and_bias()
        conv = self.conv
        return F.conv2d(hidden_states, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class FastViTHDConvMlp(nn.Module):
    """ConvFFN: depthwise conv + BatchNorm, then a pointwise MLP (1×1 conv → activation → 1×1 conv)."""

    def __init__(self, config: FastViTHDConfig, channels: int, hidden_channels: int):
        super().__init__()
        self.conv = FastViTHDConvNorm(channels, config.convffn_kernel_size, config.batch_norm_eps)
        self.fc1 = nn.Conv2d(channels, hidden_channels, kernel_size=1)
        self.act = FastViTHDActivation(config.hidden_act)
        self.fc2 = nn.Conv2d(hidden_channels, channels, kernel_size=1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.conv(hidden_states)
        return self.fc2(self.act(self.fc1(hidden_states)))


class FastViTHDLayerScale(nn.Module):
    """A residual connection whose branch is scaled per channel: `residual + gamma * branch`, in one pass."""

    def __init__(self, channels: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((channels, 1, 1), init_value))

    def forward(self, residual: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(residual, self.gamma, branch)


class FastViTHDLayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a (B, C, H, W) map: per pixel mean and biased variance, then affine."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # Channels last, the channels of a pixel are contiguous: the permuted view is free for `F.layer_norm`.
        channels_last = hidden_states.permute(0, 2, 3, 1)
        normalized = F.layer_norm(channels_last, (channels_last.shape[-1],), self.weight, self.bias, self.eps)
        return normalized.permute(0, 3, 1, 2)


class FastViTHDAttention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map (no mask, no positional bias)."""

    def __init__(self, channels: int, head_dim: int, qkv_bias: bool):
        super().__init__()
        self.head_dim = head_dim
        self.num_heads = channels // head_dim
        self.qkv = nn.Linear(channels, 3 * channels, bias=qkv_bias)
        self.proj = nn.Linear(channels, channels)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, channels, height, width = hidden_states.shape
        tokens = hidden_states.permute(0, 2, 3, 1).reshape(batch_size, height * width, channels)  # row-major pixels
        qkv = self.qkv(tokens).reshape(batch_size, height * width, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, H*W, head_dim)
        attended = F.scaled_dot_product_attention(query, key, value)  # softmax(q·kᵀ / √head_dim)·v
        attended = attended.transpose(1, 2).reshape(batch_size, height * width, channels)
        # (B, H*W, C) -> (B, C, H, W) as a channels-last view, no copy
        return self.proj(attended).reshape(batch_size, height, width, channels).permute(0, 3, 1, 2)


class FastViTHDRepMixerBlock(GradientCheckpointingLayer):
    """Convolutional block: re-parameterised RepMixer, then a layer-scaled ConvFFN residual."""

    def __init__(self, config: FastViTHDConfig, channels: int, mlp_ratio: float):
        super().__init__()
        self.token_mixer = FastViTHDReparamDepthwiseConv(channels, config.repmixer_kernel_size)
        self.mlp = FastViTHDConvMlp(config, channels, int(channels * mlp_ratio))
        self.layer_scale = FastViTHDLayerScale(channels, config.layer_scale_init_value)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.token_mixer(hidden_states)
        return self.layer_scale(hidden_states, self.mlp(hidden_states))


class FastViTHDAttentionBlock(GradientCheckpointingLayer):
    """Transformer block on a feature map: pre-norm attention and ConvFFN, each a layer-scaled residual."""

    def __init__(self, config: FastViTHDConfig, channels: int, mlp_ratio: float):
        super().__init__()
        self.norm = FastViTHDLayerNorm2d(channels, config.layer_norm_eps)
        self.token_mixer = FastViTHDAttention(channels, config.attention_head_dim, config.qkv_bias)
        self.layer_scale_1 = FastViTHDLayerScale(channels, config.layer_scale_init_value)
        self.mlp = FastViTHDConvMlp(config, channels, int(channels * mlp_ratio))
        self.layer_scale_2 = FastViTHDLayerScale(channels, config.layer_scale_init_value)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.layer_scale_1(hidden_states, self.token_mixer(self.norm(hidden_states)))
        return self.layer_scale_2(hidden_states, self.mlp(hidden_states))


class FastViTHDPatchEmbed(nn.Module):
    """Downsampling: grouped large-kernel strided conv (2 outputs per input channel) + act, then 1×1 conv + act."""

    def __init__(self, config: FastViTHDConfig, in_channels: int, out_channels: int):
        super().__init__()
        self.proj = nn.Sequential(
            FastViTHDConvAct(
                in_channels,
                out_channels,
                config.downsample_kernel_size,
                config.hidden_act,
                stride=config.downsample_stride,
                groups=in_channels,
            ),
            FastViTHDConvAct(out_channels, out_channels, 1, config.hidden_act),
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden_states)


class FastViTHDStage(nn.Module):
    """One resolution level: optional downsampling, optional positional encoding, then the blocks."""

    def __init__(self, config: FastViTHDConfig, stage_index: int):
        super().__init__()
        channels = config.embed_dims[stage_index]
        in_channels = config.embed_dims[max(stage_index - 1, 0)]
        if config.downsamples[stage_index]:
            self.downsample = FastViTHDPatchEmbed(config, in_channels, channels)
        else:
            self.downsample = nn.Identity()
        if config.pos_embeds[stage_index]:
            self.pos_emb = FastViTHDReparamDepthwiseConv(channels, config.pos_embed_kernel_size)
        else:
            self.pos_emb = nn.Identity()
        block_class = {"repmixer": FastViTHDRepMixerBlock, "attention": FastViTHDAttentionBlock}[
            config.token_mixers[stage_index]
        ]
        mlp_ratio = config.mlp_ratios[stage_index]
        self.blocks = nn.Sequential(
            *(block_class(config, channels, mlp_ratio) for _ in range(config.depths[stage_index]))
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.pos_emb(self.downsample(hidden_states)))


class FastViTHDPreTrainedModel(PreTrainedModel):
    config_class = FastViTHDConfig
    base_model_prefix = "fastvithd"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True  # block by block: every block is a `GradientCheckpointingLayer`
    _no_split_modules = ["FastViTHDModel"]
    _supports_sdpa = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        r"""As `PreTrainedModel.from_pretrained`, with no Hub kernels unless `use_kernels=True` asks for them."""
        kwargs = without_hub_kernels_unless_asked(kwargs)
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        fit_cpu_routes_after_loading(loaded[0] if isinstance(loaded, tuple) else loaded)
        return loaded

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            weight_init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                weight_init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            weight_init.ones_(module.weight)
            weight_init.zeros_(module.bias)
            weight_init.zeros_(module.running_mean)
            weight_init.ones_(module.running_var)
            weight_init.zeros_(module.num_batches_tracked)
        elif isinstance(module, FastViTHDLayerNorm2d):
            weight_init.ones_(module.weight)
            weight_init.zeros_(module.bias)
        elif isinstance(module, FastViTHDLayerScale):
            weight_init.constant_(module.gamma, self.config.layer_scale_init_value)


class FastViTHDModel(CPURoutesMixin, FastViTHDPreTrainedModel):
    r"""
    FastViTHD image encoder. Returns the (B, `hidden_size`, H/`patch_size`, W/`patch_size`) feature map as
    `last_hidden_state`, its spatial mean as `pooler_output`, and with `output_hidden_states=True` the stem
    output followed by every stage output.

    Example:

    ```python
    >>> import torch, fastvlm_hf
    >>> model = fastvlm_hf.FastViTHDModel(fastvlm_hf.FastViTHDConfig()).eval()
    >>> model(torch.rand(1, 3, 1024, 1024)).last_hidden_state.shape
    torch.Size([1, 3072, 16, 16])
    ```"""

    def __init__(self, config: FastViTHDConfig):
        super().__init__(config)
        stem_width = config.embed_dims[0]
        # 3×3 stride 2, 3×3 depthwise stride 2, 1×1; no squeeze-excite
        self.stem = nn.Sequential(
            FastViTHDConvAct(
                config.num_channels, stem_width, config.stem_kernel_size, config.hidden_act, stride=config.stem_stride
            ),
            FastViTHDConvAct(
                stem_width,
                stem_width,
                config.stem_kernel_size,
                config.hidden_act,
                stride=config.stem_stride,
                groups=stem_width,
            ),
            FastViTHDConvAct(stem_width, stem_width, 1, config.hidden_act),
        )
        self.stages = nn.ModuleList(FastViTHDStage(config, index) for index in range(len(config.depths)))
        self.final_conv = FastViTHDConvAct(
            config.embed_dims[-1],
            config.hidden_size,
            config.final_conv_kernel_size,
            config.hidden_act,
            groups=config.embed_dims[-1],
            se_hidden_size=config.se_hidden_size,
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        """The stem: it embeds the pixels, as a vision transformer's patch embedding does."""
        return self.stem

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPoolingAndNoAttention:
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        patch_size = self.config.patch_size
        height, width = pixel_values.shape[-2:]
        if height % patch_size or width % patch_size:
            raise ValueError(
                f"FastViTHD needs image sides that are multiples of {patch_size}, got {height}×{width}; "
                f"resize the image (the image processor's `size`) to a multiple of {patch_size}."
            )

        # Channels last: the pointwise convolutions, most of the work, take oneDNN's fast path on a CPU, and the
        # attention blocks read their tokens without a copy.
        pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        hidden_states = self.stem(pixel_values)  # (B, embed_dims[0], H/4, W/4)
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for stage in self.stages:
            hidden_states = stage(hidden_states)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        last_hidden_state = self.final_conv(hidden_states)  # (B, hidden_size, H/patch_size, W/patch_size)
        pooled_output = last_hidden_state.mean(dim=(2, 3))
        return BaseModelOutputWithPoolingAndNoAttention(
            last_hidden_state=last_hidden_state,
            pooler_output=pooled_output,
            hidden_states=all_hidden_states,
        )
