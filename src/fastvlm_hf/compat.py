"""The few places where transformers 4.57 and 5.x differ, each in one small helper."""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import Any, Callable

import transformers
from packaging import version
from transformers.modeling_outputs import BaseModelOutputWithPast

TRANSFORMERS_VERSION = version.parse(transformers.__version__)
IS_TRANSFORMERS_5 = TRANSFORMERS_VERSION.major >= 5

try:  # 5.x: init functions that leave tensors already loaded from a checkpoint untouched
    from transformers import initialization as weight_init
except ImportError:  # 4.x: `from_pretrained` only calls `_init_weights` on modules it did not load
    from torch.nn import init as weight_init

from transformers import PretrainedConfig  # 5.x keeps the 4.x name as an alias of `PreTrainedConfig`

__all__ = [
    "CACHE_NAME",
    "NEWEST_TESTED_TRANSFORMERS",
    "HAS_NATIVE_FAST_VLM",
    "IS_TRANSFORMERS_5",
    "PROCESSOR_CLASS_ATTRIBUTES",
    "PretrainedConfig",
    "cache_of",
    "checkpointing_arguments",
    "complete_disk_offload",
    "is_first_generation_step",
    "kbit_training_arguments",
    "mismatched_key_names",
    "own_layout_save_kwargs",
    "takes_cache",
    "tied_weights_keys",
    "UntestedTransformersWarning",
    "VLMBaseModelOutput",
    "VLMCausalLMOutput",
    "generation_inputs_kwargs",
    "language_model_kwargs",
    "vlm_output_fields",
    "warn_if_untested_transformers",
    "without_hub_kernels_unless_asked",
    "weight_init",
]

# The newest transformers release line the test suite runs on. `.ci/run` fails when the newest release is past it,
# so raising it (after the suite passes on the new release) is part of supporting a new transformers.
NEWEST_TESTED_TRANSFORMERS = "5.25"


class UntestedTransformersWarning(UserWarning):
    """The installed transformers is newer than any release fastvlm-hf was tested with."""


def warn_if_untested_transformers(installed: version.Version | None = None) -> None:
    """One line, once (at import), when transformers is newer than `NEWEST_TESTED_TRANSFORMERS`; nothing otherwise."""
    installed = installed or TRANSFORMERS_VERSION
    newest_tested = version.parse(NEWEST_TESTED_TRANSFORMERS)
    if (installed.major, installed.minor) <= (newest_tested.major, newest_tested.minor):
        return
    next_line = f"{newest_tested.major}.{newest_tested.minor + 1}"
    warnings.warn(
        f"fastvlm-hf is tested with transformers up to {NEWEST_TESTED_TRANSFORMERS}.x and transformers {installed} is "
        "installed: if something fails, please report it on fastvlm-hf's issue tracker, and meanwhile use "
        f'pip install "transformers<{next_line}".',
        UntestedTransformersWarning,
        stacklevel=3,
    )


# 5.0 and later ship transformers' own `fast_vlm` (`FastVlmConfig`, `FastVlmForConditionalGeneration`).
HAS_NATIVE_FAST_VLM = hasattr(transformers, "FastVlmConfig")

# The output classes a vision-language model extends: from 5.24 on, transformers' multimodal ones, which also carry the
# image encoder's output (`image_outputs`).
try:
    from transformers.modeling_outputs import MultimodalBaseModelOutputWithPast as VLMBaseModelOutput
    from transformers.modeling_outputs import MultimodalCausalLMOutputWithPast as VLMCausalLMOutput
except ImportError:
    from transformers.modeling_outputs import BaseModelOutputWithPast as VLMBaseModelOutput
    from transformers.modeling_outputs import CausalLMOutputWithPast as VLMCausalLMOutput


def vlm_output_fields(cache: Any, image_outputs: Any) -> dict[str, Any]:
    """The fields of FastVLM's outputs whose names or presence follow the installed transformers: the cache under
    `CACHE_NAME`, and the image encoder's output where the output classes have `image_outputs` (5.24 on)."""
    fields = {CACHE_NAME: cache}
    if "image_outputs" in VLMCausalLMOutput.__dataclass_fields__:
        fields["image_outputs"] = image_outputs
    return fields


