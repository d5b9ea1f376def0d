"""pytest marks for what this machine can run."""

import pytest


def _needs_native_bfloat16():
    from fastvlm_hf.cpu import has_native_bfloat16

    return pytest.mark.skipif(
        not has_native_bfloat16(),
        reason="this CPU computes bfloat16 without native support (no AVX512-BF16, AMX or AVX-512 BW/VL/DQ), where "
        "the bfloat16 kernels under test do not run",
    )


needs_native_bfloat16 = _needs_native_bfloat16()
