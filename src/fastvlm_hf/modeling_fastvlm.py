"""FastVLM: FastViTHD image features, projected and scattered into a transformers language model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel, Qwen2ForCausalLM
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import auto_docstring, can_return_tuple

from .checkpoints.loading import CheckpointLoadingMixin
from .compat import (
    CACHE_NAME,
    VLMBaseModelOutput,
    VLMCausalLMOutput,
    cache_of,
    generation_inputs_kwargs,
    is_first_generation_step,
    language_model_kwargs,
    takes_cache,
    tied_weights_keys,
    vlm_output_fields,
    weight_init,
)
from .configuration_fastvlm import FastVLMConfig
from .cpu.packing import WeightPackingMixin
from .modeling_fastvithd import FastViTHDModel

# The output head shares the input embedding when `text_config.tie_word_embeddings` is set.
TIED_WEIGHTS = {"lm_head.weight": "model.language_model.embed_tokens.weight"}


@dataclass
class FastVLMModelOutputWithPast(VLMBaseModelOutput):
    r"""
    image_hidden_states (`torch.FloatTensor` of shape `(num_images, tokens_per_image, hidden_size)`, *optional*):
        Projected image features of this forward pass.
    """

    image_hidden_states: torch.FloatTensor | None = None


@dataclass
class FastVLMCausalLMOutputWithPast(VLMCausalLMOutput):
    r"""
    image_hidden_states (`torch.FloatTensor` of shape `(num_images, tokens_per_image, hidden_size)`, *optional*):
        Projected image features of this forward pass.
    """

    image_hidden_states: torch.FloatTensor | None = None


def _cached_length(cache: Cache | None) -> int:
    return cache.get_seq_length() if isinstance(cache, Cache) else 0


class FastVLMMultiModalProjector(nn.Module):
    """Maps encoder features to the language model's width: Linear → GELU → Linear."""

    def __init__(self, config: FastVLMConfig):
        super().__init__()
        vision_width = config.vision_config.hidden_size
        text_width = config.text_config.hidden_size
        self.linear_1 = nn.Linear(vision_width, text_width, bias=config.projector_bias)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(text_width, text_width, bias=config.projector_bias)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(image_features)))


class FastVLMPreTrainedModel(CheckpointLoadingMixin, WeightPackingMixin, PreTrainedModel):
    """The architecture's settings for transformers. Loading any checkpoint layout and saving ours come from
    `CheckpointLoadingMixin` (`checkpoints/loading.py`); `pack_weights` for CPU inference from `WeightPackingMixin`
    (`cpu/packing.py`)."""

    config_class = FastVLMConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["FastViTHDModel", "Qwen2DecoderLayer"]
    _skip_keys_device_placement = [CACHE_NAME]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # Decoding steps (no images, the cache passed in) run as one graph: `torch.compile(fullgraph=True)`, static caches.
    _can_compile_fullgraph = True
    # Modules bitsandbytes leaves in the compute dtype (see `quantization.py`): full dotted names, which every
    # supported transformers version matches the same way.
    _unquantized_modules: tuple[str, ...] = ()
    _tied_weight_sources = TIED_WEIGHTS

    def _init_weights(self, module: nn.Module) -> None:
        # The vision tower and the language model are `PreTrainedModel`s that initialise themselves; what is left
        # here are the projector's linear layers and the LM head.
        if isinstance(module, nn.Linear):
            weight_init.normal_(module.weight, mean=0.0, std=self.config.text_config.initializer_range)
            if module.bias is not None:
                weight_init.zeros_(module.bias)


