"""FastViTHD, the image encoder of FastVLM, in the re-parameterised (inference) form of Apple's weights.

Module names follow timm's FastViT (`stem`, `stages.N.downsample`, `stages.N.pos_emb`, `stages.N.blocks.M`,
`token_mixer`, `mlp`, `final_conv`, `se`) so that foreign checkpoints map with one rename table each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndNoAttention

from .compat import weight_init
from .configuration_fastvithd import FastViTHDConfig

# Layout of the activations inside the encoder. Channels last, the pointwise convolutions (most of the work) run 2–3×
# faster on CPU and the attention stages read their tokens without a copy (benchmarks/README.md, "Levers").
ACTIVATION_MEMORY_FORMAT = torch.channels_last


# Activations oneDNN can apply inside a convolution: config name -> (post-op, algorithm).
_ONEDNN_POST_OPS = {"gelu": ("gelu", "none"), "relu": ("relu", None)}


class FastViTHDActivation(nn.Module):
    """The config's activation, applied through the (B, H, W, C) view of a channels-last feature map.

    Same values; the view is contiguous, which takes element-wise kernels off their slower strided path (for
    bfloat16 GELU on CPU, twice as fast).
    """

    def __init__(self, hidden_act: str):
        super().__init__()
        self.fn = ACT2FN[hidden_act]
        self.onednn_post_op = _ONEDNN_POST_OPS.get(hidden_act)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fn(hidden_states.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


_HAS_ONEDNN_FUSED_CONVOLUTION = torch.backends.mkldnn.is_available() and hasattr(
    torch.ops.mkldnn, "_convolution_pointwise"
)
_HAS_ONEDNN_FUSED_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# The fused kernel repacks its weights on every call: it pays off on large maps (the first stages, 2× on CPU there),
# not on the small maps of the last stages, whose weights are large.
_ONEDNN_FUSION_MIN_PIXELS = 64 * 64
# A ConvFFN whose hidden map is larger than this runs its pointwise layers a few thousand pixels at a time, each chunk's
# hidden activations about `_CONVFFN_CHUNK_BYTES`, so the large hidden map is never allocated: glibc serves allocations
# over 32 MiB with fresh pages, page faults on every call (about 13 ms per 50 MiB on the benchmark machine).
_CONVFFN_CHUNKING_MIN_BYTES = 32 * 2**20
_CONVFFN_CHUNK_BYTES = 3 * 2**20
# A ConvFFN on a map with at most this many pixels per input channel runs its pointwise layers as linear layers over
# all pixels at once: there the convolution kernels spend much of their time on their large weights (last stage at
# 1024 px: 1.5× faster in bfloat16, 2× in float32). With 1.3 and 3 pixels per channel, the convolutions were 4 % and
# 10 % faster in bfloat16.
_CONVFFN_LINEAR_MAX_PIXELS_PER_CHANNEL = 1
# Most bytes of input a strided convolution with a channel multiplier may duplicate to run as a depthwise one.
_DEPTHWISE_DUPLICATE_MAX_BYTES = 32 * 2**20
# A stem whose first layer would output more than this runs over bands of rows, each band's first-layer output about
# `_STEM_BAND_BYTES`: the full-size map of that layer (50 MiB in bfloat16 at 1024 px) is never allocated (the page
# faults above; at 1024 px the stem took 16 instead of 34 ms in bfloat16). Bands of 4 and 16 MiB were slower.
_STEM_BANDING_MIN_BYTES = 32 * 2**20
_STEM_BAND_BYTES = 8 * 2**20


def _cpu_inference(hidden_states: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a forward pass may take the CPU inference kernels: no autograd, no compiler, float32 or bfloat16 on the
    CPU, weights present (accelerate keeps offloaded weights on the meta device until their module runs)."""
    return (
        torch.backends.mkldnn.enabled
        and not torch.compiler.is_compiling()  # the compiler fuses by itself
        and not torch.is_grad_enabled()  # the fused kernels have no backward
        and hidden_states.device.type == "cpu"
        and hidden_states.dtype in (torch.float32, torch.bfloat16)
        and weight.device.type == "cpu"
    )


def _onednn_can_fuse(conv: nn.Conv2d, activation: FastViTHDActivation, hidden_states: torch.Tensor) -> bool:
    return (
        _HAS_ONEDNN_FUSED_CONVOLUTION
        and activation.onednn_post_op is not None
        and hidden_states.shape[-2] * hidden_states.shape[-1] >= _ONEDNN_FUSION_MIN_PIXELS
        and conv.padding_mode == "zeros"
        and _cpu_inference(hidden_states, conv.weight)
    )