# The name of the KV cache in model inputs, outputs and `generate`'s kwargs: 5.24 renamed `past_key_values` to `cache`
# (the old name still works on inputs, with a deprecation warning). Read from the output class, so that it follows
# transformers instead of a version number.
CACHE_NAME = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"

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


def image_processor_registration(image_processor_class: type) -> dict[str, Any]:
    """`AutoImageProcessor.register`'s arguments for FastVLM's one image processor. From 5.23 on transformers picks an
    image processor per backend, torchvision's first where it is installed, and warns when it falls back to PIL's; the
    one processor serves both."""
    if "image_processor_classes" in inspect.signature(transformers.AutoImageProcessor.register).parameters:
        return {"image_processor_classes": {"pil": image_processor_class, "torchvision": image_processor_class}}
    return {"slow_image_processor_class": image_processor_class}


def tied_weights_keys(target_to_source: dict[str, str]) -> dict[str, str] | list[str]:
    """`_tied_weights_keys`: a `{target: source}` dict on 5.x, a list of targets on 4.x."""
    if IS_TRANSFORMERS_5:
        return dict(target_to_source)
    return list(target_to_source)


def language_model_kwargs(cache: Any, cache_position: Any = None, **kwargs: Any) -> dict[str, Any]:
    """Keyword arguments for transformers' language model: `kwargs` with the cache under the installed name, and
    `cache_position` only where the caller passed one (`generate` threads it through up to 5.3; later releases dropped
    it)."""
    if cache_position is not None:
        kwargs["cache_position"] = cache_position
    return {**kwargs, CACHE_NAME: cache}


def generation_inputs_kwargs(kwargs: dict[str, Any], is_first_iteration: bool | None) -> dict[str, Any]:
    """`prepare_inputs_for_generation`'s keyword arguments with `is_first_iteration` handed back where transformers
    passed it (5.x, whose base method expects it; 4.x has no such argument)."""
    if is_first_iteration is not None:
        kwargs["is_first_iteration"] = is_first_iteration
    return kwargs


def cache_of(outputs_or_kwargs: Any) -> Any:
    """The cache in a model output, a `generate` output or a dict of model inputs, under the installed name."""
    return outputs_or_kwargs.get(CACHE_NAME)


def takes_cache(forward: Callable) -> Callable:
    """Lets a `forward` written with a `cache` parameter take it under the installed transformers' name.

    From 5.24 on that name is `cache`, and the old `past_key_values` is renamed with transformers' own deprecation
    warning, as transformers' models do. Before, the parameter is shown (to `generate`, which checks the names it
    passes against the signature) and taken as `past_key_values`.
    """
    if CACHE_NAME == "cache":
        from transformers.utils.deprecation import deprecate_kwarg

        return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(forward)
    signature = inspect.signature(forward)
    parameters = [p.replace(name=CACHE_NAME) if p.name == "cache" else p for p in signature.parameters.values()]

    @functools.wraps(forward)
    def forward_taking_past_key_values(*args, **kwargs):
        if CACHE_NAME in kwargs:
            kwargs["cache"] = kwargs.pop(CACHE_NAME)
        return forward(*args, **kwargs)

    forward_taking_past_key_values.__signature__ = signature.replace(parameters=parameters)
    return forward_taking_past_key_values


def is_first_generation_step(model_inputs: dict[str, Any], is_first_iteration: bool | None) -> bool:
    """Whether this step of `generate` must see the images: the prefill of a call (which may continue from a filled
    cache with a new turn), or any step that starts an empty cache (an assistant model's first call in assisted
    decoding, which 5.x makes with `is_first_iteration=False`).

    5.x passes `is_first_iteration`. Up to 5.3 (and on 4.x) `cache_position` tells instead: it starts at 0 on a fresh
    prefill, and spans more than the one new token of a decoding step when a call continues a cache with a new turn.
    """
    if is_first_iteration:
        return True
    cache = cache_of(model_inputs)
    if cache is None or cache.get_seq_length() == 0:
        return True
    cache_position = model_inputs.get("cache_position")
    if is_first_iteration is None and cache_position is not None:
        return int(cache_position[0]) == 0 or cache_position.numel() > 1
    return False


