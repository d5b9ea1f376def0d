"""The models the benchmarks build and the prompt they run: FastVLM with random weights at its real sizes, the small
tokenizer and the processors it runs with, and the `generate` calls timed on a model (`Side`).

The language models are those of FastVLM-0.5B, -1.5B and -7B, Qwen2-0.5B, -1.5B and -7B (random weights, real
shapes), and a tiny one for smoke runs. The tokenizer is a small byte-level BPE trained here, offline, on the prompt's
words: one token per word or punctuation mark, as Qwen2's vocabulary has for these common words. The models keep
Qwen2's real vocabulary size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from common import REPO, default_dtype
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import CLIPImageProcessor, DynamicCache, LlavaProcessor, PreTrainedTokenizerFast

from fastvlm_hf import (
    FastVLMConfig,
    FastVLMForConditionalGeneration,
    FastVLMImageProcessor,
    FastVLMProcessor,
    checkpoints,
)
from fastvlm_hf.compat import CACHE_NAME, cache_of
from fastvlm_hf.image_loading import load_image
from fastvlm_hf.processing_fastvlm import DEFAULT_CHAT_TEMPLATE
from fastvlm_hf.stats import TokenClock
from fastvlm_hf.testing import give_weights_a_working_scale, randomize_non_parameter_state

QWEN2_COMMON = {"model_type": "qwen2", "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768}
QWEN2_SIZES = {
    "0.5b": {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
             "intermediate_size": 4864, "vocab_size": 151936, "tie_word_embeddings": True},
    "1.5b": {"hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
             "intermediate_size": 8960, "vocab_size": 151936, "tie_word_embeddings": True},
    "7b": {"hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
           "intermediate_size": 18944, "vocab_size": 152064, "tie_word_embeddings": False},
}  # fmt: skip
SIZES = {  # FastVLM's language models, and a tiny one for smoke runs
    "tiny": {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 256, "vocab_size": 151936, "tie_word_embeddings": True},
    **QWEN2_SIZES,
}  # fmt: skip
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
PROMPT = "Describe the image in detail."
FOLLOW_UP = "What colour is the roof of the house?"
# The ChatML between the first answer and the second one: the end of the answer's turn and the next user turn.
FOLLOW_UP_TURN = f"<|im_end|>\n<|im_start|>user\n{FOLLOW_UP}<|im_end|>\n<|im_start|>assistant\n"
DEFAULT_IMAGE = REPO / "examples" / "house.png"


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer, processors and inputs


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with Qwen2's special tokens that knows the prompt's words."""
    corpus = [PROMPT, FOLLOW_UP, "You are a helpful assistant.", "system", "user", "assistant"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def build_processors(tokenizer, side: int) -> dict[str, Any]:
    """Ours (Apple's padding) and the `LlavaProcessor` transformers' native checkpoints carry (CLIP crop), with one
    tokenizer and one chat template."""
    ours = FastVLMProcessor(image_processor=FastVLMImageProcessor(size=side), tokenizer=tokenizer)
    clip = CLIPImageProcessor(
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        image_mean=[0.0, 0.0, 0.0],
        image_std=[1.0, 1.0, 1.0],
    )
    native = LlavaProcessor(
        image_processor=clip,
        tokenizer=tokenizer,
        patch_size=ours.image_processor.patch_size,
        vision_feature_select_strategy="full",
        chat_template=DEFAULT_CHAT_TEMPLATE,
    )
    return {"ours": ours, "native": native}


def rgb_image(path: Path) -> Image.Image:
    """The image in the file `path`, in RGB."""
    return load_image(path).convert("RGB")


def chat_inputs(processor, image: Image.Image, device: str) -> dict[str, torch.Tensor]:
    content = [{"type": "image", "image": image}, {"type": "text", "text": PROMPT}]
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": content}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    return inputs.to(device)


# ----------------------------------------------------------------------------------------------------------------------
# Models


def fastvlm_config(size: str, layers: int | None = None, resolution: int = 1024, tokenizer=None) -> FastVLMConfig:
    """FastVLM with the language model of `size` (one of `SIZES`), `layers` decoder layers instead of the size's
    when given, FastViTHD at `resolution` pixels, and the image token of `tokenizer` when given (else the default)."""
    text_config = {**QWEN2_COMMON, **SIZES[size]}
    if layers is not None:
        text_config["num_hidden_layers"] = layers
    image_token = {} if tokenizer is None else {"image_token_id": tokenizer.convert_tokens_to_ids("<image>")}
    return FastVLMConfig(vision_config={"image_size": resolution}, text_config=text_config, **image_token)


def give_fastvithd_working_weights(tower: torch.nn.Module, seed: int = 0) -> None:
    """Random weights at a scale that carries the image's signal through all five stages of the full-size tower, and
    BatchNorm statistics, norms and layer scales away from their initial values: no branch is switched off and no
    activation dies out (denormal floats would slow a CPU down and misrepresent real weights). He scale for GELU and
    small layer scales (0.05 to 0.25), which keep the 40-odd residual blocks of FastViTHD from blowing up."""
    randomize_non_parameter_state(tower, seed, layer_scales=(0.05, 0.25))
    give_weights_a_working_scale(tower, seed, scale=1.0, bias_std=0.02, keep_layer_scales=True)


def build_ours(config: FastVLMConfig, dtype: torch.dtype, device: str, seed: int) -> FastVLMForConditionalGeneration:
    """Random weights, built directly in `dtype` on `device`; not yet in eval mode."""
    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype):
        model = FastVLMForConditionalGeneration(config)
    give_fastvithd_working_weights(model.model.vision_tower, seed)
    return model