def _can_run_as_depthwise(conv: nn.Conv2d, hidden_states: torch.Tensor) -> bool:
    """Whether `conv` (one input channel per group, several outputs each) should run as a depthwise convolution over
    its input with every channel repeated: oneDNN's depthwise kernels are 2–3× faster than its grouped ones."""
    multiplier = conv.out_channels // conv.in_channels
    return (
        conv.groups == conv.in_channels
        and multiplier > 1
        and conv.padding_mode == "zeros"
        and hidden_states.is_contiguous(memory_format=torch.channels_last)
        and hidden_states.numel() * multiplier * hidden_states.element_size() <= _DEPTHWISE_DUPLICATE_MAX_BYTES
        and _cpu_inference(hidden_states, conv.weight)
    )


def _repeat_each_channel(hidden_states: torch.Tensor, repeats: int) -> torch.Tensor:
    """Channels-last (B, C, H, W) -> channels-last (B, C·repeats, H, W); channel c at c·repeats … (c+1)·repeats − 1."""
    batch_size, channels, height, width = hidden_states.shape
    pixels = hidden_states.permute(0, 2, 3, 1)
    # stacking copies in long runs, where a reshape of an expanded view copies two elements at a time (3× slower)
    repeated = torch.stack([pixels] * repeats, dim=-1)
    return repeated.view(batch_size, height, width, channels * repeats).permute(0, 3, 1, 2)


