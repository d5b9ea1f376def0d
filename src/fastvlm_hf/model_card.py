"""The model card (`README.md`) the converter writes beside a converted checkpoint.

The card is `model_cards/template.md` (a Jinja template, as `huggingface_hub.ModelCard.from_template` reads them)
filled in with Hub metadata and, for Apple's three released sizes, the facts in `model_cards/sizes.json`: the
language model, the parameter count and Apple's evaluation table. The size is recognised by the width of the language
model (`hidden_size` 896, 1536 or 3584); any other model gets a generic card without the evaluation table. The
repository's top-level `model_cards/` holds the three sizes' cards as rendered here (`model_cards/render.py`).
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from importlib import resources
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

LICENSE = "apple-amlr"
LICENSE_NAME = "apple-amlr"
LICENSE_LINK = "https://github.com/apple/ml-fastvlm/blob/main/LICENSE_MODEL"
TAGS = ["fastvlm", "fastvithd", "qwen2", "vision-language"]
LAYOUT_TAGS = {"fastvlm": "fastvlm-hf", "transformers": "fast_vlm", "apple": "llava_qwen2"}


@lru_cache(maxsize=1)
def released_sizes() -> dict[str, dict[str, Any]]:
    """Apple's released sizes ("0.5B", "1.5B", "7B") and what the card says about each."""
    text = resources.files(__package__).joinpath("model_cards", "sizes.json").read_text(encoding="utf-8")
    return json.loads(text)["sizes"]


def size_of(config) -> str | None:
    """The released size ("0.5B", "1.5B", "7B") a `FastVLMConfig` has, or None for any other model."""
    hidden_size = config.get_text_config(decoder=True).hidden_size
    return next((size for size, facts in released_sizes().items() if facts["text_hidden_size"] == hidden_size), None)


def render(
    config,
    repo_id: str,
    source: str | None = None,
    layout: str = "fastvlm",
    num_parameters: int | None = None,
    dtype: str | None = None,
) -> str:
    """The card's text for a model with `config` (a `FastVLMConfig`), published as `repo_id`.

    `source` is the checkpoint it was converted from: a Hub id becomes the card's `base_model` (otherwise the Apple
    repo of the released size is). `layout` is "fastvlm", "transformers" or "apple"; `num_parameters` is shown for sizes that
    Apple did not release; `dtype` is the weights' ("bfloat16").
    """
    size = size_of(config)
    facts = released_sizes()[size] if size else {}
    base_model = source if source and _is_hub_id(source) else facts.get("apple_repo")
    card_data = _card_data("transformers", base_model, LAYOUT_TAGS[layout])
    title = f"FastVLM-{size}" if size else repo_id.rstrip("/").rsplit("/", 1)[-1]
    parameters = facts.get("parameters") or (_millions(num_parameters) if num_parameters else "an unknown number of")
    card = ModelCard.from_template(
        card_data,
        template_str=resources.files(__package__).joinpath("model_cards", "template.md").read_text(encoding="utf-8"),
        title=title,
        size=size,
        repo_id=repo_id,
        source=source,
        layout=layout,
        parameters=parameters,
        dtype=dtype,
        **{key: value for key, value in facts.items() if key != "parameters"},
    )
    return str(card)


def _millions(count: int) -> str:
    return f"{count / 1e6:,.1f}M"


def _is_hub_id(name: str) -> bool:
    """'owner/name' (or a bare 'name') that is not a local folder."""
    return not os.path.exists(name) and name.count("/") <= 1 and not name.startswith((".", "~", "/"))


def render_onnx(config, repo_id: str, source: str, side: int, files: list[dict], default_dtype: str) -> str:
    """The card of an ONNX export (`fastvlm_hf.export`) of a model with `config`: `files` lists each dtype's files
    and size (`export.layout.files_by_dtype`)."""
    size = size_of(config)
    base_model = source if _is_hub_id(source) else (released_sizes()[size]["apple_repo"] if size else None)
    card_data = _card_data("transformers.js", base_model, "onnx")
    patch_size = config.vision_config.patch_size
    card = ModelCard.from_template(
        card_data,
        template_str=resources.files(__package__).joinpath("model_cards", "onnx.md").read_text(encoding="utf-8"),
        title=f"FastVLM-{size}" if size else repo_id.rstrip("/").rsplit("/", 1)[-1],
        source=source,
        repo_id=repo_id,
        side=side,
        tokens_per_image=(side // patch_size) ** 2,
        files=files,
        default_dtype=default_dtype,
    )
    return str(card)


def _card_data(library_name: str, base_model: str | None, tag: str) -> ModelCardData:
    """The Hub metadata every card of ours carries, for `library_name`, with the card's own `tag`."""
    return ModelCardData(
        license=LICENSE,
        license_name=LICENSE_NAME,
        license_link=LICENSE_LINK,
        library_name=library_name,
        pipeline_tag="image-text-to-text",
        base_model=base_model,
        tags=TAGS + [tag],
    )
