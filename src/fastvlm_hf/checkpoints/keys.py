"""Key names of the foreign checkpoint layouts (`layouts.py`), renamed to ours and back.

Each foreign layout has one table of renames to ours. A rule renames a key prefix, with `{n}` standing for a block
index; rules are tried in order and the first that matches renames the key. Every key is renamed by at most one rule,
and no rule matches a key of our layout, so the same table serves `from_pretrained(key_mapping=...)` on every
transformers version (4.57 applies only the first matching pattern, 5.x applies them all in turn) and, read backwards,
converts our keys to the foreign layout.
"""

from __future__ import annotations

import re

import torch

from .layouts import APPLE, FASTVLM, TRANSFORMERS

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