class FastVLMModel(FastVLMPreTrainedModel):
    r"""
    FastVLM without a language-model head: encodes images, projects them, writes them into the text embeddings
    at the image-token positions and runs the language model.
    """

    _unquantized_modules = ("vision_tower", "multi_modal_projector")
    _packable_modules = ("language_model",)

    def __init__(self, config: FastVLMConfig):
        super().__init__(config)
        self.vision_tower = FastViTHDModel(config.vision_config)
        self.multi_modal_projector = FastVLMMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None, **kwargs
    ) -> BaseModelOutputWithPooling | tuple:
        """Encodes and projects images, as transformers' vision-language models do.

        Returns `pooler_output`: the projected features, (num_images, tokens_per_image, text hidden size), the tokens
        row-major over the encoder's feature map; `last_hidden_state`: that feature map, (num_images, vision hidden
        size, H', W'); and with `output_hidden_states` the encoder's stem and stage outputs.
        """
        pixel_values = pixel_values.to(dtype=self.vision_tower.dtype)
        encoded = self.vision_tower(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        # (B, C, H', W') -> (B, H'*W', C), row-major; no copy for the tower's channels-last output
        image_features = encoded.last_hidden_state.permute(0, 2, 3, 1).flatten(1, 2)
        return BaseModelOutputWithPooling(
            last_hidden_state=encoded.last_hidden_state,
            pooler_output=self.multi_modal_projector(image_features),
            hidden_states=encoded.hidden_states,
        )

    def image_token_mask(self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """(batch, sequence) boolean mask of the image-token positions."""
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        image_embedding = self.get_input_embeddings()(
            torch.tensor(self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
        )
        return (inputs_embeds == image_embedding).all(-1)

    def get_placeholder_mask(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor, image_features: torch.Tensor
    ) -> torch.Tensor:
        """Boolean mask over `inputs_embeds` of the image-token positions; checks they match the features."""
        is_image_token = self.image_token_mask(input_ids, inputs_embeds)
        num_image_tokens = int(is_image_token.sum())
        num_images, tokens_per_image = image_features.shape[:2]
        if num_image_tokens != num_images * tokens_per_image:
            raise ValueError(
                f"Image features and image tokens do not match: the input has {num_image_tokens} image tokens but "
                f"{num_images} image(s) give {num_images * tokens_per_image} features ({tokens_per_image} per image). "
                "Build inputs with the FastVLM processor, which expands each `<image>` to the right number of "
                "tokens, and do not truncate through them."
            )
        return is_image_token.unsqueeze(-1).expand_as(inputs_embeds).to(inputs_embeds.device)

    def images_to_encode(
        self,
        pixel_values: torch.Tensor | None,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor,
        cache: Cache | None,
    ) -> torch.Tensor | None:
        """The images whose tokens are in this forward's input.

        A follow-up chat turn that continues from a cache feeds only its new tokens: the cache already holds the
        earlier images, so their pixels, which a processor run on the whole conversation passes again, are not
        encoded a second time. Only images at the end of the list can be new, which is unambiguous for a single
        sequence; a batch can only drop all of its images.
        """
        if pixel_values is None:
            # Decoding steps (the only steps that run compiled) skip this check and its device sync, and so do callers
            # that pass only `inputs_embeds`: they placed what they meant at every position (vLLM scatters the image
            # features there itself).
            if input_ids is not None and not torch.compiler.is_compiling() and not _cached_length(cache):
                num_image_tokens = int(self.image_token_mask(input_ids, inputs_embeds).sum())
                if num_image_tokens:
                    raise ValueError(
                        f"The input has {num_image_tokens} image tokens but no `pixel_values`: pass the images that "
                        "the prompt's `<image>` placeholders stand for (the processor returns both)."
                    )
            return None
        if not _cached_length(cache):
            return pixel_values
        is_image_token = self.image_token_mask(input_ids, inputs_embeds)
        num_image_tokens = int(is_image_token.sum())
        if not num_image_tokens:
            return None
        patch_size = self.config.vision_config.patch_size
        tokens_per_image = (pixel_values.shape[-2] // patch_size) * (pixel_values.shape[-1] // patch_size)
        new_images, remainder = divmod(num_image_tokens, tokens_per_image)
        if remainder or new_images >= len(pixel_values) or is_image_token.shape[0] > 1:
            return pixel_values  # all of them, or a mismatch for `get_placeholder_mask` to report
        return pixel_values[len(pixel_values) - new_images :]

    @can_return_tuple
    @auto_docstring
    @takes_cache
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        **kwargs,
    ) -> FastVLMModelOutputWithPast | tuple:
        r"""
        cache_position (`torch.LongTensor` of shape `(sequence_length,)`, *optional*):
            Positions of the input tokens in the cache, handed to the language model (`generate` passes them up to
            transformers 5.3).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        image_outputs = image_features = None
        pixel_values = self.images_to_encode(pixel_values, input_ids, inputs_embeds, cache)
        if pixel_values is not None:
            image_outputs = self.get_image_features(
                pixel_values, output_hidden_states=output_hidden_states, return_dict=True
            )
            image_features = image_outputs.pooler_output.to(inputs_embeds.device, inputs_embeds.dtype)
            image_mask = self.get_placeholder_mask(input_ids, inputs_embeds, image_features)
            inputs_embeds = inputs_embeds.masked_scatter(image_mask, image_features)

        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **language_model_kwargs(cache, cache_position, **kwargs),
        )
        return FastVLMModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_features,
            **vlm_output_fields(cache_of(outputs), image_outputs),
        )


class FastVLMForConditionalGeneration(FastVLMPreTrainedModel, GenerationMixin):
    r"""
    FastVLM with its language-model head, for generation and fine-tuning.

    Example:

    ```python
    >>> import fastvlm_hf
    >>> from transformers import AutoModelForImageTextToText, AutoProcessor
    >>> model = AutoModelForImageTextToText.from_pretrained("apple/FastVLM-0.5B")
    >>> processor = AutoProcessor.from_pretrained("apple/FastVLM-0.5B")
    >>> messages = [{"role": "user", "content": [{"type": "image", "url": "cats.jpg"}, {"type": "text", "text": "Describe the image."}]}]
    >>> inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    >>> output = model.generate(**inputs, max_new_tokens=64)
    >>> print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    ```"""

    _tied_weights_keys = tied_weights_keys(TIED_WEIGHTS)
    # The language model is transformers' Qwen2 and brings its own plans; the head's are Qwen2's head's.
    _tp_plan = {"lm_head": Qwen2ForCausalLM._tp_plan["lm_head"]}
    _pp_plan = {"lm_head": Qwen2ForCausalLM._pp_plan["lm_head"]}
    _unquantized_modules = ("model.vision_tower", "model.multi_modal_projector", "lm_head")
    _packable_modules = ("model.language_model", "lm_head")

    def __init__(self, config: FastVLMConfig):
        super().__init__(config)
        self.model = FastVLMModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.lm_head = new_embeddings

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling | tuple:
        return self.model.get_image_features(pixel_values, **kwargs)

    # The parts of the model, reachable from the head as on transformers' Llava heads (tools look them up there).
    @property
    def vision_tower(self) -> FastViTHDModel:
        return self.model.vision_tower

    @property
    def multi_modal_projector(self) -> FastVLMMultiModalProjector:
        return self.model.multi_modal_projector

    @property
    def language_model(self) -> nn.Module:
        return self.model.language_model

    @can_return_tuple
    @auto_docstring
    @takes_cache
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> FastVLMCausalLMOutputWithPast | tuple:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Target ids for the next-token loss; positions set to -100 (e.g. image tokens, prompt) are ignored.
        cache_position (`torch.LongTensor` of shape `(sequence_length,)`, *optional*):
            Positions of the input tokens in the cache, handed to the language model (`generate` passes them up to
            transformers 5.3).
        logits_to_keep (`int` or `torch.Tensor`, *optional*, defaults to 0):
            Compute logits only for the last `logits_to_keep` positions (0 keeps all), or for the given indices.
        """
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            cache_position=cache_position,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.text_config.vocab_size, **kwargs)

        return FastVLMCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
            **vlm_output_fields(cache_of(outputs), outputs.get("image_outputs")),
        )

    def prepare_inputs_for_generation(
        self, *args, pixel_values: torch.FloatTensor | None = None, is_first_iteration: bool | None = None, **kwargs
    ) -> dict:
        kwargs = generation_inputs_kwargs(kwargs, is_first_iteration)
        model_inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        # Images are encoded once, on the step that fills an empty cache (the prefill; an assistant model's first
        # call in assisted decoding); later steps reuse the cache.
        if is_first_generation_step(model_inputs, is_first_iteration) or not kwargs.get("use_cache", True):
            model_inputs["pixel_values"] = pixel_values
        return model_inputs
