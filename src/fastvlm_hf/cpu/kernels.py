"""The faster routes FastViTHD's blocks take at inference on a CPU.

Each public function computes what a block of `modeling_fastvithd` computes, by a faster route where one applies, and
returns None where none does: the block then runs its plain computation (`routes` installs them on the blocks). Every
route gives the plain result to rounding. The routes call private oneDNN operators of torch (`torch.ops.mkldnn`), which
have no backward, and apply only to inference on CPU tensors in float32 or bfloat16, outside
`fastvlm_hf.cpu.fast_routes_off()` (`_cpu_inference`).

`post_op` is what `onednn_post_op` gives for the blocks' activation: how oneDNN applies it inside a kernel, or None
where it cannot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import fast_routes_enabled, has_native_bfloat16, settings

# Activations oneDNN can apply inside a convolution or a linear layer: config name -> (post-op, algorithm).
_ONEDNN_POST_OPS = {"gelu": ("gelu", "none"), "relu": ("relu", None)}

PostOp = tuple[str, str | None]

_HAS_ONEDNN_FUSED_CONVOLUTION = torch.backends.mkldnn.is_available() and hasattr(
    torch.ops.mkldnn, "_convolution_pointwise"
)
_HAS_ONEDNN_FUSED_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_post_op(hidden_act: str) -> PostOp | None:
    """The oneDNN post-op that applies the activation `hidden_act` (a config's name) inside a kernel; None: none does."""
    return _ONEDNN_POST_OPS.get(hidden_act)


def _cpu_inference(hidden_states: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a forward pass may take the CPU inference kernels: fast routes on, no autograd, no autocast, no compiler,
    float32 or (on a CPU that computes it natively) bfloat16 on the CPU, weights present (accelerate keeps offloaded
    weights on the meta device until their module runs)."""
    return (
        fast_routes_enabled()
        and torch.backends.mkldnn.enabled
        and not torch.compiler.is_compiling()  # the compiler fuses by itself
        and not torch.is_grad_enabled()  # the fused kernels have no backward
        and not torch.is_autocast_enabled("cpu")  # they take their operands' dtypes as they are; autocast casts them
        and hidden_states.device.type == "cpu"
        and (hidden_states.dtype == torch.float32 or (hidden_states.dtype == torch.bfloat16 and has_native_bfloat16()))
        and weight.device.type == "cpu"
    )


# ----------------------------------------------------------------------------------------------------------------------
# Convolution + activation


def conv_act(
    conv: nn.Conv2d, activation: nn.Module, post_op: PostOp | None, hidden_states: torch.Tensor
) -> torch.Tensor | None:
    """`activation(conv(hidden_states))`: a convolution with a channel multiplier as a depthwise one over repeated
    channels, and the activation inside the convolution's kernel on large maps; None where neither applies."""
    if _can_run_as_depthwise(conv, hidden_states):
        repeated = _repeat_each_channel(hidden_states, conv.out_channels // conv.in_channels)
        return _conv_act(conv, activation, post_op, repeated, groups=conv.out_channels, padding=conv.padding)
    if _onednn_can_fuse(conv, post_op, hidden_states):
        return _fused_conv_act(conv, post_op, hidden_states, conv.groups, conv.padding)
    return None


def _onednn_can_fuse(conv: nn.Conv2d, post_op: PostOp | None, hidden_states: torch.Tensor) -> bool:
    return (
        _HAS_ONEDNN_FUSED_CONVOLUTION
        and post_op is not None
        and hidden_states.shape[-2] * hidden_states.shape[-1] >= settings.onednn_fusion_min_pixels
        and conv.padding_mode == "zeros"
        and _cpu_inference(hidden_states, conv.weight)
    )


def _fused_conv_act(
    conv: nn.Conv2d, post_op: PostOp, hidden_states: torch.Tensor, groups: int, padding: tuple[int, int]
) -> torch.Tensor:
    """One oneDNN convolution with the activation applied to its accumulators (the kernel torch.compile uses): no
    second pass over, and no second copy of, the output map."""
    attribute, algorithm = post_op
    return torch.ops.mkldnn._convolution_pointwise(
        hidden_states, conv.weight, conv.bias, padding, conv.stride, conv.dilation, groups, attribute, [], algorithm
    )


def _conv_act(
    conv: nn.Conv2d,
    activation: nn.Module,
    post_op: PostOp | None,
    hidden_states: torch.Tensor,
    groups: int,
    padding: tuple[int, int],
) -> torch.Tensor:
    """`activation(conv(hidden_states))` with `groups` and `padding` in place of the convolution's own, fused where
    that pays off."""
    if _onednn_can_fuse(conv, post_op, hidden_states):
        return _fused_conv_act(conv, post_op, hidden_states, groups, padding)
    return activation(F.conv2d(hidden_states, conv.weight, conv.bias, conv.stride, padding, conv.dilation, groups))


def _can_run_as_depthwise(conv: nn.Conv2d, hidden_states: torch.Tensor) -> bool:
    """Whether `conv` (one input channel per group, several outputs each) should run as a depthwise convolution over
    its input with every channel repeated: oneDNN's depthwise kernels are faster than its grouped ones."""
    multiplier = conv.out_channels // conv.in_channels
    return (
        conv.groups == conv.in_channels
        and multiplier > 1
        and conv.padding_mode == "zeros"
        and hidden_states.is_contiguous(memory_format=torch.channels_last)
        and hidden_states.numel() * multiplier * hidden_states.element_size() <= settings.depthwise_duplicate_max_bytes
        and _cpu_inference(hidden_states, conv.weight)
    )


def _repeat_each_channel(hidden_states: torch.Tensor, repeats: int) -> torch.Tensor:
    """Channels-last (B, C, H, W) -> channels-last (B, C·repeats, H, W); channel c at c·repeats … (c+1)·repeats − 1."""
    batch_size, channels, height, width = hidden_states.shape
    pixels = hidden_states.permute(0, 2, 3, 1)
    # stacking copies in long runs, where a reshape of an expanded view copies two elements at a time
    repeated = torch.stack([pixels] * repeats, dim=-1)
    return repeated.view(batch_size, height, width, channels * repeats).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------------------------------------------------
# ConvFFN pointwise layers


def pointwise_layers(
    fc1: nn.Conv2d, post_op: PostOp | None, fc2: nn.Conv2d, hidden_states: torch.Tensor
) -> torch.Tensor | None:
    """`fc2(activation(fc1(hidden_states)))` for 1×1 convolutions: as oneDNN linear layers over chunks of pixels on
    large maps and over all pixels on maps with few pixels, `fc1` fused with the activation in between; None where
    none of these applies."""
    chunk_pixels = _convffn_chunk_pixels(fc1, post_op, hidden_states)
    if chunk_pixels is not None:
        return _pointwise_as_linear(fc1, post_op, fc2, hidden_states, chunk_pixels)
    if _onednn_can_fuse(fc1, post_op, hidden_states):
        return fc2(_fused_conv_act(fc1, post_op, hidden_states, fc1.groups, fc1.padding))
    return None


def _convffn_chunk_pixels(fc1: nn.Conv2d, post_op: PostOp | None, hidden_states: torch.Tensor) -> int | None:
    """How many pixels at a time the pointwise layers run as linear layers on `hidden_states`; None: as convolution
    modules, over the whole map."""
    if (
        not _HAS_ONEDNN_FUSED_LINEAR
        or post_op is None
        or not hidden_states.is_contiguous(memory_format=torch.channels_last)
        or not _cpu_inference(hidden_states, fc1.weight)
    ):
        return None
    pixels = hidden_states.shape[0] * hidden_states.shape[2] * hidden_states.shape[3]
    bytes_per_pixel = fc1.out_channels * hidden_states.element_size()
    if pixels * bytes_per_pixel > settings.convffn_chunking_min_bytes:
        return max(1, settings.convffn_chunk_bytes // bytes_per_pixel)
    if pixels <= settings.convffn_linear_max_pixels_per_channel * fc1.in_channels:
        return pixels
    return None


def _pointwise_as_linear(
    fc1: nn.Conv2d, post_op: PostOp, fc2: nn.Conv2d, hidden_states: torch.Tensor, chunk_pixels: int
) -> torch.Tensor:
    """fc1 → activation → fc2 as oneDNN linear layers over the pixels of a channels-last map, `chunk_pixels` at a
    time (pointwise layers: each pixel on its own)."""
    channels = hidden_states.shape[1]
    pixels = hidden_states.permute(0, 2, 3, 1).view(-1, channels)
    output = torch.empty_like(hidden_states, memory_format=torch.channels_last)
    output_pixels = output.permute(0, 2, 3, 1).view(-1, channels)
    fc1_weight, fc2_weight = fc1.weight.flatten(1), fc2.weight.flatten(1)
    attribute, algorithm = post_op
    linear = torch.ops.mkldnn._linear_pointwise
    for start in range(0, pixels.shape[0], chunk_pixels):
        chunk = slice(start, start + chunk_pixels)
        hidden = linear(pixels[chunk], fc1_weight, fc1.bias, attribute, [], algorithm)
        output_pixels[chunk] = linear(hidden, fc2_weight, fc2.bias, "none", [], "")
    return output


# ----------------------------------------------------------------------------------------------------------------------
# The stem


def stem_in_row_bands(
    layers: nn.Sequential, post_op: PostOp | None, pixel_values: torch.Tensor
) -> torch.Tensor | None:
    """The stem (`layers`: convolution + activation blocks, each with `reparam_conv` and `act`) over bands of output
    rows, each computed from the rows of the image it needs, so that the first layer's full-size output is never
    allocated; None where the first layer's output is small (see `settings.stem_banding_min_bytes`)."""
    heights = [pixel_values.shape[2]]
    for layer in layers:
        heights.append(_output_length(layer.reparam_conv, heights[-1], dim=0))
    band_rows = _band_rows(layers, pixel_values, heights)
    if band_rows is None:
        return None
    bands = []
    for start in range(0, heights[-1], band_rows):
        stop = min(start + band_rows, heights[-1])
        bands.append(_stem_rows(layers, post_op, pixel_values, heights, start, stop))
    return torch.cat(bands, dim=2)


def _output_length(conv: nn.Conv2d, length: int, dim: int) -> int:
    """The output height (`dim=0`) or width (`dim=1`) of `conv` on an input `length` pixels high or wide."""
    return (length + 2 * conv.padding[dim] - conv.kernel_size[dim]) // conv.stride[dim] + 1


def _band_rows(layers: nn.Sequential, pixel_values: torch.Tensor, heights: list[int]) -> int | None:
    """Output rows per band, or None to run the layers on the whole map."""
    first = layers[0].reparam_conv
    if not (
        pixel_values.is_contiguous(memory_format=torch.channels_last) and _cpu_inference(pixel_values, first.weight)
    ):
        return None
    first_width = _output_length(first, pixel_values.shape[3], dim=1)
    first_row_bytes = pixel_values.shape[0] * first.out_channels * first_width * pixel_values.element_size()
    if first_row_bytes * heights[1] <= settings.stem_banding_min_bytes:
        return None
    return max(1, heights[-1] * (settings.stem_band_bytes // first_row_bytes) // heights[1])


def _stem_rows(
    layers: nn.Sequential, post_op: PostOp | None, pixel_values: torch.Tensor, heights: list[int], start: int, stop: int
) -> torch.Tensor:
    """Rows `start` to `stop` of the stem's output. Working back from them, each layer computes only the rows the
    next one reads, its vertical zero padding added to the band only where the band meets the map's edge."""
    spans = [(start, stop, 0, 0)]  # per layer input: rows read, and zero rows above and below them
    for layer, height in zip(reversed(layers), reversed(heights[:-1])):
        conv = layer.reparam_conv
        first = spans[0][0] * conv.stride[0] - conv.padding[0]
        last = (spans[0][1] - 1) * conv.stride[0] - conv.padding[0] + conv.kernel_size[0]
        spans.insert(0, (max(first, 0), min(last, height), max(-first, 0), max(last - height, 0)))
    hidden_states = pixel_values[:, :, spans[0][0] : spans[0][1]]
    for layer, (_, _, above, below) in zip(layers, spans):
        hidden_states = hidden_states.contiguous(memory_format=torch.channels_last)
        if above or below:
            hidden_states = F.pad(hidden_states, (0, 0, above, below))
        conv = layer.reparam_conv
        hidden_states = _conv_act(
            conv, layer.act, post_op, hidden_states, groups=conv.groups, padding=(0, conv.padding[1])
        )
    return hidden_states
