"""bitsandbytes loading: only the language model's linear layers are quantized.

FastViTHD is almost all convolutions, which bitsandbytes never touches, but its attention stages hold `nn.Linear`
layers (`qkv`, `proj`) that it would quantize, as it would the small, precision-sensitive projector. By default
transformers keeps only the output head unquantized, and it drops even that default as soon as the user gives
`llm_int8_skip_modules`. `with_unquantized_modules` adds the model's own list to whatever the user asked for.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any

from transformers.utils import cached_file

from . import checkpoints
from .checkpoints import CheckpointDescription
from .compat import PretrainedConfig

_BNB_METHOD = "bitsandbytes"
# Weight names bitsandbytes adds next to a quantized layer's weight: 4-bit quantization state, 8-bit row scales.
_QUANT_STATE_MARKERS = (".weight.absmax", ".weight.quant_map", ".weight.quant_state.")
_INT8_SCALES = ".SCB"


def is_bitsandbytes_config(quantization_config: Any) -> bool:
    """Whether a `quantization_config` (object or dict, as given or as `config.json` stores it) is bitsandbytes'."""
    if quantization_config is None:
        return False
    if not isinstance(quantization_config, dict):
        quantization_config = quantization_config.to_dict()
    method = quantization_config.get("quant_method")
    return method == _BNB_METHOD or (
        method is None and bool(quantization_config.get("load_in_4bit") or quantization_config.get("load_in_8bit"))
    )


def merge_skip_modules(quantization_config: Any, modules: list[str]) -> Any:
    """A copy of a bitsandbytes config whose `llm_int8_skip_modules` also names `modules` (the user's entries come
    first and are kept as given)."""
    if isinstance(quantization_config, dict):
        merged = dict(quantization_config)
        user_modules = merged.get("llm_int8_skip_modules")
    else:
        merged = copy.deepcopy(quantization_config)
        user_modules = merged.llm_int8_skip_modules
    if user_modules is not None and (isinstance(user_modules, str) or not isinstance(user_modules, (list, tuple))):
        raise TypeError(
            f"`llm_int8_skip_modules` must be a list of module names, got {user_modules!r}; e.g. "
            '`llm_int8_skip_modules=["model.language_model.layers.0"]`.'
        )
    user_modules = list(user_modules or [])
    skip = user_modules + [name for name in modules if name not in user_modules]
    if isinstance(merged, dict):
        merged["llm_int8_skip_modules"] = skip
    else:
        merged.llm_int8_skip_modules = skip
    return merged


def with_unquantized_modules(
    model_class: type, pretrained_model_name_or_path, kwargs: dict[str, Any], checkpoint: CheckpointDescription
) -> dict:
    """`from_pretrained`'s kwargs, changed so that bitsandbytes leaves `model_class._unquantized_modules` alone.

    A `quantization_config` given by the caller gets the modules added. A bitsandbytes config stored in the
    checkpoint's `config.json` (a pre-quantized checkpoint, as `checkpoint` describes it) gets those of them the
    checkpoint stores unquantized, so that checkpoints quantized elsewhere, vision tower included, still load as they
    were saved.
    """
    modules = list(model_class._unquantized_modules)
    if is_bitsandbytes_config(kwargs.get("quantization_config")):
        kwargs = {**kwargs, "quantization_config": merge_skip_modules(kwargs["quantization_config"], modules)}

    config = kwargs.get("config")
    if isinstance(config, PretrainedConfig):
        stored = getattr(config, "quantization_config", None)
    elif config is None:
        stored = checkpoint.stored_quantization_config()
    else:  # a path to a config: transformers reads it
        return kwargs
    if not is_bitsandbytes_config(stored):
        return kwargs

    stored_modules = _skip_list(stored)
    quantized = _modules_stored_quantized(pretrained_model_name_or_path, kwargs, checkpoint.layout)
    if quantized is None:  # no safetensors weights to read the names of: trust the stored config
        return kwargs
    keep = [name for name in modules if not _covers(name, quantized) and name not in stored_modules]
    if not keep:
        return kwargs
    if not isinstance(config, PretrainedConfig):
        config = model_class.config_class.from_pretrained(
            pretrained_model_name_or_path, **checkpoints.hub_kwargs(kwargs)
        )
    else:
        config = copy.deepcopy(config)
    config.quantization_config = merge_skip_modules(stored, keep)
    return {**kwargs, "config": config}


