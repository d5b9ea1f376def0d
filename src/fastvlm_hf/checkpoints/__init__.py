"""FastVLM's three checkpoint layouts, and the one place where their key names and configs are translated.

- `layouts`: the layouts, each named by the `model_type` of its `config.json`.
- `keys`: the renames of each foreign layout's weight names to ours, and back.
- `configs`: each layout's `config.json` translated to our `FastVLMConfig` dict, and back.
- `hub`: a checkpoint's `config.json` read from a folder or the Hub, once per load (`describe`).
- `loading`: the models' `from_pretrained`/`save_pretrained` built on these, and the checks of what loaded.
"""

from .configs import (
    ARCHITECTURE,
    DEFAULT_IMAGE_TOKEN_ID,
    apple_config_dict,
    fastvlm_config_dict,
    image_processor_dict,
    transformers_config_kwargs,
)
from .hub import CheckpointDescription, describe, hub_kwargs, read_config_dict
from .keys import (
    APPLE_RENAMES,
    RENAMES,
    TRANSFORMERS_RENAMES,
    UNUSED_KEYS,
    from_fastvlm_state_dict,
    key_mapping,
    to_fastvlm_state_dict,
    weight_renamings,
)
from .layouts import APPLE, FASTVLM, TRANSFORMERS, layout_of

__all__ = [
    "APPLE",
    "APPLE_RENAMES",
    "ARCHITECTURE",
    "CheckpointDescription",
    "DEFAULT_IMAGE_TOKEN_ID",
    "FASTVLM",
    "RENAMES",
    "TRANSFORMERS",
    "TRANSFORMERS_RENAMES",
    "UNUSED_KEYS",
    "apple_config_dict",
    "describe",
    "fastvlm_config_dict",
    "from_fastvlm_state_dict",
    "hub_kwargs",
    "image_processor_dict",
    "key_mapping",
    "layout_of",
    "read_config_dict",
    "to_fastvlm_state_dict",
    "transformers_config_kwargs",
    "weight_renamings",
]
