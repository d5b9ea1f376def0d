"""An independent oracle: transformers' own `FastVlmForConditionalGeneration` (5.x, on timm's `fastvit_mci3`) runs a
checkpoint that `fastvlm-hf convert --to transformers` wrote, and must agree with our native FastViTHD + Qwen2 on the
same weights: float32 image features and logits to a relative 1e-5, and the same greedy tokens.

The converter's own `--verify` only reloads the output with our code; here the other side is code we did not write.
"""

import os

# timm's attention uses `F.scaled_dot_product_attention` unless told not to; Apple's (and ours) is the explicit
# softmax(q·kᵀ·scale)·v. Read by timm when it is first imported (`docs/checkpoint-layouts.md`).
os.environ.setdefault("TIMM_FUSED_ATTN", "0")

import importlib.util  # noqa: E402
import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from helpers.checkpoints import (  # noqa: E402
    NATIVE_VISION_CONFIG,
    QWEN2_SPECIAL_TOKENS,
    build_reference_model,
    write_apple_checkpoint,
)
from helpers.tiny_tokenizer import build_tiny_tokenizer  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoProcessor  # noqa: E402

from fastvlm_hf import FastVLMForConditionalGeneration, FastVLMProcessor  # noqa: E402
from fastvlm_hf.cli import main  # noqa: E402

pytestmark = [
    pytest.mark.skipif(
        not hasattr(transformers, "FastVlmForConditionalGeneration"),
        reason=f"transformers {transformers.__version__} has no native FastVlmForConditionalGeneration",
    ),
    pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="transformers' fast_vlm needs timm: pip install -e \".[test,oracle]\""),
]

TOLERANCE = 1e-5  # relative, float32
IMAGE_SIDE = 128  # 2×2 image tokens
# The real FastViTHD topology at toy widths, with timm's head dim (32): what a fast_vlm checkpoint can hold.
VISION_CONFIG = {**NATIVE_VISION_CONFIG, "image_size": IMAGE_SIDE}


def transformers_config(apple_config: dict) -> "transformers.FastVlmConfig":
    """transformers' `FastVlmConfig` for an Apple checkpoint, built from the fields of Apple's published config.json
    as their meaning is documented (`mlp2x_gelu`: Linear, GELU, Linear, with biases), never from this package's
    translation of them, so that a wrong default of ours (an activation, a bias) shows in the comparison."""
    assert apple_config["mm_projector_type"] == "mlp2x_gelu"
    text_fields = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "hidden_act", "rms_norm_eps", "rope_theta", "max_position_embeddings"]  # fmt: skip
    tower = apple_config["vision_config"]  # the tiny tower's sizes (Apple's own are fastvit_mci3's defaults)
    return transformers.FastVlmConfig(
        vision_config={
            "architecture": "fastvit_mci3",
            "hidden_size": apple_config["mm_hidden_size"],
            "model_args": {"inference_mode": True, "layers": tower["depths"], "embed_dims": tower["embed_dims"]},
        },
        text_config={"model_type": "qwen2", **{field: apple_config[field] for field in text_fields}},
        image_token_id=apple_config["image_token_index"],
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=apple_config["tie_word_embeddings"],
    )


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def models(request, tmp_path_factory):
    """Our model loaded from an Apple-layout checkpoint, transformers' from its `--to transformers` conversion, our
    processor and transformers' (the converted folder's `LlavaProcessor`)."""
    tokenizer = build_tiny_tokenizer(special_tokens=QWEN2_SPECIAL_TOKENS)
    reference = build_reference_model(tokenizer, tie_word_embeddings=request.param, vision_config=VISION_CONFIG)
    apple_dir = write_apple_checkpoint(tmp_path_factory.mktemp("apple"), reference, tokenizer)
    native_dir = tmp_path_factory.mktemp("native")
    assert main(["convert", str(apple_dir), str(native_dir), "--to", "transformers"]) == 0
    # transformers' side reads the converted weights under a config of its own, not the converter's
    transformers_config(json.loads((apple_dir / "config.json").read_text())).save_pretrained(native_dir)

    ours = FastVLMForConditionalGeneration.from_pretrained(apple_dir, dtype=torch.float32).eval()
    theirs = transformers.FastVlmForConditionalGeneration.from_pretrained(native_dir, dtype=torch.float32).eval()
    assert type(theirs.model.vision_tower).__name__ == "TimmWrapperModel"
    timm_attention = [m for m in theirs.modules() if hasattr(m, "fused_attn")]
    fused = "timm's attention is fused: TIMM_FUSED_ATTN must be 0 when timm is first imported"
    assert timm_attention and not any(m.fused_attn for m in timm_attention), fused
    return ours, theirs, FastVLMProcessor.from_pretrained(apple_dir), AutoProcessor.from_pretrained(native_dir)


def chat_inputs(processor):
    """A chat prompt with one square image (where our padding and transformers' CLIP crop agree)."""
    pixels = torch.randint(0, 256, (IMAGE_SIDE, IMAGE_SIDE, 3), generator=torch.Generator().manual_seed(0))
    image = Image.fromarray(pixels.to(torch.uint8).numpy())
    content = [{"type": "image", "image": image}, {"type": "text", "text": "What is in this picture?"}]
    return processor.apply_chat_template(
        [{"role": "user", "content": content}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )


@pytest.fixture(scope="module")
def inputs(models):
    """The prompt as our processor builds it; both models get exactly these tensors."""
    return chat_inputs(models[2])


def test_the_converted_processor_builds_the_same_inputs(models, inputs):
    theirs = chat_inputs(models[3])
    assert theirs["input_ids"].tolist() == inputs["input_ids"].tolist()
    assert torch.equal(theirs["pixel_values"], inputs["pixel_values"])


@torch.no_grad()
def test_image_features_match_transformers(models, inputs):
    ours, theirs = models[:2]
    # `pooler_output` holds the features as one tensor, or (5.0) as a list of one tensor per image
    expected = torch.stack(list(theirs.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output))
    actual = ours.get_image_features(inputs["pixel_values"]).pooler_output
    assert actual.shape == expected.shape == (1, 4, ours.config.text_config.hidden_size)
    error = relative_error(actual, expected)
    print(f"image features: max relative error {error:.3g}")
    assert error <= TOLERANCE


@torch.no_grad()
def test_logits_match_transformers(models, inputs):
    ours, theirs = models[:2]
    expected, actual = theirs(**inputs).logits, ours(**inputs).logits
    assert actual.shape == expected.shape
    error = relative_error(actual, expected)
    print(f"logits: max relative error {error:.3g}")
    assert error <= TOLERANCE

    other_image = {**inputs, "pixel_values": inputs["pixel_values"].flip(-1)}  # the image must matter to the logits
    assert relative_error(theirs(**other_image).logits, expected) > 1e3 * TOLERANCE


@torch.no_grad()
def test_greedy_tokens_match_transformers(models, inputs):
    ours, theirs = models[:2]
    kwargs = {"max_new_tokens": 8, "do_sample": False, "min_new_tokens": 8}  # all 8 even if one is the end of turn
    expected, actual = theirs.generate(**inputs, **kwargs), ours.generate(**inputs, **kwargs)
    assert actual.shape[1] == inputs["input_ids"].shape[1] + 8
    assert actual.tolist() == expected.tolist()
