"""What PEFT needs to know about FastVLM: which layers get LoRA adapters, which train in full, what stays frozen."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..cpu.packed_linear import PackedLinear

PROJECTOR = "multi_modal_projector"
VISION_TOWER = "vision_tower"
LANGUAGE_MODEL = "language_model"
PROJECTOR_MODES = ("frozen", "lora", "full")


def _base_model(model: nn.Module) -> nn.Module:
    """The FastVLM model inside a PEFT model, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def check_trainable(model: nn.Module) -> None:
    """Raises unless `model` can be trained: layers packed by `pack_weights()` have no gradient."""
    packed = [name for name, module in _base_model(model).named_modules() if isinstance(module, PackedLinear)]
    if packed:
        raise ValueError(
            f"{len(packed)} linear layers (e.g. {packed[0]!r}) are packed for CPU inference by `pack_weights()` and "
            "have no gradient: call `model.unpack_weights()` before training."
        )


def _in_module(name: str, module: str) -> bool:
    return name.startswith(module + ".") or f".{module}." in name


def lora_target_modules(model: nn.Module, projector: bool = False) -> list[str]:
    """The names of the language model's linear layers (every decoder layer's attention and MLP projections), for
    `peft.LoraConfig(target_modules=...)`; with `projector=True`, the projector's two linear layers as well.

    The vision tower and the output head are never listed: LoRA on the head would be bypassed by TRL's fused loss.
    """
    check_trainable(model)
    wanted = (LANGUAGE_MODEL, PROJECTOR) if projector else (LANGUAGE_MODEL,)
    return [
        name.removesuffix(".base_layer")  # a layer that has LoRA already keeps its own linear layer as `base_layer`
        for name, module in _base_model(model).named_modules()
        if isinstance(module, nn.Linear) and any(_in_module(name, part) for part in wanted) and ".lora_" not in name
    ]


def lora_config(
    model: nn.Module,
    r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.05,
    projector: str = "frozen",
    train_vision_tower: bool = False,
    **kwargs: Any,
):
    """A `peft.LoraConfig` for FastVLM: LoRA on the language model's linear layers, the vision tower frozen.

    Args:
        projector: `"frozen"`, `"lora"` (LoRA on its two linear layers too) or `"full"` (trained in full, saved with
            the adapter).
        train_vision_tower: train the vision tower in full (saved with the adapter; its BatchNorm statistics stay
            those of the checkpoint, see `prepare_model_for_training`).
        kwargs: more `LoraConfig` fields.
    """
    from peft import LoraConfig

    if projector not in PROJECTOR_MODES:
        raise ValueError(f"projector must be one of {', '.join(PROJECTOR_MODES)}, got {projector!r}")
    modules_to_save = [PROJECTOR] if projector == "full" else []
    if train_vision_tower:
        modules_to_save.append(VISION_TOWER)
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=lora_target_modules(model, projector=projector == "lora"),
        modules_to_save=modules_to_save or None,
        task_type="CAUSAL_LM",
        **kwargs,
    )


def prepare_model_for_training(model: nn.Module) -> nn.Module:
    """Readies a FastVLM model for fine-tuning, before PEFT wraps it; returns it.

    - Checks that no layer is packed (`pack_weights()`).
    - Keeps the vision tower's BatchNorm layers in eval mode whenever the tower runs, also after `model.train()`: they
      normalise with the checkpoint's running statistics and never update them. Training mode would normalise with the
      statistics of each small batch and overwrite the checkpoint's, changing a tower that was meant to stay frozen
      (and a trained tower would learn under other statistics than it runs with).
    - Keeps those statistics in the dtype of the layer's weights: `peft.prepare_model_for_kbit_training` casts the
      weights of a half-precision model to float32 but not the statistics, which BatchNorm refuses.
    - Runs a frozen tower (no parameter, and not the image, needs a gradient) without recording its operations for
      backward, as at inference: nothing of it is kept for the backward pass, and on CPU it takes the inference
      kernels. transformers' `enable_input_require_grads` (which PEFT and checkpointing call) would otherwise mark
      the stem's output as needing a gradient and make the backward pass run through the whole frozen tower.
    """
    check_trainable(model)
    for name, module in _base_model(model).named_modules():
        if name.endswith(VISION_TOWER) and not getattr(module, "_prepared_for_training", False):
            module.register_forward_pre_hook(_before_tower)
            module.register_forward_hook(_after_tower, always_call=True)
            module._prepared_for_training = True
    return model


def _before_tower(module: nn.Module, args: tuple) -> None:
    # The module is looked up on each call: PEFT's trainable copy of the tower carries these hooks too.
    module._grad_enabled_outside = torch.is_grad_enabled()
    frozen = not any(parameter.requires_grad for parameter in module.parameters())
    if frozen and not any(isinstance(arg, torch.Tensor) and arg.requires_grad for arg in args):
        torch.set_grad_enabled(False)
    _batch_norm_in_eval_mode(module)


def _after_tower(module: nn.Module, args: tuple, output) -> None:
    torch.set_grad_enabled(module._grad_enabled_outside)


def _batch_norm_in_eval_mode(module: nn.Module) -> None:
    for submodule in module.modules():
        if isinstance(submodule, _BatchNorm):
            submodule.eval()
            dtype = submodule.weight.dtype
            if submodule.running_mean.dtype != dtype:
                submodule.running_mean.data = submodule.running_mean.data.to(dtype)
                submodule.running_var.data = submodule.running_var.data.to(dtype)
