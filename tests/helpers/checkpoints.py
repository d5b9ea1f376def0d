"""Checkpoints laid out as Apple's Hub repos and transformers' native fast_vlm save them, built from tiny models."""

import json

import torch
import transformers
from helpers.apple_layout import apple_layout
from helpers.assertions import assert_logits_close
from helpers.tiny_model import TINY_VISION_CONFIG, tiny_text_config
from safetensors.torch import save_file

from fastvlm_hf import FastVLMConfig, FastVLMForConditionalGeneration, checkpoints
from fastvlm_hf.testing import give_weights_a_working_scale, randomize_non_parameter_state

QWEN2_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # Qwen2's added tokens, without `<image>`
SPARE_VOCAB_ROWS = 16  # Apple's config vocab (151936) exceeds its tokenizer (151646): `<image>` fits without a resize
IMAGE_SIDE = 128  # 2×2 image tokens with the tiny tower
ROPE_THETA = 1000000.0  # Qwen2's
CHATML_TEMPLATE = (  # a text-only ChatML template on the tokenizer, like Qwen2-Instruct's
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_reference_model(
    tokenizer, tie_word_embeddings=True, vision_config=TINY_VISION_CONFIG, seed=0, text_overrides=None
):
    """Our model with weights whose image reaches the logits, in bf16-representable values (a bf16 checkpoint of it
    holds exactly its tensors)."""
    text_config = tiny_text_config(len(tokenizer) + SPARE_VOCAB_ROWS, tie_word_embeddings=tie_word_embeddings)
    config = FastVLMConfig(
        vision_config=vision_config,
        text_config={**text_config, "rope_theta": ROPE_THETA, **(text_overrides or {})},
        image_token_id=len(tokenizer),  # where `<image>` lands when added to the tokenizer
    )
    torch.manual_seed(seed)
    model = FastVLMForConditionalGeneration(config).eval()
    randomize_non_parameter_state(model)
    give_weights_a_working_scale(model, seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.bfloat16().float())
    return model


def apple_config_json(model, tokenizer, **overrides):
    """Apple's flat `llava_qwen2` config.json (every field of the Hub's, `docs/checkpoint-layouts.md`) for
    `model`, with the tiny tower given explicitly, as the PR branches of Apple's repos do."""
    text, vision = model.config.text_config, model.config.vision_config
    config = {
        "_name_or_path": "./llava-v1.5-13b",
        "architectures": ["LlavaQwen2ForCausalLM"],
        "auto_map": {  # Apple's remote code, which is not in these folders: loading must not need it
            "AutoConfig": "llava_qwen.LlavaConfig",
            "AutoModelForCausalLM": "llava_qwen.LlavaQwen2ForCausalLM",
        },
        "attention_dropout": 0.0,
        "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "freeze_mm_mlp_adapter": False,
        "hidden_act": "silu",
        "hidden_size": text.hidden_size,
        "image_aspect_ratio": "pad",
        "image_grid_pinpoints": None,
        "image_token_index": model.config.image_token_id,
        "initializer_range": 0.02,
        "intermediate_size": text.intermediate_size,
        "max_position_embeddings": text.max_position_embeddings,
        "max_window_layers": text.num_hidden_layers,
        "mm_hidden_size": vision.hidden_size,
        "mm_patch_merge_type": "flat",
        "mm_projector_lr": None,
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": f"mobileclip_l_{vision.image_size}",
        "model_type": "llava_qwen2",
        "num_attention_heads": text.num_attention_heads,
        "num_hidden_layers": text.num_hidden_layers,
        "num_key_value_heads": text.num_key_value_heads,
        "rms_norm_eps": text.rms_norm_eps,
        "rope_theta": ROPE_THETA,
        "sliding_window": text.max_position_embeddings,
        "tie_word_embeddings": model.config.tie_word_embeddings,
        "tokenizer_model_max_length": 8192,
        "tokenizer_padding_side": "right",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.39.3",
        "tune_mm_mlp_adapter": False,
        "unfreeze_mm_vision_tower": True,
        "use_cache": True,
        "use_mm_proj": True,
        "use_sliding_window": False,
        "vision_config": {k: v for k, v in vision.to_dict().items() if k not in ("image_size", "transformers_version")},
        "vocab_size": text.vocab_size,
    }
    return {**config, **overrides}


def apple_state_dict(model, lm_head=None):
    """`model`'s weights under Apple's names (from the hand-written layout, not the package's key map), in bf16, with
    the unused CLIP head and a stored output embedding."""
    ours = model.state_dict()
    state_dict = {}
    for apple_key, (our_key, shape) in apple_layout(model.config.vision_config, model.config.text_config).items():
        if our_key is None:  # the CLIP head
            state_dict[apple_key] = torch.randn(shape)
        elif our_key == "lm_head.weight":
            state_dict[apple_key] = model.lm_head.weight if lm_head is None else lm_head
        else:
            assert ours[our_key].shape == shape, (our_key, tuple(ours[our_key].shape), shape)
            state_dict[apple_key] = ours[our_key]
    return {key: (t.bfloat16() if t.is_floating_point() else t).contiguous() for key, t in state_dict.items()}


def write_apple_checkpoint(directory, model, tokenizer, state_dict=None, shards=1, **config_overrides):
    """A checkpoint laid out as Apple's Hub repos: flat config.json, Apple's key names, Apple's generation config, a
    tokenizer without `<image>`, no preprocessor or processor config."""
    directory.mkdir(parents=True, exist_ok=True)
    state_dict = apple_state_dict(model) if state_dict is None else state_dict
    write_safetensors(directory, state_dict, shards)
    (directory / "config.json").write_text(json.dumps(apple_config_json(model, tokenizer, **config_overrides)))
    generation_config = {"do_sample": True, "temperature": None, "top_p": None, "transformers_version": "4.39.3"}
    (directory / "generation_config.json").write_text(json.dumps(generation_config))
    tokenizer.save_pretrained(directory)
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = CHATML_TEMPLATE  # where tokenizers of transformers 4.x keep it
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return directory


def write_safetensors(directory, state_dict, shards=1):
    if shards == 1:
        save_file(state_dict, directory / "model.safetensors", metadata={"format": "pt"})
        return
    keys = sorted(state_dict)
    weight_map = {}
    for index in range(shards):
        name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        shard = {key: state_dict[key] for key in keys[index::shards]}
        save_file(shard, directory / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total_size = sum(t.numel() * t.element_size() for t in state_dict.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def architecture(config):
    """A config's fields without the dtype, which loading sets."""
    return {key: value for key, value in config.to_dict().items() if key != "dtype"}


def model_inputs(config, seed=0):
    image_tokens = [config.image_token_id] * 4
    input_ids = torch.tensor([[1, 5, 6] + image_tokens + [7, 8, 9]])
    pixel_values = torch.rand(1, 3, IMAGE_SIDE, IMAGE_SIDE, generator=torch.Generator().manual_seed(seed))
    return {"input_ids": input_ids, "pixel_values": pixel_values}


@torch.no_grad()
def assert_same_logits(model, reference):
    inputs = model_inputs(reference.config)
    assert_logits_close(model.eval()(**inputs).logits, reference(**inputs).logits)


# The tiny tower with timm's head dim, 32, as a fast_vlm checkpoint must have it.
NATIVE_VISION_CONFIG = {"depths": [1, 1, 1, 2, 1], "embed_dims": [8, 16, 32, 64, 128], "hidden_size": 256}


def write_native_checkpoint(directory, model):
    """`model` as transformers' `FastVlmForConditionalGeneration` saves it: timm's names, a `TimmWrapperConfig`."""
    directory.mkdir(parents=True, exist_ok=True)
    config, vision = model.config, model.config.vision_config
    transformers.FastVlmConfig(
        vision_config={
            "architecture": "fastvit_mci3",
            "hidden_size": vision.hidden_size,
            "model_args": {"inference_mode": True, "layers": vision.depths, "embed_dims": vision.embed_dims},
        },
        text_config=config.text_config.to_dict(),
        image_token_id=config.image_token_id,
    ).save_pretrained(directory)
    state_dict = checkpoints.from_fastvlm_state_dict(model.state_dict(), checkpoints.TRANSFORMERS)
    if config.tie_word_embeddings:  # a tied head is not stored, as transformers saves it
        state_dict.pop("lm_head.weight", None)
    save_file({key: tensor.contiguous() for key, tensor in state_dict.items()}, directory / "model.safetensors")
    return directory
