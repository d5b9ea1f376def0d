"""Reading a checkpoint's `config.json` from a folder or the Hub, once per load, into what loading needs of it."""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
from typing import Any

from ..compat import PretrainedConfig
from .configs import fastvlm_config_dict, image_processor_dict
from .keys import key_mapping
from .layouts import FASTVLM, layout_of

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


@dataclasses.dataclass(frozen=True)
class CheckpointDescription:
    """What loading needs to know of a checkpoint, from its `config.json` as stored: its layout, and (translated
    once, when first asked for) its `FastVLMConfig` dict. A `from_pretrained` reads one with `describe` and hands it
    to whatever else it loads from the same checkpoint."""

    config_dict: dict[str, Any]  # as stored; empty when the checkpoint has no config.json

    @property
    def layout(self) -> str:
        return layout_of(self.config_dict)

    @property
    def is_foreign(self) -> bool:
        """Whether the checkpoint is in Apple's or transformers' layout, which loading translates."""
        return self.layout != FASTVLM

    @functools.cached_property
    def _fastvlm_config_dict(self) -> dict[str, Any]:
        return fastvlm_config_dict(self.config_dict)

    def key_mapping(self) -> dict[str, str] | None:
        """`from_pretrained(key_mapping=...)` that renames the checkpoint's keys to ours; None for our own layout."""
        return key_mapping(self.layout) if self.is_foreign else None

    def stored_quantization_config(self) -> dict[str, Any] | None:
        """The `quantization_config` the checkpoint was saved with (a copy), if any."""
        return copy.deepcopy(self.config_dict.get("quantization_config"))

    @property
    def image_token_id(self) -> int:
        """The id the model's config expects for `<image>`."""
        return self._fastvlm_config_dict["image_token_id"]

    def image_processor_dict(self) -> dict[str, Any]:
        """`FastVLMImageProcessor` settings for a checkpoint of a foreign layout (`configs.image_processor_dict`)."""
        return image_processor_dict(self._fastvlm_config_dict)


def describe(pretrained_model_name_or_path: str | os.PathLike | None, **kwargs) -> CheckpointDescription:
    """Reads the checkpoint's `config.json`; `kwargs` are `from_pretrained`'s, the Hub arguments among them are used."""
    return CheckpointDescription(read_config_dict(pretrained_model_name_or_path, **kwargs))
