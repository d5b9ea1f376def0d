"""The three FastVLM checkpoint layouts, each named by the `model_type` its `config.json` carries.

- `"fastvlm"`: this package's own layout (timm's FastViT names under `model.vision_tower.`, Llava's names around it).
- `"llava_qwen2"`: Apple's Hub checkpoints (`apple/FastVLM-0.5B`, ...): Apple's FastViT names under
  `model.vision_tower.vision_tower.model.`, `model.mm_projector.{0,2}`, the Qwen2 model directly under `model.`,
  and a flat LLaVA `config.json` (see `docs/checkpoint-layouts.md`).
- `"fast_vlm"`: transformers' native FastVLM (5.x), whose vision tower is timm's `fastvit_mci3` inside a
  `TimmWrapperModel`: our names under `model.vision_tower.timm_model.` (`docs/checkpoint-layouts.md`).
"""

from __future__ import annotations

from typing import Any

FASTVLM = "fastvlm"
APPLE = "llava_qwen2"
TRANSFORMERS = "fast_vlm"


def layout_of(config_dict: dict[str, Any]) -> str:
    """The layout of a checkpoint from its `config.json` dict."""
    model_type = config_dict.get("model_type")
    return model_type if model_type in (APPLE, TRANSFORMERS) else FASTVLM
