"""The `config.json` of each checkpoint layout (`layouts.py`) translated to our `FastVLMConfig` dict, and back."""

from __future__ import annotations

import re
from typing import Any

from ..configuration_fastvithd import FastViTHDConfig
from .layouts import APPLE, FASTVLM, TRANSFORMERS

DEFAULT_IMAGE_TOKEN_ID = 151646  # `<image>` appended to Qwen2's tokenizer, as Apple's export script and transformers do

# LLaVA's settings as Apple's released config.json files state them: what Apple's code reads besides the language
# model, for a checkpoint written back into Apple's layout.
_APPLE_LLAVA_SETTINGS = {
    "freeze_mm_mlp_adapter": False, "image_aspect_ratio": "pad", "image_grid_pinpoints": None,
    "mm_patch_merge_type": "flat", "mm_projector_lr": None, "mm_projector_type": "mlp2x_gelu",
    "mm_use_im_patch_token": False, "mm_use_im_start_end": False, "mm_vision_select_feature": "patch",
    "mm_vision_select_layer": -2, "tokenizer_model_max_length": 8192, "tokenizer_padding_side": "right",
    "tune_mm_mlp_adapter": False, "unfreeze_mm_vision_tower": True, "use_mm_proj": True,
}  # fmt: skip
# Fields of Apple's flat config.json that describe LLaVA's vision side or training, not the Qwen2 language model.
_APPLE_LLAVA_FIELDS = set(_APPLE_LLAVA_SETTINGS) | {
    "image_token_index", "mm_hidden_size", "mm_vision_tower", "vision_config",
}  # fmt: skip
# Fields that describe the checkpoint as a whole; `auto_map` points at Apple's remote code, which we replace.
_CHECKPOINT_FIELDS = {"architectures", "auto_map", "model_type", "transformers_version", "_name_or_path"}
# What a foreign checkpoint's translated config names as its model (serving engines such as vLLM pick the
# implementation by it): ours, `FastVLMForConditionalGeneration`.
ARCHITECTURE = "FastVLMForConditionalGeneration"
_SHARED_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype")
_APPLE_TOWER = re.compile(r"mobileclip_l_(\d+)")


def fastvlm_config_dict(config_dict: dict[str, Any]) -> dict[str, Any]:
    """The `FastVLMConfig` dict of any layout's `config.json` dict (ours is returned unchanged)."""
    model_type = config_dict.get("model_type")
    if model_type == APPLE:
        return _from_apple_config(config_dict)
    if model_type == TRANSFORMERS:
        return _from_transformers_config(config_dict)
    return config_dict


def _from_apple_config(config: dict[str, Any]) -> dict[str, Any]:
    vision_config = _apple_vision_config(config)
    if config.get("mm_hidden_size", vision_config.hidden_size) != vision_config.hidden_size:
        raise ValueError(
            f"`mm_hidden_size` is {config['mm_hidden_size']} in config.json but the vision tower "
            f"{config.get('mm_vision_tower')!r} outputs {vision_config.hidden_size} channels."
        )
    if config.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ValueError(
            f"Unsupported `mm_projector_type` {config['mm_projector_type']!r} in config.json: FastVLM's projector "
            "is 'mlp2x_gelu' (Linear, GELU, Linear)."
        )
    text_fields = {k: v for k, v in config.items() if k not in _APPLE_LLAVA_FIELDS | _CHECKPOINT_FIELDS}
    return {
        "model_type": FASTVLM,
        "architectures": [ARCHITECTURE],
        "vision_config": vision_config.to_dict(),
        "text_config": {**text_fields, "model_type": "qwen2"},
        "image_token_id": config.get("image_token_index", DEFAULT_IMAGE_TOKEN_ID),
        "tie_word_embeddings": config.get("tie_word_embeddings", False),
        **{k: config[k] for k in _SHARED_FIELDS if k in config},
    }


_APPLE_ARCHITECTURE = "LlavaQwen2ForCausalLM"
_CONFIG_BOOKKEEPING = _CHECKPOINT_FIELDS | {"dtype", "torch_dtype"}


