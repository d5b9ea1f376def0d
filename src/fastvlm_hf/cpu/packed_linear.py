"""Linear layers whose weights oneDNN has reordered once into the blocked layout of its CPU kernels.

A plain `nn.Linear` in bfloat16 or float32 on CPU pays that reorder on every call: for a decoding step (one token)
it costs as much as the product itself. A `PackedLinear` holds the reordered weight instead of the plain one, and
gives the same results (bit for bit in bfloat16 on contiguous inputs, to rounding in float32). It is for inference:
it has no gradient, and it does not move between devices or dtypes (`unpack_linear_layers` gives back `nn.Linear`s).
Inside `fastvlm_hf.cpu.fast_routes_off()` it multiplies by the plain weight instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import fast_routes_enabled

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)
# The kernels choose their blocked layout for an expected number of input rows; one row is a decoding step's.
_EXPECTED_ROWS = 1


def can_pack(module: nn.Module) -> bool:
    """Whether `module` is a plain `nn.Linear` (not a quantized or other subclass) that `PackedLinear` can replace."""
    if type(module) is not nn.Linear or not torch.backends.mkldnn.is_available():
        return False
    weight = module.weight
    if weight.device.type != "cpu" or weight.dtype not in PACKABLE_DTYPES:
        return False
    return weight.dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported()


class PackedLinear(nn.Module):
    """An inference-only `nn.Linear` whose weight is stored in oneDNN's blocked layout (see the module docstring).

    `state_dict()` still holds the plain `weight`, so `save_pretrained` writes the usual checkpoint.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if not can_pack(linear):
            raise ValueError(f"cannot pack {linear}: only a CPU nn.Linear in {PACKABLE_DTYPES} can be packed")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = linear.weight.dtype
        self.weight_requires_grad = linear.weight.requires_grad
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), _EXPECTED_ROWS)
        self.bias = linear.bias
        self._register_state_dict_hook(_add_plain_weight)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.device.type != "cpu" or hidden_states.dtype != self.dtype:
            raise RuntimeError(
                f"this layer's weight is packed for {self.dtype} on CPU but got {hidden_states.dtype} on "
                f"{hidden_states.device}: call `unpack_weights()` before moving or casting the model"
            )
        bias_needs_grad = self.bias is not None and self.bias.requires_grad
        if torch.is_grad_enabled() and (hidden_states.requires_grad or bias_needs_grad):
            raise RuntimeError("packed linear layers have no gradient: call `unpack_weights()` before training")
        if not fast_routes_enabled():
            return F.linear(hidden_states, self.packed_weight.to_dense(), self.bias)
        return torch.ops.mkldnn._linear_pointwise(hidden_states, self.packed_weight, self.bias, "none", [], "")

    def unpack(self) -> nn.Linear:
        """A plain `nn.Linear` with this layer's weight and bias."""
        with torch.device("meta"):
            linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, dtype=self.dtype)
        linear.weight = nn.Parameter(self.packed_weight.to_dense(), requires_grad=self.weight_requires_grad)
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _add_plain_weight(module: PackedLinear, state_dict: dict, prefix: str, local_metadata) -> None:
    state_dict[prefix + "weight"] = module.packed_weight.to_dense()


def pack_linear_layers(model: nn.Module, prefixes: tuple[str, ...]) -> list[str]:
    """Replaces every packable `nn.Linear` under the submodules named in `prefixes` by a `PackedLinear`; returns the
    names of the layers it packed."""

    def wanted(name: str, module: nn.Module) -> bool:
        return can_pack(module) and any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)

    return _replace(model, wanted, PackedLinear)


def unpack_linear_layers(model: nn.Module) -> list[str]:
    """Replaces every `PackedLinear` in `model` by the plain `nn.Linear` it stands for; returns their names."""
    return _replace(model, lambda name, module: isinstance(module, PackedLinear), PackedLinear.unpack)


def _replace(model: nn.Module, wanted, replacement) -> list[str]:
    # Names first, then one layer at a time, so that each old weight is freed before the next layer is converted:
    # memory grows by one layer's weight at most, not by all of them.
    names = [name for name, module in model.named_modules() if wanted(name, module)]
    for name in names:
        model.set_submodule(name, replacement(model.get_submodule(name)))
    return names
