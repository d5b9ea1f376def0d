"""How FastVLM's models load and save: any of the three layouts in, this package's own layout out.

`CheckpointLoadingMixin` gives the models their `from_pretrained` and `save_pretrained`; the model classes hold only
the architecture.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch
from transformers import GenerationConfig

from .. import quantization
from ..cpu.routes import fit_cpu_routes_after_loading
from ..compat import (
    PretrainedConfig,
    complete_disk_offload,
    mismatched_key_names,
    own_layout_save_kwargs,
    without_hub_kernels_unless_asked,
)
from .hub import describe
from .keys import UNUSED_KEYS
from .layouts import APPLE


class CheckpointLoadingMixin:
    """`from_pretrained` for the three layouts and `save_pretrained` into ours, for a `PreTrainedModel` that also has
    `pack_weights`/`unpack_weights` (`cpu.packing.WeightPackingMixin`)."""

    _keys_to_ignore_on_load_unexpected = [re.escape(key) for key in UNUSED_KEYS[APPLE]]
    # `{target: source}` of the weights the model ties when its config sets `tie_word_embeddings`.
    _tied_weight_sources: dict[str, str] = {}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        r"""
        Loads any of the three FastVLM layouts: ours, Apple's (`model_type: "llava_qwen2"`, e.g. `apple/FastVLM-0.5B`)
        and transformers' native one (`model_type: "fast_vlm"`). The weights of the last two are renamed while they
        load (`checkpoints.key_mapping`), and they must then fill the model exactly: any missing, unexpected or
        misshapen weight raises a `ValueError` that names it, instead of leaving randomly initialised weights behind.

        With a bitsandbytes `quantization_config`, only the language model's linear layers are quantized: the vision
        tower, the projector and the output head stay in the compute dtype, whatever `llm_int8_skip_modules` says.

        Hub kernels (transformers' `use_kernels`, on by default from transformers 5.25) stay off unless
        `use_kernels=True` or a `kernel_config` asks for them: no code from the Hub runs unasked.
        """
        checkpoint = describe(pretrained_model_name_or_path, **kwargs)
        kwargs = without_hub_kernels_unless_asked(kwargs)
        kwargs = quantization.with_unquantized_modules(cls, pretrained_model_name_or_path, kwargs, checkpoint)
        caller_renames = "key_mapping" in kwargs
        key_mapping = None if caller_renames else checkpoint.key_mapping()
        if key_mapping is None:  # our own layout, or the caller's own renaming
            return cls._after_loading(super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs))
        output_loading_info = kwargs.pop("output_loading_info", False)
        # Misshapen weights are let through to be reported with the rest by `check_loading_info`.
        kwargs.update(key_mapping=key_mapping, output_loading_info=True, ignore_mismatched_sizes=True)
        model, loading_info = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        cls._after_loading(model)
        check_loading_info(model, loading_info, pretrained_model_name_or_path)
        if model.config.tie_word_embeddings:
            # Apple's checkpoints store the output embedding even when their config ties it; like Apple's loader, we
            # tie it to the input embedding (transformers 5 keeps the stored copy when the two differ).
            model.tie_weights()
        if model.can_generate():
            fill_generation_special_tokens(model.generation_config, model.config)
        return (model, loading_info) if output_loading_info else model

    @classmethod
    def _after_loading(cls, loaded):
        """What every layout needs once transformers has loaded it (`loaded` may be a `(model, info)` pair)."""
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        quantization.keep_standard_4bit_layout(model)
        quantization.say_8bit_casts_once(model)
        complete_disk_offload(model, cls._tied_weight_sources)
        fit_cpu_routes_after_loading(model)
        return loaded

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Saves in this package's own layout, however the model was loaded (see `from_pretrained`), with plain
        weights whether or not `pack_weights` packed them."""
        packed = self.unpack_weights()
        try:
            return super().save_pretrained(save_directory, *args, **own_layout_save_kwargs(kwargs))
        finally:
            if packed:
                self.pack_weights()


def check_loading_info(model: torch.nn.Module, loading_info: dict[str, Any], source: str | os.PathLike) -> None:
    """Raises unless a foreign checkpoint filled every weight of `model` with one of the right shape, and had no
    weights left over."""
    missing, unexpected = sorted(loading_info["missing_keys"]), sorted(loading_info["unexpected_keys"])
    prefix = model.base_model_prefix
    if not hasattr(model, prefix):  # a base model, from a checkpoint with a head: the head's weights are left over
        unexpected = [key for key in unexpected if key.startswith(f"{prefix}.")]
    mismatched = sorted(mismatched_key_names(loading_info))
    if not (missing or unexpected or mismatched):
        return
    vision_keys = [key for key in model.state_dict() if "vision_tower." in key]
    if all(key in missing for key in vision_keys):
        mlpackage = os.path.join(str(source), "fastvithd.mlpackage")
        found = "fastvithd.mlpackage and " if os.path.isdir(mlpackage) else ""
        raise ValueError(
            f"{source} has no vision-tower weights: found {found}{_some(unexpected + mismatched, 'other weight')}. "
            "This looks like one of Apple's MLX/Core ML exports (apple/FastVLM-*-fp16, -int8, -int4), whose vision "
            "tower is a Core ML package that PyTorch cannot run. Load Apple's PyTorch checkpoints instead: "
            "apple/FastVLM-0.5B, -1.5B or -7B."
        )
    found = {"missing weight": missing, "unexpected weight": unexpected, "misshapen weight": mismatched}
    problems = [_some(keys, noun) for noun, keys in found.items() if keys]
    raise ValueError(
        f"{source} does not fit FastVLM as its config.json describes it: {'; '.join(problems)} (names after renaming "
        f"to FastVLM's layout)."
    )


def fill_generation_special_tokens(generation_config: GenerationConfig, config: PretrainedConfig) -> None:
    """Takes the special token ids a generation config lacks from the model config.

    Apple's `generation_config.json` names none, and transformers 5 no longer falls back on `config.json`'s: generation
    would not stop at `<|im_end|>`.
    """
    text_config = config.get_text_config(decoder=True)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(generation_config, name, None) is None:
            setattr(generation_config, name, getattr(text_config, name, None))


def _some(keys: list[str], noun: str, shown: int = 3) -> str:
    """`"5 missing weights ('a', 'b', 'c' and 2 more)"`."""
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    plural = "" if len(keys) == 1 else "s"
    return f"{len(keys)} {noun}{plural} ({', '.join(repr(key) for key in keys[:shown])}{more})"