def apple_config_dict(config, dtype: str | None = None) -> dict[str, Any]:
    """Apple's flat `llava_qwen2` config.json for our `FastVLMConfig` `config` (the inverse of reading one): the Qwen2
    fields, LLaVA's settings, the vision tower by name (`mobileclip_l_<resolution>`), and a `vision_config` only for a
    tower that is not FastViTHD at that resolution. `dtype` ("bfloat16") is the weights'."""
    vision = config.vision_config
    text = {k: v for k, v in config.text_config.to_dict().items() if k not in _CONFIG_BOOKKEEPING}
    text = {k: v for k, v in text.items() if not (k in _SHARED_FIELDS and v is None)}
    rope = text.get("rope_parameters")
    if isinstance(rope, dict) and rope.get("rope_type", "default") == "default":  # 5.x; Apple's code reads rope_theta
        text.pop("rope_parameters")
        text["rope_theta"] = rope["rope_theta"]
    implied = FastViTHDConfig(image_size=vision.image_size).to_dict()
    skipped = _CONFIG_BOOKKEEPING | {"image_size"}
    explicit = {k: v for k, v in vision.to_dict().items() if k not in skipped and implied.get(k) != v}
    apple = {
        **text,
        **_APPLE_LLAVA_SETTINGS,
        "architectures": [_APPLE_ARCHITECTURE],
        "model_type": APPLE,
        "mm_hidden_size": vision.hidden_size,
        "mm_vision_tower": f"mobileclip_l_{vision.image_size}",
        "image_token_index": config.image_token_id,
        "tie_word_embeddings": config.tie_word_embeddings,
    }
    if explicit:
        apple["vision_config"] = explicit
    if dtype is not None:
        apple["torch_dtype"] = dtype
    return apple


def _apple_vision_config(config: dict[str, Any]) -> FastViTHDConfig:
    """FastViTHD at the resolution in the tower's name; an explicit `vision_config` overrides the implied one."""
    tower = config.get("mm_vision_tower")
    match = _APPLE_TOWER.fullmatch(str(tower))
    if match is None:
        raise ValueError(
            f"Unsupported vision tower {tower!r} (`mm_vision_tower` in config.json): fastvlm_hf runs FastViTHD, "
            "which Apple's checkpoints name 'mobileclip_l_<resolution>', e.g. 'mobileclip_l_1024'."
        )
    explicit = {k: v for k, v in (config.get("vision_config") or {}).items() if k != "model_type"}
    return FastViTHDConfig(**{"image_size": int(match[1]), **explicit})


def image_processor_dict(fastvlm_config: dict[str, Any]) -> dict[str, Any]:
    """`FastVLMImageProcessor` settings for a checkpoint of a foreign layout, from its `FastVLMConfig` dict (as
    `fastvlm_config_dict` translates it): the preprocessing of Apple's reference (`image_aspect_ratio: "pad"`: the image
    centred on a black square) at the resolution of the vision tower. Apple's checkpoints ship no preprocessor config;
    transformers' crop instead of padding."""
    vision_config = FastViTHDConfig(**fastvlm_config["vision_config"])
    return {"size": vision_config.image_size, "patch_size": vision_config.patch_size, "image_mode": "pad"}


# timm's `fastvit_mci3` is FastViTHD. Its `model_args` in transformers' `TimmWrapperConfig` override timm's defaults.
_TIMM_ARCHITECTURE = "fastvit_mci3"
_TIMM_ARGS = {  # timm FastVit argument -> FastViTHDConfig field
    "in_chans": "num_channels",
    "layers": "depths",
    "embed_dims": "embed_dims",
    "mlp_ratios": "mlp_ratios",
    "token_mixers": "token_mixers",
    "downsamples": "downsamples",
    "repmixer_kernel_size": "repmixer_kernel_size",
    "down_patch_size": "downsample_kernel_size",
    "down_stride": "downsample_stride",
    "layer_scale_init_value": "layer_scale_init_value",
}
_TIMM_FIXED = {"inference_mode": True, "lkc_use_act": True, "fork_feat": False}  # what FastViTHD is
# FastViTHDConfig fields that timm's FastVit fixes to FastViTHD's values; its hidden size is twice the last width.
_TIMM_FIXED_FIELDS = (
    "attention_head_dim", "qkv_bias", "pos_embeds", "stem_kernel_size", "stem_stride", "pos_embed_kernel_size",
    "convffn_kernel_size", "final_conv_kernel_size", "se_ratio", "hidden_act", "layer_norm_eps", "batch_norm_eps",
)  # fmt: skip
_TIMM_CLS_RATIO = 2
# Settings of training or of timm's classifier head, which FastVLM does not have.
_TIMM_IGNORED_ARGS = {
    "drop_rate", "proj_drop_rate", "drop_path_rate", "stem_use_scale_branch", "num_classes", "global_pool",
}  # fmt: skip
# Fields of transformers' FastVlmConfig that FastVLM has under another name, or not at all (it supports exactly the
# values transformers allows: the last feature map, all of it).
_TRANSFORMERS_ONLY_FIELDS = {
    "image_token_index", "image_seq_length", "multimodal_projector_bias", "vision_feature_layer",
    "vision_feature_select_strategy",
}  # fmt: skip


