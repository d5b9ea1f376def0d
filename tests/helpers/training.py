"""What the fine-tuning tests share: a tiny model that can learn, and rows about coloured pictures."""

import torch
from helpers.tiny_model import TINY_VISION_CONFIG, tiny_text_config

from fastvlm_hf import FastVLMConfig, FastVLMForConditionalGeneration

# Weights drawn wide enough that the tiny model can be confident: with the default 0.02 its logits stay near zero
# whatever LoRA learns, and the loss near log(vocabulary size).
TRAINABLE_TEXT = {"initializer_range": 0.2}
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}


def build_trainable_model(tokenizer, seed=0, **text_overrides) -> FastVLMForConditionalGeneration:
    config = FastVLMConfig(
        vision_config=TINY_VISION_CONFIG,
        text_config={**tiny_text_config(len(tokenizer)), **TRAINABLE_TEXT, **text_overrides},
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return FastVLMForConditionalGeneration(config)


def user(text, images=0):
    return {"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}