def build_native(config: FastVLMConfig, dtype: torch.dtype, device: str, ours=None) -> torch.nn.Module:
    """transformers' `FastVlmForConditionalGeneration` for `config`, with the weights of `ours` when given."""
    native_config = transformers.FastVlmConfig(**checkpoints.transformers_config_kwargs(config))
    with torch.device(device), default_dtype(dtype):
        native = transformers.FastVlmForConditionalGeneration(native_config)
    if ours is not None:
        native.load_state_dict(checkpoints.from_fastvlm_state_dict(ours.state_dict(), checkpoints.TRANSFORMERS))
    return native


def generation_kwargs(tokenizer) -> dict[str, Any]:
    return {
        "do_sample": False,
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "pad_token_id": tokenizer.pad_token_id,
    }


class Side:
    """One model with its processor: the calls the benchmark times."""

    def __init__(self, model, processor, image: Image.Image, device: str, generate_kwargs: dict[str, Any]):
        self.model, self.processor, self.image, self.device = model, processor, image, device
        self.generate_kwargs = generate_kwargs

    def inputs(self) -> dict[str, torch.Tensor]:
        return chat_inputs(self.processor, self.image, self.device)

    def generate(self, new_tokens: int, **kwargs):
        kwargs = {**self.generate_kwargs, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens, **kwargs}
        return self.model.generate(**self.inputs(), **kwargs)

    def timed_decode(self, new_tokens: int, seconds_per_token: list[float]) -> None:
        """Generates `new_tokens + 1` tokens and appends the time per token after the first (streamer timestamps)."""
        clock = TokenClock()
        self.generate(new_tokens + 1, streamer=clock)
        first, *_, last = clock.token_times
        seconds_per_token.append((last - first) / new_tokens)

    def first_turn(self, answer_tokens: int) -> tuple[torch.Tensor, DynamicCache]:
        """The first turn's tokens (prompt and answer) and the cache it leaves."""
        output = self.generate(answer_tokens, return_dict_in_generate=True, **{CACHE_NAME: DynamicCache()})
        return output.sequences, cache_of(output)

    def second_turn(self, first_turn_ids: torch.Tensor, cache: DynamicCache):
        tokenizer = self.processor.tokenizer
        follow_up = tokenizer(FOLLOW_UP_TURN, add_special_tokens=False, return_tensors="pt").input_ids
        input_ids = torch.cat([first_turn_ids, follow_up.to(self.device)], dim=1)
        kwargs = {**self.generate_kwargs, "max_new_tokens": 1, "min_new_tokens": 1, CACHE_NAME: cache}
        return self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)