def convolve_and_activate(
    conv: nn.Conv2d,
    activation: FastViTHDActivation,
    hidden_states: torch.Tensor,
    groups: int | None = None,
    padding: tuple[int, int] | None = None,
) -> torch.Tensor:
    """`activation(conv(hidden_states))`, with `groups` and `padding` in place of the convolution's own where given.
    At inference on CPU, one oneDNN convolution with the activation applied to its accumulators (the kernel
    torch.compile uses): no second pass over, and no second copy of, the output map; 1.5–2× faster for the wide maps of
    the first stages."""
    groups = conv.groups if groups is None else groups
    padding = conv.padding if padding is None else padding
    if not _onednn_can_fuse(conv, activation, hidden_states):
        if groups == conv.groups and padding == conv.padding:
            return activation(conv(hidden_states))
        return activation(F.conv2d(hidden_states, conv.weight, conv.bias, conv.stride, padding, conv.dilation, groups))
    post_op, algorithm = activation.onednn_post_op
    return torch.ops.mkldnn._convolution_pointwise(
        hidden_states, conv.weight, conv.bias, padding, conv.stride, conv.dilation, groups, post_op, [], algorithm
    )


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
        conv = self.reparam_conv
        if not isinstance(self.se, nn.Identity):
            return self.act(self.se(conv(hidden_states)))
        if _can_run_as_depthwise(conv, hidden_states):
            repeated = _repeat_each_channel(hidden_states, conv.out_channels // conv.in_channels)
            return convolve_and_activate(conv, self.act, repeated, groups=conv.out_channels)
        return convolve_and_activate(conv, self.act, hidden_states)


def _output_length(conv: nn.Conv2d, length: int, dim: int) -> int:
    """The output height (`dim=0`) or width (`dim=1`) of `conv` on an input `length` pixels high or wide."""
    return (length + 2 * conv.padding[dim] - conv.kernel_size[dim]) // conv.stride[dim] + 1


class FastViTHDStem(nn.Sequential):
    """Three convolution + activation layers, no squeeze-excite: 3×3 stride 2, 3×3 depthwise stride 2, 1×1.

    At CPU inference on large images, it runs over bands of output rows, each computed from the rows of the image it
    needs, so that the first layer's full-size output is never allocated (see `_STEM_BANDING_MIN_BYTES`).
    """

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        heights = [pixel_values.shape[2]]
        for layer in self:
            heights.append(_output_length(layer.reparam_conv, heights[-1], dim=0))
        band_rows = self._band_rows(pixel_values, heights)
        if band_rows is None:
            return super().forward(pixel_values)
        bands = []
        for start in range(0, heights[-1], band_rows):
            bands.append(self._rows(pixel_values, heights, start, min(start + band_rows, heights[-1])))
        return torch.cat(bands, dim=2)

    def _band_rows(self, pixel_values: torch.Tensor, heights: list[int]) -> int | None:
        """Output rows per band, or None to run the layers on the whole map."""
        first = self[0].reparam_conv
        if not (
            pixel_values.is_contiguous(memory_format=torch.channels_last)
            and _cpu_inference(pixel_values, first.weight)
        ):
            return None
        first_width = _output_length(first, pixel_values.shape[3], dim=1)
        first_row_bytes = pixel_values.shape[0] * first.out_channels * first_width * pixel_values.element_size()
        if first_row_bytes * heights[1] <= _STEM_BANDING_MIN_BYTES:
            return None
        return max(1, heights[-1] * (_STEM_BAND_BYTES // first_row_bytes) // heights[1])

    def _rows(self, pixel_values: torch.Tensor, heights: list[int], start: int, stop: int) -> torch.Tensor:
        """Rows `start` to `stop` of the stem's output. Working back from them, each layer computes only the rows the
        next one reads, its vertical zero padding added to the band only where the band meets the map's edge."""
        spans = [(start, stop, 0, 0)]  # per layer input: rows read, and zero rows above and below them
        for layer, height in zip(reversed(self), reversed(heights[:-1])):
            conv = layer.reparam_conv
            first = spans[0][0] * conv.stride[0] - conv.padding[0]
            last = (spans[0][1] - 1) * conv.stride[0] - conv.padding[0] + conv.kernel_size[0]
            spans.insert(0, (max(first, 0), min(last, height), max(-first, 0), max(last - height, 0)))
        hidden_states = pixel_values[:, :, spans[0][0] : spans[0][1]]
        for layer, (_, _, above, below) in zip(self, spans):
            hidden_states = hidden_states.contiguous(memory_format=torch.channels_last)
            if above or below:
                hidden_states = F.pad(hidden_states, (0, 0, above, below))
            conv = layer.reparam_conv
            hidden_states = convolve_and_activate(conv, layer.act, hidden_states, padding=(0, conv.padding[1]))
        return hidden_states


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
        chunk_pixels = _convffn_chunk_pixels(self, hidden_states)
        if chunk_pixels is None:
            return self.fc2(convolve_and_activate(self.fc1, self.act, hidden_states))
        return self._pointwise_layers_as_linear(hidden_states, chunk_pixels)

    def _pointwise_layers_as_linear(self, hidden_states: torch.Tensor, chunk_pixels: int) -> torch.Tensor:
        """fc1 → activation → fc2 as oneDNN linear layers over the pixels of a channels-last map, `chunk_pixels` at a
        time (pointwise layers: each pixel on its own)."""
        channels = hidden_states.shape[1]
        pixels = hidden_states.permute(0, 2, 3, 1).view(-1, channels)
        output = torch.empty_like(hidden_states, memory_format=torch.channels_last)
        output_pixels = output.permute(0, 2, 3, 1).view(-1, channels)
        fc1_weight, fc2_weight = self.fc1.weight.flatten(1), self.fc2.weight.flatten(1)
        post_op, algorithm = self.act.onednn_post_op
        linear = torch.ops.mkldnn._linear_pointwise
        for start in range(0, pixels.shape[0], chunk_pixels):
            chunk = slice(start, start + chunk_pixels)
            hidden = linear(pixels[chunk], fc1_weight, self.fc1.bias, post_op, [], algorithm)
            output_pixels[chunk] = linear(hidden, fc2_weight, self.fc2.bias, "none", [], "")
        return output


def _convffn_chunk_pixels(mlp: FastViTHDConvMlp, hidden_states: torch.Tensor) -> int | None:
    """How many pixels at a time `mlp` runs its pointwise layers as linear layers on `hidden_states`; None: as
    convolution modules, over the whole map."""
    if (
        not _HAS_ONEDNN_FUSED_LINEAR
        or mlp.act.onednn_post_op is None
        or not hidden_states.is_contiguous(memory_format=torch.channels_last)
        or not _cpu_inference(hidden_states, mlp.fc1.weight)
    ):
        return None
    pixels = hidden_states.shape[0] * hidden_states.shape[2] * hidden_states.shape[3]
    bytes_per_pixel = mlp.fc1.out_channels * hidden_states.element_size()
    if pixels * bytes_per_pixel > _CONVFFN_CHUNKING_MIN_BYTES:
        return max(1, _CONVFFN_CHUNK_BYTES // bytes_per_pixel)
    if pixels <= _CONVFFN_LINEAR_MAX_PIXELS_PER_CHANNEL * mlp.fc1.in_channels:
        return pixels
    return None


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


class FastViTHDModel(FastViTHDPreTrainedModel):
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
        self.stem = FastViTHDStem(
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

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPoolingAndNoAttention | tuple:
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        patch_size = self.config.patch_size
        height, width = pixel_values.shape[-2:]
        if height % patch_size or width % patch_size:
            raise ValueError(
                f"FastViTHD needs image sides that are multiples of {patch_size}, got {height}×{width}; "
                f"resize the image (the image processor's `size`) to a multiple of {patch_size}."
            )

        pixel_values = pixel_values.contiguous(memory_format=ACTIVATION_MEMORY_FORMAT)
        hidden_states = self.stem(pixel_values)  # (B, embed_dims[0], H/4, W/4)
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for stage in self.stages:
            hidden_states = stage(hidden_states)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        last_hidden_state = self.final_conv(hidden_states)  # (B, hidden_size, H/patch_size, W/patch_size)
        pooled_output = last_hidden_state.mean(dim=(2, 3))

        if not return_dict:
            return tuple(v for v in (last_hidden_state, pooled_output, all_hidden_states) if v is not None)
        return BaseModelOutputWithPoolingAndNoAttention(
            last_hidden_state=last_hidden_state,
            pooler_output=pooled_output,
            hidden_states=all_hidden_states,
        )
