"""The few places where transformers 4.57 and 5.x differ, each in one small helper."""

from __future__ import annotations

from typing import Any

import transformers
from packaging import version

TRANSFORMERS_VERSION = version.parse(transformers.__version__)
IS_TRANSFORMERS_5 = TRANSFORMERS_VERSION.major >= 5

try:  # 5.x: init functions that leave tensors already loaded from a checkpoint untouched
    from transformers import initialization as weight_init
except ImportError:  # 4.x: `from_pretrained` only calls `_init_weights` on modules it did not load
    from torch.nn import init as weight_init

from transformers import PretrainedConfig  # 5.x keeps the 4.x name as an alias of `PreTrainedConfig`

__all__ = [
    "HAS_NATIVE_FAST_VLM",
    "IS_TRANSFORMERS_5",
    "PROCESSOR_CLASS_ATTRIBUTES",
    "PretrainedConfig",
    "is_first_generation_step",
    "mismatched_key_names",
    "own_layout_save_kwargs",
    "tied_weights_keys",
    "weight_init",
]

# 5.0 and later ship transformers' own `fast_vlm` (`FastVlmConfig`, `FastVlmForConditionalGeneration`).
HAS_NATIVE_FAST_VLM = hasattr(transformers, "FastVlmConfig")

# 4.x finds a processor's parts through these class attributes; 5.x infers them from `__init__`'s parameters and
# warns that the attributes are deprecated.
PROCESSOR_CLASS_ATTRIBUTES: dict[str, Any] = (
    {}
    if IS_TRANSFORMERS_5
    else {
        "attributes": ["image_processor", "tokenizer"],
        "image_processor_class": "AutoImageProcessor",
        "tokenizer_class": "AutoTokenizer",
    }
)


def tied_weights_keys(target_to_source: dict[str, str]) -> dict[str, str] | list[str]:
    """`_tied_weights_keys`: a `{target: source}` dict on 5.x, a list of targets on 4.x."""
    if IS_TRANSFORMERS_5:
        return dict(target_to_source)
    return list(target_to_source)


def is_first_generation_step(model_inputs: dict[str, Any], is_first_iteration: bool | None) -> bool:
    """Whether `generate` is preparing the prefill step of this call (which may continue from a filled cache).

    5.x passes `is_first_iteration`. Up to 5.3 (and on 4.x) `cache_position` tells instead: it starts at 0 on a fresh
    prefill, and spans more than the one new token of a decoding step when a call continues a cache with a new turn.
    With neither, an empty cache means prefill.
    """
    if is_first_iteration is not None:
        return bool(is_first_iteration)
    cache_position = model_inputs.get("cache_position")
    if cache_position is not None:
        return int(cache_position[0]) == 0 or cache_position.numel() > 1
    past_key_values = model_inputs.get("past_key_values")
    return past_key_values is None or past_key_values.get_seq_length() == 0


def mismatched_key_names(loading_info: dict[str, Any]) -> list[str]:
    """Names of the weights `from_pretrained(output_loading_info=True)` found with the wrong shape: 5.x lists
    `(name, checkpoint shape, model shape)` tuples, 4.x the names alone."""
    return [entry if isinstance(entry, str) else entry[0] for entry in loading_info["mismatched_keys"]]


def own_layout_save_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`save_pretrained` kwargs that write the model's own key names: 5.x would otherwise write weights back under
    the names a `key_mapping` renamed them from when they loaded; 4.x always writes its own names."""
    if IS_TRANSFORMERS_5:
        kwargs.setdefault("save_original_format", False)
    return kwargs
