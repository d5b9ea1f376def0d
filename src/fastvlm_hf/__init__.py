"""Apple's FastVLM for Hugging Face Transformers: `import fastvlm_hf` registers it with the Auto classes.

The `fastvlm-hf` command runs this module only once its arguments are parsed, so that `--help` starts without
importing torch and transformers (see `fastvlm_hf_cli`): `fastvlm_hf.cli`'s parser must not import from here.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .compat import UntestedTransformersWarning, image_processor_registration, warn_if_untested_transformers
from .configuration_fastvithd import FastViTHDConfig
from .configuration_fastvlm import FastVLMConfig, FastVLMLlavaQwen2Config
from .image_processing_fastvlm import FastVLMImageProcessor, with_fastvlm_checkpoints_without_preprocessor_config
from .modeling_fastvithd import FastViTHDModel
from .modeling_fastvlm import FastVLMForConditionalGeneration, FastVLMModel
from .processing_fastvlm import FastVLMProcessor

__version__ = "0.1.0"

__all__ = [
    "FastViTHDConfig",
    "FastViTHDModel",
    "FastVLMConfig",
    "FastVLMForConditionalGeneration",
    "FastVLMImageProcessor",
    "FastVLMLlavaQwen2Config",
    "FastVLMModel",
    "FastVLMProcessor",
    "UntestedTransformersWarning",
]

warn_if_untested_transformers()

# `exist_ok=True` makes a second import (e.g. after `importlib.reload`) harmless. transformers defines none of these
# model types: `fastvithd` and `fastvlm` are ours, `llava_qwen2` is the one Apple's remote code declares.
AutoConfig.register(FastViTHDConfig.model_type, FastViTHDConfig, exist_ok=True)
AutoConfig.register(FastVLMConfig.model_type, FastVLMConfig, exist_ok=True)
# Apple's config.json reads into a FastVLMConfig, so the registrations below serve Apple's checkpoints too; a registered
# model type also wins over the checkpoints' `auto_map` (their remote code) when `trust_remote_code` is not set.
AutoConfig.register(FastVLMLlavaQwen2Config.model_type, FastVLMLlavaQwen2Config, exist_ok=True)
AutoModel.register(FastViTHDConfig, FastViTHDModel, exist_ok=True)
AutoModel.register(FastVLMConfig, FastVLMModel, exist_ok=True)
AutoModelForImageTextToText.register(FastVLMConfig, FastVLMForConditionalGeneration, exist_ok=True)
AutoModelForCausalLM.register(FastVLMConfig, FastVLMForConditionalGeneration, exist_ok=True)  # how Apple's cards load it
AutoImageProcessor.register(FastVLMConfig, **image_processor_registration(FastVLMImageProcessor), exist_ok=True)
# Apple's repos ship no preprocessor config, before which `AutoImageProcessor` gives up with no hook to register.
AutoImageProcessor.from_pretrained = with_fastvlm_checkpoints_without_preprocessor_config(
    AutoImageProcessor.from_pretrained
)
AutoProcessor.register(FastVLMConfig, FastVLMProcessor, exist_ok=True)