def without_hub_kernels_unless_asked(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`from_pretrained` kwargs that load without Hub kernels unless the caller asks for them (`use_kernels=True`, or a
    `kernel_config`). From 5.25 on transformers turns them on by default: on CUDA, ROCm and XPU it replaces layers
    with compiled code downloaded from the Hub while the model loads. Every release in our range takes
    `use_kernels=False`."""
    if "use_kernels" not in kwargs and kwargs.get("kernel_config") is None:
        kwargs["use_kernels"] = False
    return kwargs


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


def checkpointing_arguments(enabled: bool, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """`TrainingArguments` settings that turn activation (gradient) checkpointing on or off, under the installed
    names: 5.24 renamed `gradient_checkpointing(_kwargs)` to `activation_checkpointing(_kwargs)` and warns on the old
    ones, which TRL's configs set by default."""
    from transformers import TrainingArguments

    renamed = "activation_checkpointing" in TrainingArguments.__dataclass_fields__
    name = "activation_checkpointing" if renamed else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": kwargs}


def kbit_training_arguments(checkpointing: bool, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """`peft.prepare_model_for_kbit_training` settings that turn activation checkpointing on or off, under the
    installed PEFT's names: 0.22 renamed `gradient_checkpointing_kwargs` to `activation_checkpointing_kwargs` and
    warns on the old one."""
    from peft import prepare_model_for_kbit_training

    parameters = inspect.signature(prepare_model_for_kbit_training).parameters
    renamed = "activation_checkpointing_kwargs" in parameters
    name = "activation_checkpointing_kwargs" if renamed else "gradient_checkpointing_kwargs"
    return {"use_gradient_checkpointing": checkpointing, name: kwargs}


def complete_disk_offload(model: Any, tied_weights: dict[str, str]) -> None:
    """Fills two gaps `from_pretrained` leaves when it offloads modules to disk.

    - 4.x: buffers (BatchNorm statistics) of modules offloaded to disk are not loaded: accelerate's hooks keep buffers
      in the module, and 4.x left them at their initial values, so the offloaded vision tower computed wrong features.
    - 4.x and early 5.x (5.0 among them): the offload map (accelerate's `OffloadedWeightsLoader`, shared by every
      offloaded module's hook) is built from the checkpoint's keys, and a tied weight (`{target: source}`) is not among
      them: an offloaded output head tied to an offloaded input embedding found nothing to load
      (`KeyError: 'lm_head.weight'`). Releases that map it already are left as they are.
    """
    from accelerate.utils import set_module_tensor_to_device

    for offloaded in _offloaded_weight_maps(model):
        if not IS_TRANSFORMERS_5:
            for name, buffer in model.named_buffers():
                if name in offloaded.index and buffer.device.type != "meta":
                    set_module_tensor_to_device(model, name, buffer.device, value=offloaded[name])
        if getattr(model.config, "tie_word_embeddings", False):
            for target, source in tied_weights.items():
                _alias_offloaded_weight(offloaded, target, source)


def _alias_offloaded_weight(offloaded: Any, target: str, source: str) -> None:
    if target in offloaded.state_dict or target in offloaded.index:
        return
    if source in offloaded.state_dict:
        offloaded.state_dict[target] = offloaded.state_dict[source]
    elif source in offloaded.index:
        offloaded.index[target] = offloaded.index[source]
    else:
        return
    offloaded.all_keys.append(target)


def _offloaded_weight_maps(model: Any) -> list[Any]:
    """The distinct `OffloadedWeightsLoader`s behind the accelerate hooks of `model`'s offloaded modules."""
    found = {}
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        for single_hook in getattr(hook, "hooks", (hook,)):
            weights_map = getattr(single_hook, "weights_map", None)
            loader = getattr(weights_map, "dataset", weights_map)  # a `PrefixedDataset` over the shared loader
            if loader is not None and hasattr(loader, "index") and hasattr(loader, "state_dict"):
                found[id(loader)] = loader
    return list(found.values())