def _from_transformers_config(config: dict[str, Any]) -> dict[str, Any]:
    fields = {k: v for k, v in config.items() if k not in _TRANSFORMERS_ONLY_FIELDS | _CHECKPOINT_FIELDS}
    return {
        **fields,
        "model_type": FASTVLM,
        "architectures": [ARCHITECTURE],
        "vision_config": _vision_config_from_timm(config.get("vision_config") or {}).to_dict(),
        "image_token_id": config.get("image_token_index", DEFAULT_IMAGE_TOKEN_ID),
        "projector_bias": config.get("multimodal_projector_bias", True),
    }


def _vision_config_from_timm(timm_config: dict[str, Any]) -> FastViTHDConfig:
    architecture = timm_config.get("architecture")
    if architecture != _TIMM_ARCHITECTURE:
        raise ValueError(
            f"Unsupported vision tower {architecture!r} in the fast_vlm config.json: FastVLM's is timm's "
            f"{_TIMM_ARCHITECTURE!r} (FastViTHD)."
        )
    model_args = dict(timm_config.get("model_args") or {})
    for name, expected in _TIMM_FIXED.items():
        value = model_args.pop(name, expected)
        if value != expected:
            raise ValueError(f"Unsupported timm model argument {name}={value!r}: FastViTHD has {expected}.")
    fields = {_TIMM_ARGS[name]: model_args.pop(name) for name in list(model_args) if name in _TIMM_ARGS}
    if "pos_embs" in model_args:  # null where a stage has no positional encoding
        fields["pos_embeds"] = [pos_emb is not None for pos_emb in model_args.pop("pos_embs")]
    if any(model_args.pop("se_downsamples", [])):
        raise ValueError("Unsupported timm model argument `se_downsamples`: FastViTHD has no squeeze-excite there.")
    unknown = sorted(set(model_args) - _TIMM_IGNORED_ARGS)
    if unknown:
        raise ValueError(f"Unsupported timm model argument(s) {unknown} for {_TIMM_ARCHITECTURE}.")
    if "hidden_size" in timm_config:
        fields["hidden_size"] = timm_config["hidden_size"]
    return FastViTHDConfig(**fields)


def transformers_config_kwargs(config) -> dict[str, Any]:
    """Arguments of transformers' `FastVlmConfig` that describe the model of our `FastVLMConfig` `config`."""
    vision, default = config.vision_config, FastViTHDConfig()
    differing = [name for name in _TIMM_FIXED_FIELDS if getattr(vision, name) != getattr(default, name)]
    if vision.hidden_size != _TIMM_CLS_RATIO * vision.embed_dims[-1]:
        differing.append("hidden_size")
    if differing:
        raise ValueError(
            f"transformers' fast_vlm cannot hold this vision tower: timm's {_TIMM_ARCHITECTURE} fixes {differing} "
            "to FastViTHD's values."
        )
    model_args = {name: getattr(vision, field) for name, field in _TIMM_ARGS.items()}
    model_args = {name: value for name, value in model_args.items() if value != getattr(default, _TIMM_ARGS[name])}
    return {
        "vision_config": {
            "architecture": _TIMM_ARCHITECTURE,
            "hidden_size": vision.hidden_size,
            "model_args": {"inference_mode": True, **model_args},  # the re-parameterised form our weights are in
        },
        "text_config": config.text_config.to_dict(),
        "image_token_id": config.image_token_id,
        "projector_hidden_act": config.projector_hidden_act,
        "multimodal_projector_bias": config.projector_bias,
        "image_seq_length": config.num_image_tokens,
        "tie_word_embeddings": config.tie_word_embeddings,
    }

