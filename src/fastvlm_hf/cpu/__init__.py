"""How FastVLM runs fast on a CPU.

`kernels`: the faster routes FastViTHD's blocks take at inference in float32 and bfloat16 (oneDNN fusions, pixel
chunks, row bands, channel repetition), each with the rule of when it applies.
`routes`: which block takes which of them, put on the encoder's blocks from outside their forwards.
`packed_linear`: the language model's linear layers with their weights in oneDNN's blocked layout (`pack_weights()`).

`fast_routes_off()` turns all of them off at once; `settings` holds the sizes at which each route takes over.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator

import torch

_fast_routes = True


@dataclasses.dataclass
class CPURouteSettings:
    """When each CPU route of `kernels` takes over from the plain computation (benchmarks/levers.py measures what each
    gives). Set a field on `settings` to move a threshold; `math.inf` or 0 turns a route off, as the comments say."""

    # One oneDNN kernel for a convolution and its activation, on maps of at least this many pixels (the fused kernel
    # repacks its weights on every call: it pays off on large maps only); `math.inf`: never.
    onednn_fusion_min_pixels: float = 64 * 64
    # A ConvFFN whose hidden map would be larger runs its pointwise layers over chunks of pixels, each chunk's hidden
    # activations about `convffn_chunk_bytes`, so the large map is never allocated (glibc serves allocations over
    # 32 MiB with fresh pages, which page-fault on every call); `math.inf`: never.
    convffn_chunking_min_bytes: float = 32 * 2**20
    convffn_chunk_bytes: int = 3 * 2**20
    # A ConvFFN on a map with at most this many pixels per input channel runs its pointwise layers as linear layers
    # over all pixels at once (there the convolution kernels spend most of their time on their large weights); 0: never.
    convffn_linear_max_pixels_per_channel: float = 1
    # Most bytes of input a strided convolution with a channel multiplier may duplicate to run as a depthwise
    # convolution (oneDNN's depthwise kernels are faster than its grouped ones); 0: never.
    depthwise_duplicate_max_bytes: float = 32 * 2**20
    # A stem whose first layer would output more runs over bands of rows, each band's first-layer output about
    # `stem_band_bytes`, so that layer's full-size map is never allocated; `math.inf`: never.
    stem_banding_min_bytes: float = 32 * 2**20
    stem_band_bytes: int = 8 * 2**20


settings = CPURouteSettings()


@functools.cache
def has_native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16/AMX, or AVX-512 BW/VL/DQ, or AVX-NE-CONVERT), as
    oneDNN's bfloat16 kernels need. Elsewhere they refuse to run, and plain PyTorch computes bfloat16 far slower
    than float32."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def fast_routes_enabled() -> bool:
    """False inside `fast_routes_off()`."""
    return _fast_routes


@contextlib.contextmanager
def fast_routes_off() -> Iterator[None]:
    """Inside the block (in every thread), the encoder's blocks compute as `modeling_fastvithd` writes them and packed
    linear layers multiply by their plain weight: the plain computation, to compare a result against or to measure
    what the fast routes give."""
    global _fast_routes
    previous, _fast_routes = _fast_routes, False
    try:
        yield
    finally:
        _fast_routes = previous
