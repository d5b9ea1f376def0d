"""Configuration of the FastVLM vision-language model."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, CONFIG_MAPPING

from .checkpoints import APPLE, TRANSFORMERS, fastvlm_config_dict
from .compat import PretrainedConfig
from .configuration_fastvithd import FastViTHDConfig

# Qwen2-0.5B, the language model of FastVLM-0.5B: the default text config.
DEFAULT_TEXT_CONFIG: dict[str, Any] = {
    "model_type": "qwen2",
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}


def _as_config(config: Any, default: dict[str, Any], fallback_type: str) -> PretrainedConfig:
    if isinstance(config, PretrainedConfig):
        return config
    config = dict(default if config is None else config)
    return CONFIG_MAPPING[config.pop("model_type", fallback_type)](**config)


class FastVLMConfig(PretrainedConfig):
    r"""
    Configuration of [`FastVLMModel`] and [`FastVLMForConditionalGeneration`]: a [`FastViTHDModel`] image encoder,
    a two-layer GELU projector, and a transformers language model (Qwen2 for Apple's checkpoints). The defaults
    are FastVLM-0.5B.

    Args:
        vision_config (`FastViTHDConfig` or `dict`, *optional*):
            The image encoder. Defaults to FastViTHD at 1024 px.
        text_config (`PretrainedConfig` or `dict`, *optional*):
            The language model, any decoder-only model type transformers knows. Defaults to Qwen2-0.5B.
        image_token_id (`int`, *optional*, defaults to 151646):
            Token whose positions receive the image features (`<image>` in the tokenizer).
        projector_hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Activation between the projector's two linear layers (exact GELU).
        projector_bias (`bool`, *optional*, defaults to `True`):
            Whether the projector's linear layers have biases.
        tie_word_embeddings (`bool`, *optional*):
            Whether the output head shares the input embedding matrix. Taken from `text_config` when not given
            (FastVLM-0.5B and -1.5B tie, FastVLM-7B does not).

    Example:

    ```python
    >>> import fastvlm_hf
    >>> from transformers import AutoModelForImageTextToText
    >>> config = fastvlm_hf.FastVLMConfig()
    >>> config.vision_config.hidden_size, config.text_config.hidden_size
    (3072, 896)
    ```"""

    model_type = "fastvlm"
    attribute_map = {"image_token_index": "image_token_id"}
    sub_configs = {"vision_config": FastViTHDConfig, "text_config": AutoConfig}

    def __init__(
        self,
        vision_config: FastViTHDConfig | dict | None = None,
        text_config: PretrainedConfig | dict | None = None,
        image_token_id: int = 151646,
        projector_hidden_act: str = "gelu",
        projector_bias: bool = True,
        tie_word_embeddings: bool | None = None,
        **kwargs,
    ):
        if isinstance(vision_config, dict):
            vision_config = FastViTHDConfig(**{k: v for k, v in vision_config.items() if k != "model_type"})
        self.vision_config = vision_config if vision_config is not None else FastViTHDConfig()
        self.text_config = _as_config(text_config, DEFAULT_TEXT_CONFIG, fallback_type="qwen2")
        self.image_token_id = image_token_id
        self.projector_hidden_act = projector_hidden_act
        self.projector_bias = projector_bias
        if tie_word_embeddings is None:
            tie_word_embeddings = getattr(self.text_config, "tie_word_embeddings", False)
        # Set explicitly: 5.x reads tying from the top-level config and has no default for it.
        self.tie_word_embeddings = tie_word_embeddings
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def num_image_tokens(self) -> int:
        """Tokens per image at the encoder's native `image_size`."""
        return (self.vision_config.image_size // self.vision_config.patch_size) ** 2

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs) -> tuple[dict[str, Any], dict[str, Any]]:
        """Reads `config.json` of any FastVLM layout: Apple's `llava_qwen2`, transformers' `fast_vlm` or ours."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        return fastvlm_config_dict(config_dict), kwargs


class _ForeignConfigReader(FastVLMConfig):
    """Reads the `config.json` of the foreign layout named by `model_type` into a plain [`FastVLMConfig`]."""

    def __new__(cls, **kwargs) -> FastVLMConfig:
        return FastVLMConfig(**fastvlm_config_dict({**kwargs, "model_type": cls.model_type}))


class FastVLMLlavaQwen2Config(_ForeignConfigReader):
    r"""
    Reader of Apple's `config.json` for FastVLM (`model_type: "llava_qwen2"`, as in `apple/FastVLM-0.5B`): the Qwen2
    fields and LLaVA's `mm_*` fields side by side, the vision tower implied by its name (`mm_vision_tower:
    "mobileclip_l_1024"` is FastViTHD at 1024 px; an explicit `vision_config` dict overrides it).

    Building one gives a plain [`FastVLMConfig`]: `AutoConfig` reads Apple's checkpoints into the config that every
    FastVLM Auto class is registered for, so they load without `trust_remote_code`, and a model loaded from them saves
    as a `fastvlm` checkpoint.

    Example:

    ```python
    >>> import fastvlm_hf
    >>> from transformers import AutoConfig
    >>> config = AutoConfig.from_pretrained("apple/FastVLM-0.5B")
    >>> type(config).__name__, config.vision_config.image_size
    ('FastVLMConfig', 1024)
    ```"""

    model_type = APPLE


class FastVLMTransformersConfig(_ForeignConfigReader):
    r"""
    Reader of the `config.json` of transformers' native FastVLM (`model_type: "fast_vlm"`, a timm `fastvit_mci3`
    vision config): building one gives a plain [`FastVLMConfig`].

    transformers owns the `fast_vlm` model type, so `import fastvlm_hf` does not register this reader (load such
    checkpoints with `FastVLMForConditionalGeneration.from_pretrained`); the vLLM plugin does, so that vLLM serves them
    with this package's model.
    """

    model_type = TRANSFORMERS