def keep_standard_4bit_layout(model) -> None:
    """Stops bitsandbytes from repacking 4-bit weights for its AVX512-BF16 CPU kernels, which it otherwise does on
    their first CPU forward pass: its way back from that layout loses precision for some shapes (64 x 128 does),
    and `save_pretrained` and `dequantize` both take it."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


# bitsandbytes logs this on every 8-bit matmul whose input is not float16 (every one on CPU): 56 lines for 4 tokens.
_REPEATED_8BIT_NOTICE = "MatMul8bitLt: inputs will be cast"


class _FirstTimeOnly(logging.Filter):
    """Lets the first record that starts with `prefix` through, and drops the ones after it."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix, self.seen = prefix, False

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(self.prefix):
            return True
        first, self.seen = not self.seen, True
        return first


def say_8bit_casts_once(model) -> None:
    """After an 8-bit load: bitsandbytes' notice that it casts the inputs is shown once, not on every matmul."""
    if not getattr(model, "is_loaded_in_8bit", False):
        return
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(existing, _FirstTimeOnly) for existing in logger.filters):
        logger.addFilter(_FirstTimeOnly(_REPEATED_8BIT_NOTICE))


def _skip_list(quantization_config: Any) -> list[str]:
    if isinstance(quantization_config, dict):
        return list(quantization_config.get("llm_int8_skip_modules") or [])
    return list(quantization_config.llm_int8_skip_modules or [])


def _covers(module: str, names: set[str]) -> bool:
    """Whether any of `names` is `module` or inside it; a checkpoint of the model with a head and the base model name
    the same module with and without the base model's `model.` prefix."""
    module = module.removeprefix("model.")
    return any(name == module or name.startswith(module + ".") for name in names)


def _modules_stored_quantized(pretrained_model_name_or_path, kwargs: dict[str, Any], layout: str) -> set[str] | None:
    """Names (in our layout, without a leading `model.`) of the modules a checkpoint of `layout` stores quantized, or
    None when its weight names cannot be read without loading them."""
    names = _stored_weight_names(pretrained_model_name_or_path, kwargs)
    if names is None:
        return None
    modules = set()
    for name in names:
        for marker in _QUANT_STATE_MARKERS:
            if marker in name:
                modules.add(name[: name.index(marker)])
        if name.endswith(_INT8_SCALES):
            modules.add(name.removesuffix(_INT8_SCALES))
    renamed = checkpoints.to_fastvlm_state_dict(dict.fromkeys(f"{module}.weight" for module in modules), layout)
    return {name.removesuffix(".weight").removeprefix("model.") for name in renamed}


def _stored_weight_names(pretrained_model_name_or_path, kwargs: dict[str, Any]) -> list[str] | None:
    hub_kwargs = checkpoints.hub_kwargs(kwargs)
    for filename in ("model.safetensors.index.json", "model.safetensors"):
        try:
            resolved = cached_file(
                os.fspath(pretrained_model_name_or_path),
                filename,
                _raise_exceptions_for_missing_entries=False,
                **hub_kwargs,
            )
        except OSError:
            return None
        if resolved is None:
            continue
        if filename.endswith(".json"):
            with open(resolved, encoding="utf-8") as index:
                return list(json.load(index)["weight_map"])
        from safetensors import safe_open

        with safe_open(resolved, framework="pt") as weights:
            return list(weights.keys())
    return None
