"""conversion/convert_checkpoint.py: Apple's and transformers' layouts to ours and back, dtypes, --verify."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import transformers
from checkpoint_helpers import (
    IMAGE_SIDE,
    NATIVE_VISION_CONFIG,
    QWEN2_SPECIAL_TOKENS,
    assert_same_logits,
    build_reference_model,
    write_apple_checkpoint,
)
from conftest import build_tiny_tokenizer
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, LlavaProcessor

from fastvlm_hf import FastVLMConfig, FastVLMForConditionalGeneration, FastVLMProcessor

_SCRIPT = Path(__file__).parents[1] / "conversion" / "convert_checkpoint.py"
_spec = importlib.util.spec_from_file_location("convert_checkpoint", _SCRIPT)
convert_checkpoint = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert_checkpoint)

needs_native_fast_vlm = pytest.mark.skipif(
    not hasattr(transformers, "FastVlmConfig"), reason=f"transformers {transformers.__version__} has no fast_vlm"
)


@pytest.fixture(scope="module")
def apple_tokenizer():
    return build_tiny_tokenizer(special_tokens=QWEN2_SPECIAL_TOKENS)


@pytest.fixture(scope="module")
def reference_model(apple_tokenizer):
    return build_reference_model(apple_tokenizer)


@pytest.fixture(scope="module")
def apple_dir(tmp_path_factory, reference_model, apple_tokenizer):
    return write_apple_checkpoint(tmp_path_factory.mktemp("apple"), reference_model, apple_tokenizer)


def safetensors_keys_and_dtypes(directory):
    found = {}
    for path in Path(directory).glob("*.safetensors"):
        with safe_open(path, "pt") as weights:
            found.update({key: weights.get_slice(key).get_dtype() for key in weights.keys()})
    return found


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory, apple_dir):
    output = tmp_path_factory.mktemp("converted")
    convert_checkpoint.convert(str(apple_dir), output, max_shard_size="100KB")
    return output


def test_apple_checkpoint_converts_to_our_layout(converted_dir, reference_model, apple_tokenizer):
    assert json.loads((converted_dir / "config.json").read_text())["model_type"] == "fastvlm"
    weights = safetensors_keys_and_dtypes(converted_dir)
    assert set(weights) == set(reference_model.state_dict()) - {"lm_head.weight"}  # tied: not stored
    assert len(list(converted_dir.glob("model-*.safetensors"))) > 1  # sharded
    assert (converted_dir / "model.safetensors.index.json").exists()
    assert weights["model.multi_modal_projector.linear_1.weight"] == "BF16"  # the source's dtype

    assert_same_logits(AutoModelForImageTextToText.from_pretrained(converted_dir, dtype=torch.float32), reference_model)
    generation_config = json.loads((converted_dir / "generation_config.json").read_text())
    assert generation_config["eos_token_id"] == apple_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert generation_config.get("do_sample", False) is False

    assert (converted_dir / "chat_template.jinja").exists() and (converted_dir / "processor_config.json").exists()
    processor = AutoProcessor.from_pretrained(converted_dir)
    assert type(processor) is FastVLMProcessor
    assert processor.image_token_id == reference_model.config.image_token_id
    assert (processor.image_processor.image_mode, processor.image_processor.size["height"]) == ("pad", IMAGE_SIDE)


def test_verify_passes_on_a_faithful_conversion(apple_dir, converted_dir):
    assert convert_checkpoint.verify(str(apple_dir), converted_dir) <= convert_checkpoint.VERIFY_TOLERANCE


def test_verify_fails_on_a_lossy_dtype(tmp_path, apple_dir, apple_tokenizer):
    source = tmp_path / "float32"
    model = build_reference_model(apple_tokenizer)
    with torch.no_grad():  # values that bfloat16 cannot hold
        model.model.multi_modal_projector.linear_2.weight.normal_()
    model.save_pretrained(source)
    FastVLMProcessor.from_pretrained(apple_dir).save_pretrained(source)
    output = tmp_path / "bfloat16"
    convert_checkpoint.convert(str(source), output, dtype="bfloat16")
    assert set(safetensors_keys_and_dtypes(output).values()) == {"BF16", "I64"}  # BatchNorm counters stay integers
    with pytest.raises(RuntimeError, match="differ .* by up to"):
        convert_checkpoint.verify(str(source), output)


def test_dtype_option_sets_the_weights_dtype(tmp_path, apple_dir):
    convert_checkpoint.main([str(apple_dir), str(tmp_path), "--dtype", "float32", "--verify"])
    assert safetensors_keys_and_dtypes(tmp_path)["model.language_model.norm.weight"] == "F32"
    assert FastVLMConfig.from_pretrained(tmp_path).dtype == torch.float32


@needs_native_fast_vlm
def test_to_transformers_writes_the_native_layout_and_back(tmp_path, apple_tokenizer, capsys):
    reference_model = build_reference_model(apple_tokenizer, vision_config=NATIVE_VISION_CONFIG)  # timm's head dim
    apple_dir = write_apple_checkpoint(tmp_path / "apple", reference_model, apple_tokenizer)
    native = tmp_path / "native"
    convert_checkpoint.main([str(apple_dir), str(native), "--to", "transformers", "--verify"])
    assert "Verified" in capsys.readouterr().out

    config = AutoConfig.from_pretrained(native)
    assert type(config) is transformers.FastVlmConfig  # transformers' own class reads it
    assert config.vision_config.architecture == "fastvit_mci3"
    assert config.image_token_id == reference_model.config.image_token_id
    weights = safetensors_keys_and_dtypes(native)
    assert "model.vision_tower.timm_model.stages.4.blocks.0.token_mixer.qkv.weight" in weights
    assert not any(key.startswith("model.vision_tower.stages") for key in weights)
    processor = AutoProcessor.from_pretrained(native)
    assert type(processor) is LlavaProcessor and processor.patch_size == 64
    side = reference_model.config.vision_config.image_size
    assert processor.image_processor.crop_size == {"height": side, "width": side}

    assert_same_logits(FastVLMForConditionalGeneration.from_pretrained(native, dtype=torch.float32), reference_model)
    ours = tmp_path / "ours"
    convert_checkpoint.main([str(native), str(ours), "--verify"])
    assert_same_logits(FastVLMForConditionalGeneration.from_pretrained(ours, dtype=torch.float32), reference_model)
