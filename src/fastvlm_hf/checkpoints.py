"""The three FastVLM checkpoint layouts, and the one place where their key names and configs are translated.

A layout is named by the `model_type` its `config.json` carries:

- `"fastvlm"`: this package's own layout (timm's FastViT names under `model.vision_tower.`, Llava's names around it).
- `"llava_qwen2"`: Apple's Hub checkpoints (`apple/FastVLM-0.5B`, ...): Apple's FastViT names under
  `model.vision_tower.vision_tower.model.`, `model.mm_projector.{0,2}`, the Qwen2 model directly under `model.`,
  and a flat LLaVA `config.json` (see `docs/checkpoint-layouts.md`).
- `"fast_vlm"`: transformers' native FastVLM (5.x), whose vision tower is timm's `fastvit_mci3` inside a
  `TimmWrapperModel`: our names under `model.vision_tower.timm_model.` (`docs/checkpoint-layouts.md`).

Each foreign layout has one table of renames to ours. A rule renames a key prefix, with `{n}` standing for a block
index; rules are tried in order and the first that matches renames the key. Every key is renamed by at most one rule,
and no rule matches a key of our layout, so the same table serves `from_pretrained(key_mapping=...)` on every
transformers version (4.57 applies only the first matching pattern, 5.x applies them all in turn) and, read backwards,
converts our keys to the foreign layout.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch
from transformers import GenerationConfig

from .compat import PretrainedConfig, mismatched_key_names
from .configuration_fastvithd import FastViTHDConfig

FASTVLM = "fastvlm"
APPLE = "llava_qwen2"
TRANSFORMERS = "fast_vlm"

# Apple's FastViT keeps its pieces in one flat `network` list; these are their places in our stages.
_APPLE_NETWORK_BLOCKS = {0: 0, 2: 1, 4: 2, 7: 3, 10: 4}  # network index -> stage whose blocks it holds
_APPLE_NETWORK_DOWNSAMPLES = {1: 1, 3: 2, 5: 3, 8: 4}  # network index -> stage it downsamples into
_APPLE_NETWORK_POS_EMBS = {6: 3, 9: 4}  # network index -> stage it encodes positions for
_APPLE_BLOCK_PARTS = [  # inside a block, Apple's name -> ours; the more specific first
    ("layer_scale_1", "layer_scale_1.gamma"),
    ("layer_scale_2", "layer_scale_2.gamma"),
    ("layer_scale", "layer_scale.gamma"),
    ("convffn.", "mlp."),
    ("", ""),  # token_mixer, norm
]


def _apple_renames() -> list[tuple[str, str]]:
    apple, ours = "model.vision_tower.vision_tower.model.", "model.vision_tower."
    renames = []
    for index, stage in _APPLE_NETWORK_BLOCKS.items():
        apple_block, our_block = f"{apple}network.{index}.{{n}}.", f"{ours}stages.{stage}.blocks.{{n}}."
        renames += [(apple_block + apple_part, our_block + our_part) for apple_part, our_part in _APPLE_BLOCK_PARTS]
    for index, stage in _APPLE_NETWORK_DOWNSAMPLES.items():
        apple_downsample, our_downsample = f"{apple}network.{index}.proj.", f"{ours}stages.{stage}.downsample.proj."
        renames.append((f"{apple_downsample}0.lkb_reparam.", f"{our_downsample}0.reparam_conv."))
        renames.append((f"{apple_downsample}1.", f"{our_downsample}1."))
    for index, stage in _APPLE_NETWORK_POS_EMBS.items():
        renames.append((f"{apple}network.{index}.", f"{ours}stages.{stage}.pos_emb."))
    return renames + [
        (f"{apple}patch_embed.", f"{ours}stem."),
        (f"{apple}conv_exp.se.reduce.", f"{ours}final_conv.se.fc1."),
        (f"{apple}conv_exp.se.expand.", f"{ours}final_conv.se.fc2."),
        (f"{apple}conv_exp.", f"{ours}final_conv."),
        ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
        ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
        ("model.embed_tokens.", "model.language_model.embed_tokens."),
        ("model.layers.", "model.language_model.layers."),
        ("model.norm.", "model.language_model.norm."),
    ]


APPLE_RENAMES = _apple_renames()
TRANSFORMERS_RENAMES: list[tuple[str, str]] = [("model.vision_tower.timm_model.", "model.vision_tower.")]

RENAMES = {APPLE: APPLE_RENAMES, TRANSFORMERS: TRANSFORMERS_RENAMES}

# Weights a foreign layout has and FastVLM does not use: Apple's CLIP projection head of the image tower.
UNUSED_KEYS = {APPLE: ["model.vision_tower.vision_tower.model.head.proj"], TRANSFORMERS: []}


def _pattern(template: str) -> str:
    # Dots stay unescaped: transformers 5.0 writes a pattern's escapes literally into key names when it reverses a
    # key mapping on save. A rule that ends inside a name ("layer_scale") must match that whole name.
    pattern = "^" + template.replace("{n}", r"(\d+)")
    return pattern + r"(?!\w)" if re.search(r"\w$", template) else pattern


def _replacement(template: str) -> str:
    return template.replace("{n}", r"\1")


def key_mapping(layout: str) -> dict[str, str]:
    """`from_pretrained(key_mapping=...)` that renames the keys of a foreign `layout` to ours."""
    return {_pattern(source): _replacement(target) for source, target in RENAMES[layout]}


def weight_renamings() -> list:
    """transformers' `WeightRenaming`s (5.x) that rename the keys of both foreign layouts to ours, for loaders that read
    a model type's renames from transformers' checkpoint conversion mapping (vLLM's Transformers backend). One list
    serves every layout: no rule matches a key of another layout, nor one it renamed."""
    from transformers.core_model_loading import WeightRenaming

    return [WeightRenaming(source, target) for layout in RENAMES for source, target in key_mapping(layout).items()]


def _rename(key: str, rules: list[tuple[str, str]]) -> str:
    for source, target in rules:
        renamed, count = re.subn(_pattern(source), _replacement(target), key, count=1)
        if count:
            return renamed
    return key


def to_fastvlm_state_dict(state_dict: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """A state dict of a foreign `layout` with our key names, without the weights FastVLM does not use."""
    if layout == FASTVLM:
        return dict(state_dict)
    unused = set(UNUSED_KEYS[layout])
    return {_rename(key, RENAMES[layout]): tensor for key, tensor in state_dict.items() if key not in unused}


def from_fastvlm_state_dict(state_dict: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Our state dict with the key names of `layout` (the inverse of `to_fastvlm_state_dict`)."""
    if layout == FASTVLM:
        return dict(state_dict)
    backwards = [(ours, foreign) for foreign, ours in RENAMES[layout]]
    return {_rename(key, backwards): tensor for key, tensor in state_dict.items()}


# ----------------------------------------------------------------------------------------------------------------------
# Configs

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


def image_processor_dict(config_dict: dict[str, Any]) -> dict[str, Any]:
    """`FastVLMImageProcessor` settings for a checkpoint of a foreign layout, from its `config.json`: the preprocessing
    of Apple's reference (`image_aspect_ratio: "pad"`: the image centred on a black square) at the resolution of the
    vision tower. Apple's checkpoints ship no preprocessor config; transformers' crop instead of padding."""
    vision_config = FastViTHDConfig(**fastvlm_config_dict(config_dict)["vision_config"])
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


# ----------------------------------------------------------------------------------------------------------------------
# Loading

_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "local_files_only", "revision", "subfolder")


def hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The Hub arguments (`revision`, `token`, ...) among `from_pretrained`'s kwargs."""
    return {name: kwargs[name] for name in _HUB_KWARGS if name in kwargs}


def read_config_dict(pretrained_model_name_or_path: str | os.PathLike | None, **kwargs) -> dict[str, Any]:
    """The `config.json` of a checkpoint as it is on disk (empty when there is none).

    `kwargs` are `from_pretrained`'s; the Hub arguments among them (`revision`, `token`, ...) are used.
    """
    if pretrained_model_name_or_path is None:
        return {}
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(pretrained_model_name_or_path, **hub_kwargs(kwargs))
    except OSError:  # weights without a config.json, loaded with an explicit `config=`
        return {}
    return config_dict


def layout_of(config_dict: dict[str, Any]) -> str:
    """The layout of a checkpoint from its `config.json` dict."""
    model_type = config_dict.get("model_type")
    return model_type if model_type in (APPLE, TRANSFORMERS) else FASTVLM


def key_mapping_for(pretrained_model_name_or_path: str | os.PathLike | None, **kwargs) -> dict[str, str] | None:
    """The key mapping that loads the checkpoint into FastVLM, or None when it is in our layout already.

    `kwargs` are `from_pretrained`'s; the Hub arguments among them (`revision`, `token`, ...) are used.
    """
    layout = layout_of(read_config_dict(pretrained_model_name_or_path, **kwargs))
    return None if layout == FASTVLM else key_mapping(layout)


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
