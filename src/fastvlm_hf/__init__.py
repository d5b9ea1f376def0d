"""Apple's FastVLM for Hugging Face Transformers: `import fastvlm_hf` registers it with the Auto classes."""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .configuration_fastvithd import FastViTHDConfig
from .configuration_fastvlm import FastVLMConfig
from .image_processing_fastvlm import FastVLMImageProcessor
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
    "FastVLMModel",
    "FastVLMProcessor",
]

# `exist_ok=True` makes a second import (e.g. after `importlib.reload`) harmless; these names are ours alone.
AutoConfig.register(FastViTHDConfig.model_type, FastViTHDConfig, exist_ok=True)
AutoConfig.register(FastVLMConfig.model_type, FastVLMConfig, exist_ok=True)
AutoModel.register(FastViTHDConfig, FastViTHDModel, exist_ok=True)
AutoModel.register(FastVLMConfig, FastVLMModel, exist_ok=True)
AutoModelForImageTextToText.register(FastVLMConfig, FastVLMForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(FastVLMConfig, slow_image_processor_class=FastVLMImageProcessor, exist_ok=True)
AutoProcessor.register(FastVLMConfig, FastVLMProcessor, exist_ok=True)
