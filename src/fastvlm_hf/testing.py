"""Random weights that let a freshly built FastVLM or FastViTHD compute the way a trained one does, for the tests and
the benchmarks (the package itself never uses this module).

A freshly built model is a poor stand-in: initialisation's small weights, zero biases, unit norms and BatchNorm
statistics of 0 and 1 leave a tiny tower's image features all but independent of the image, switch branches off, and
let a load that silently re-initialises the statistics go unnoticed. Two steps fix that:

- [`randomize_non_parameter_state`] draws BatchNorm statistics, norm scales and layer scales away from their initial
  values;
- [`give_weights_a_working_scale`] draws the weights at a multiple of fan-in scale and the biases non-zero, so that
  the image's signal reaches the output.

[`with_working_weights`] runs both on a module and puts it in eval mode.
"""

from __future__ import annotations

import torch
from torch import nn


def randomize_non_parameter_state(model: nn.Module, seed: int = 1234, layer_scales=(0.5, 1.5)) -> None:
    """Give BatchNorm running statistics (means N(0, 0.1²), variances U(0.5, 1.5)), the scales of norms (U(0.5, 1.5))
    and layer scales (uniform over `layer_scales`) non-default values, so that a load that silently re-initialises
    them (instead of reading the checkpoint) changes the outputs."""
    low, high = layer_scales
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_mean"):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
            elif name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif name.endswith("gamma"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)
            elif name.endswith("weight") and tensor.dim() == 1:  # BatchNorm, LayerNorm and RMSNorm scales
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)


def give_weights_a_working_scale(
    model: nn.Module, seed: int = 7, scale: float = 1.5, bias_std: float = 0.1, keep_layer_scales: bool = False
) -> None:
    """Draw the weight matrices and kernels at `scale` × fan-in scale (N(0, scale² / fan-in)) and the biases
    N(0, `bias_std`²): initialisation's std 0.02 and zero biases leave a tiny tower's image features all but
    independent of the image (two different images give the same features to the last bit), and a zero bias hides a
    lost one. Layer scales, (C, 1, 1) tensors with a fan-in of 1, are drawn with the weights unless
    `keep_layer_scales` keeps [`randomize_non_parameter_state`]'s. Every parameter is then rounded to a value
    bfloat16 holds exactly, so that bf16 checkpoints hold them exactly."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() >= 2 and not (keep_layer_scales and name.endswith("gamma")):
                std = scale * parameter[0].numel() ** -0.5
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
            elif name.endswith("bias"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * bias_std)
            parameter.copy_(parameter.bfloat16().float())


def with_working_weights(module: nn.Module, seed: int = 7) -> nn.Module:
    """`module` with [`randomize_non_parameter_state`]'s state and [`give_weights_a_working_scale`]'s weights, in
    eval mode (its BatchNorms use the running statistics drawn)."""
    randomize_non_parameter_state(module)
    give_weights_a_working_scale(module, seed)
    return module.eval()
