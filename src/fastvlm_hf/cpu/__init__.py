"""How FastVLM runs fast on a CPU.

`kernels`: the faster routes FastViTHD's blocks take at inference in float32 and bfloat16 (oneDNN fusions, pixel
chunks, row bands, channel repetition), each with the rule of when it applies.
`packed_linear`: the language model's linear layers with their weights in oneDNN's blocked layout (`pack_weights()`).

`fast_routes_off()` turns all of them off at once.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

_fast_routes = True


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
