"""The vLLM plugin: vLLM serves FastVLM with this package's model, through vLLM's Transformers modeling backend.

vLLM calls `register` in each of its processes (the `vllm.general_plugins` entry point in `pyproject.toml`). From then
on the three checkpoint layouts serve as they are: `vllm serve apple/FastVLM-0.5B`, this package's checkpoints, and
transformers' native `fast_vlm` ones. vLLM builds `FastVLMModel` with `AutoModel.from_config`, loads the weights itself
(renamed by the tables of `checkpoints/keys.py`), and prepares prompts with `FastVLMProcessor`.
"""

from __future__ import annotations

import functools

# Where vLLM keeps its Transformers-backend classes, and the names its multimodal causal-LM class has had.
_BACKEND_MODULE = "vllm.model_executor.models.transformers"
_MULTIMODAL_BACKEND_CLASSES = ("TransformersMultiModalForCausalLM", "TransformersForMultimodalLM")


def register() -> None:
    """Registers FastVLM with vLLM and transformers; safe to call more than once."""
    from transformers import AutoConfig
    from transformers.conversion_mapping import register_checkpoint_conversion_mapping
    from vllm import ModelRegistry

    from .. import checkpoints  # importing the package registers its classes with transformers' Auto classes
    from ..configuration_fastvlm import FastVLMTransformersConfig

    # vLLM renames checkpoint keys with the renames transformers has for the model's type.
    register_checkpoint_conversion_mapping(checkpoints.FASTVLM, checkpoints.weight_renamings(), overwrite=True)
    # transformers' own `fast_vlm` checkpoints then read into our config, and serve with our model.
    AutoConfig.register(checkpoints.TRANSFORMERS, FastVLMTransformersConfig, exist_ok=True)
    ModelRegistry.register_model(checkpoints.ARCHITECTURE, f"{_BACKEND_MODULE}:{_backend_class(ModelRegistry)}")
    _answer_bad_images_as_bad_requests()


def _backend_class(registry) -> str:
    """The name of vLLM's multimodal Transformers-backend class, which vLLM has renamed before."""
    supported = registry.get_supported_archs()
    for name in _MULTIMODAL_BACKEND_CLASSES:
        if name in supported:
            return name
    raise RuntimeError(
        f"This vLLM has none of the Transformers-backend classes fastvlm-hf knows "
        f"({', '.join(_MULTIMODAL_BACKEND_CLASSES)}): install a vLLM that fastvlm-hf supports (docs/serving.md)."
    )


# vLLM (0.32) answers two bad requests with HTTP 500 where the client is at fault; it answers a `ValueError` with 400
# and its message. An image over Pillow's decompression-bomb limit raises `DecompressionBombError`, which its image
# loader does not catch (it catches `OSError`); a prompt with fewer image placeholders than images fails an assertion.
# Both are turned into a `ValueError` that says what was wrong; nothing else changes. Where vLLM's code differs, they
# are left out.


@functools.cache
def _answer_bad_images_as_bad_requests() -> None:
    try:
        from PIL import Image
        from vllm.multimodal.media.image import ImageMediaIO
        from vllm.multimodal.processing.processor import BaseMultiModalProcessor
    except ImportError:
        return
    if hasattr(ImageMediaIO, "load_bytes"):
        ImageMediaIO.load_bytes = _reraising(ImageMediaIO.load_bytes, Image.DecompressionBombError)
    if hasattr(BaseMultiModalProcessor, "_maybe_apply_prompt_updates"):
        BaseMultiModalProcessor._maybe_apply_prompt_updates = _checking_placeholders(
            BaseMultiModalProcessor._maybe_apply_prompt_updates
        )


def _reraising(load_bytes, error_type):
    @functools.wraps(load_bytes)
    def load_bytes_refusing(self, data):
        try:
            return load_bytes(self, data)
        except error_type as error:
            raise ValueError(f"Failed to load image: {error}") from error

    return load_bytes_refusing


def _checking_placeholders(apply_prompt_updates):
    @functools.wraps(apply_prompt_updates)
    def apply_prompt_updates_checked(self, mm_items, mm_res, *args, **kwargs):
        from ..processing_fastvlm import FastVLMProcessor

        processor = self.info.get_hf_processor()
        if isinstance(processor, FastVLMProcessor):  # other models keep vLLM's own checks
            num_images = mm_items.get_all_counts().get("image", 0)
            processor.check_placeholder_count(num_images, list(mm_res.prompt_ids).count(processor.image_token_id))
        return apply_prompt_updates(self, mm_items, mm_res, *args, **kwargs)

    return apply_prompt_updates_checked
