"""bitsandbytes 4-bit and 8-bit loading on CPU, and big-model loading with a device map that offloads to disk."""

import json
import logging

import pytest
import torch
import transformers
from accelerate import infer_auto_device_map
from helpers.checkpoints import build_reference_model, model_inputs, write_native_checkpoint
from helpers.tiny_model import TINY_VISION_CONFIG, tiny_text_config
from torch import nn
from transformers import AutoModel, AutoModelForImageTextToText, BitsAndBytesConfig, PreTrainedModel

from fastvlm_hf import FastVLMConfig, FastVLMForConditionalGeneration, quantization
from fastvlm_hf.testing import randomize_non_parameter_state

bnb = pytest.importorskip("bitsandbytes")

BNB_BLOCK = 64  # bitsandbytes' CPU kernels need every quantized Linear's in- and out-features to be multiples of it
QUANT_TEXT_CONFIG = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4, "num_hidden_layers": 3}
UNQUANTIZED = ("model.vision_tower", "model.multi_modal_projector", "lm_head")
FP4 = {"load_in_4bit": True}
NF4_BF16 = {
    "load_in_4bit": True,
    "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_use_double_quant": True,
    "bnb_4bit_compute_dtype": torch.bfloat16,
}
INT8 = {"load_in_8bit": True}
QUANTIZED_TYPES = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


@pytest.fixture(scope="module")
def quant_model(tiny_tokenizer):
    text_config = {**tiny_text_config(len(tiny_tokenizer)), **QUANT_TEXT_CONFIG, "initializer_range": 0.2}
    config = FastVLMConfig(
        vision_config=TINY_VISION_CONFIG,
        text_config=text_config,
        image_token_id=tiny_tokenizer.convert_tokens_to_ids("<image>"),
        eos_token_id=tiny_tokenizer.eos_token_id,
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = FastVLMForConditionalGeneration(config).eval()
    randomize_non_parameter_state(model)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":
            assert module.in_features % BNB_BLOCK == 0 and module.out_features % BNB_BLOCK == 0, name
    return model


@pytest.fixture(scope="module")
def quant_dir(quant_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("quant-fastvlm")
    quant_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_4bit(quant_dir):
    return load(quant_dir, FP4)


def load(path, quantization=None, auto_class=AutoModelForImageTextToText, **kwargs):
    if quantization is not None:
        kwargs["quantization_config"] = BitsAndBytesConfig(**quantization)
    return auto_class.from_pretrained(path, dtype=torch.float32, **kwargs).eval()


def quantized_names(model):
    return sorted(name for name, module in model.named_modules() if isinstance(module, QUANTIZED_TYPES))


def linear_names(model):
    return sorted(name for name, module in model.named_modules() if isinstance(module, nn.Linear))


def language_model_linears(model):
    prefix = "model.language_model."
    return sorted(name for name in linear_names(model) if name.startswith(prefix))


def inputs_for(model):
    return model_inputs(model.config)


@torch.no_grad()
def logits(model):
    return model(**inputs_for(model)).logits.float()


@torch.no_grad()
def greedy(model, new_tokens=6):
    inputs = inputs_for(model)
    output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
    return output[:, inputs["input_ids"].shape[1] :]


def correlation(a, b):
    return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()


# ----------------------------------------------------------------------------------------------------------------------
# What gets quantized


@pytest.mark.parametrize(
    "quantization, quantized_type, weight_dtype",
    [(FP4, bnb.nn.Linear4bit, torch.uint8), (NF4_BF16, bnb.nn.Linear4bit, torch.uint8), (INT8, bnb.nn.Linear8bitLt, torch.int8)],
    ids=["fp4", "nf4-double-quant-bf16", "int8"],
)
def test_only_the_language_models_linear_layers_are_quantized(quant_dir, quant_model, quantization, quantized_type, weight_dtype):
    model = load(quant_dir, quantization)
    assert quantized_names(model) == language_model_linears(quant_model)
    for name, module in model.named_modules():
        if isinstance(module, QUANTIZED_TYPES):
            assert type(module) is quantized_type and module.weight.dtype == weight_dtype, name
        elif name.startswith(UNQUANTIZED) and isinstance(module, (nn.Linear, nn.Conv2d)):
            assert module.weight.dtype == torch.float32, name
    assert type(model.lm_head) is nn.Linear
    vision_linears = [name for name in linear_names(model) if name.startswith("model.vision_tower.")]
    assert any(name.endswith(".qkv") for name in vision_linears) and any(name.endswith(".proj") for name in vision_linears)
    assert all(type(module) is nn.Linear for module in model.model.multi_modal_projector.modules() if isinstance(module, nn.Linear))


@pytest.mark.parametrize("quantization, min_saving", [(FP4, 0.8), (INT8, 0.7)], ids=["4bit", "8bit"])
def test_memory_footprint_drops_by_the_language_models_linear_weights(quant_dir, quant_model, quantization, min_saving):
    full = load(quant_dir)
    quantized = load(quant_dir, quantization)
    linear_bytes = sum(
        module.weight.numel() * module.weight.element_size()
        for name, module in full.named_modules()
        if name in language_model_linears(quant_model)
    )
    saved = full.get_memory_footprint() - quantized.get_memory_footprint()
    assert min_saving * linear_bytes <= saved < linear_bytes


@pytest.mark.parametrize("quantization, min_correlation", [(FP4, 0.7), (NF4_BF16, 0.8), (INT8, 0.99)], ids=["fp4", "nf4-bf16", "int8"])
def test_quantized_model_generates_deterministically_close_to_the_full_model(quant_dir, quant_model, quantization, min_correlation):
    model = load(quant_dir, quantization)
    tokens = greedy(model)
    assert tokens.shape == (1, 6)
    assert torch.equal(greedy(model), tokens)
    assert correlation(logits(model), logits(quant_model)) > min_correlation


def test_user_skip_list_is_added_to_not_replacing_ours(quant_dir, quant_model):
    own = "model.language_model.layers.1.mlp"
    model = load(quant_dir, {**FP4, "llm_int8_skip_modules": [own]})  # no lm_head in it
    assert type(model.lm_head) is nn.Linear
    expected = [name for name in language_model_linears(quant_model) if not name.startswith(own + ".")]
    assert quantized_names(model) == expected
    assert model.config.quantization_config.llm_int8_skip_modules[0] == own
    greedy(model)  # a quantized lm_head (vocab not a multiple of 64) would fail on CPU


def test_skip_list_given_as_a_dict_config_is_merged_too(quant_dir, quant_model):
    model = AutoModelForImageTextToText.from_pretrained(
        quant_dir, dtype=torch.float32, quantization_config={"load_in_4bit": True, "llm_int8_skip_modules": ["model.language_model.layers.0"]}
    )
    expected = [name for name in language_model_linears(quant_model) if not name.startswith("model.language_model.layers.0.")]
    assert quantized_names(model) == expected and type(model.lm_head) is nn.Linear


def test_skip_list_that_is_not_a_list_fails_clearly(quant_dir):
    with pytest.raises((TypeError, ValueError), match="llm_int8_skip_modules"):
        AutoModelForImageTextToText.from_pretrained(
            quant_dir, quantization_config={"load_in_4bit": True, "llm_int8_skip_modules": "lm_head"}
        )


def test_base_model_keeps_vision_tower_and_projector(quant_dir, quant_model):
    model = load(quant_dir, FP4, auto_class=AutoModel)
    expected = [name.removeprefix("model.") for name in language_model_linears(quant_model)]
    assert quantized_names(model) == expected
    with torch.no_grad():
        model(**inputs_for(model))


# ----------------------------------------------------------------------------------------------------------------------
# Pre-quantized checkpoints, dequantize, dtype changes


@pytest.mark.parametrize("quantization", [NF4_BF16, INT8], ids=["nf4", "int8"])
def test_pre_quantized_checkpoint_reloads_without_a_config(quant_dir, tmp_path, quantization):
    model = load(quant_dir, quantization)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["quant_method"] == "bitsandbytes"
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert quantized_names(reloaded) == quantized_names(model)
    assert type(reloaded.lm_head) is nn.Linear
    assert torch.equal(logits(reloaded), logits(model))
    assert torch.equal(greedy(reloaded), greedy(model))


def test_stored_config_without_our_skip_list_still_keeps_the_vision_tower(quant_dir, tmp_path):
    model = load(quant_dir, FP4)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["llm_int8_skip_modules"] = None  # as a checkpoint quantized elsewhere might say
    (tmp_path / "config.json").write_text(json.dumps(config))
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert quantized_names(reloaded) == quantized_names(model)
    assert torch.equal(logits(reloaded), logits(model))


def test_checkpoint_quantized_with_its_vision_tower_loads_as_stored(quant_dir, tmp_path):
    # transformers' own loader, without this package's skip list, quantizes the vision tower and projector too
    plain = PreTrainedModel.from_pretrained.__func__(
        FastVLMForConditionalGeneration, quant_dir, dtype=torch.float32, quantization_config=BitsAndBytesConfig(**FP4)
    ).eval()
    # bitsandbytes' repacked-for-CPU path leaves state behind that changes later models' outputs; keep it off
    quantization.keep_standard_4bit_layout(plain)
    assert any(name.startswith("model.vision_tower.") for name in quantized_names(plain))
    plain.save_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert quantized_names(reloaded) == quantized_names(plain)
    assert torch.equal(logits(reloaded), logits(plain))


def relative_weight_errors(model, reference):
    weights = dict(reference.named_parameters())
    return {
        name: ((module.weight.float() - weights[f"{name}.weight"]).norm() / weights[f"{name}.weight"].norm()).item()
        for name, module in model.named_modules()
        if name in language_model_linears(reference)
    }


def test_dequantize_after_cpu_inference_gives_back_the_weights(quant_dir, quant_model):
    model = load(quant_dir, FP4)
    logits(model)  # a CPU forward pass first (bitsandbytes may repack weights for its CPU kernels then)
    model.dequantize()
    assert quantized_names(model) == []
    errors = relative_weight_errors(model, quant_model)
    assert errors and max(errors.values()) < 0.15  # FP4 rounding, ~0.12 on Gaussian weights


def test_saving_after_cpu_inference_keeps_the_weights(quant_dir, tmp_path):
    model = load(quant_dir, FP4)
    expected = logits(model)
    model.save_pretrained(tmp_path)
    assert torch.equal(logits(AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.float32)), expected)


def test_casting_a_4bit_model_raises_transformers_error(model_4bit):
    with pytest.raises(ValueError, match="4-bit|bitsandbytes|dtype"):
        model_4bit.to(torch.float16)


# ----------------------------------------------------------------------------------------------------------------------
# Other checkpoint layouts


def test_apple_checkpoint_in_4bit_keeps_the_vision_tower(apple_dir, reference_model):
    model = load(apple_dir, FP4)
    assert quantized_names(model) == language_model_linears(reference_model)
    assert type(model.lm_head) is nn.Linear
    full = load(apple_dir)
    vision = {k: v for k, v in model.state_dict().items() if k.startswith("model.vision_tower.")}
    assert all(torch.equal(tensor, full.state_dict()[key]) for key, tensor in vision.items())
    assert correlation(logits(model), logits(full)) > 0.9


@pytest.mark.skipif(not hasattr(transformers, "FastVlmConfig"), reason="transformers' own fast_vlm arrived in 5.0")
def test_native_checkpoint_in_4bit_keeps_the_vision_tower(tmp_path, apple_tokenizer):
    from helpers.checkpoints import NATIVE_VISION_CONFIG

    reference = build_reference_model(apple_tokenizer, tie_word_embeddings=False, vision_config=NATIVE_VISION_CONFIG)
    write_native_checkpoint(tmp_path, reference)
    model = load(tmp_path, FP4, auto_class=FastVLMForConditionalGeneration)  # Auto classes pick transformers' own
    assert quantized_names(model) == language_model_linears(reference)
    assert type(model.lm_head) is nn.Linear
    greedy(model)


# ----------------------------------------------------------------------------------------------------------------------
# Device maps


def test_device_map_offloads_the_language_model_to_disk_and_generates(quant_dir, quant_model, tmp_path):
    layer_bytes = sum(p.numel() * p.element_size() for p in quant_model.model.language_model.layers[0].parameters())
    total_bytes = sum(p.numel() * p.element_size() for p in quant_model.parameters())
    budget = total_bytes - 2 * layer_bytes
    model = load(quant_dir, device_map="auto", max_memory={"cpu": budget}, offload_folder=str(tmp_path))
    # The tied output head goes to disk with the input embedding it shares.
    assert model.hf_device_map["lm_head"] == "disk"
    assert model.hf_device_map["model.vision_tower"] == "cpu"
    assert torch.equal(greedy(model), greedy(quant_model))


def test_vision_tower_offloaded_to_disk_computes_the_same_features(quant_dir, quant_model, tmp_path):
    device_map = dict.fromkeys(("model.multi_modal_projector", "model.language_model", "lm_head"), "cpu")
    model = load(quant_dir, device_map={"model.vision_tower": "disk", **device_map}, offload_folder=str(tmp_path))
    assert next(model.model.vision_tower.parameters()).device.type == "meta"
    # Its BatchNorm statistics load from disk too. An offloaded tower's weights stay on the meta device until each layer
    # runs, so it takes the plain module paths (BatchNorm unfolded, every ConvFFN as convolutions, where the resident
    # tower runs its last stages' as linear layers): the same values up to float32 rounding.
    torch.testing.assert_close(logits(model), logits(quant_model), rtol=1e-4, atol=1e-4)


def placed_on(device_map, parameter_name):
    """The device a (cleaned) accelerate device map gives a parameter: that of its longest listed prefix."""
    prefixes = [name for name in device_map if name == "" or parameter_name.startswith(name + ".")]
    return device_map[max(prefixes, key=len)]


@pytest.mark.parametrize("declared", [True, False], ids=["declared-no-split-modules", "language-model-layers-only"])
def test_auto_device_map_never_splits_the_vision_tower(quant_model, declared):
    no_split = list(FastVLMForConditionalGeneration._no_split_modules) if declared else ["Qwen2DecoderLayer"]
    vision_tower = [f"model.vision_tower.{name}" for name, _ in quant_model.model.vision_tower.named_parameters()]
    vision_bytes = sum(p.numel() * p.element_size() for p in quant_model.model.vision_tower.parameters())
    plenty = 10 * sum(p.numel() * p.element_size() for p in quant_model.parameters())
    # The first accelerator could hold most of the tower, but not all of it with room to spare.
    max_memory = {0: vision_bytes, 1: plenty, "cpu": plenty}
    device_map = infer_auto_device_map(quant_model, max_memory=max_memory, no_split_module_classes=no_split)
    devices = {placed_on(device_map, name) for name in vision_tower}
    if declared:
        assert len(devices) == 1
    else:  # what declaring the tower in `_no_split_modules` prevents
        assert devices == {0, 1}


def test_8bit_generation_says_that_it_casts_the_inputs_once(quant_dir, caplog, monkeypatch):
    bnb_logger = logging.getLogger("bitsandbytes.autograd._functions")
    monkeypatch.setattr(bnb_logger, "filters", [])  # as in a fresh process, whatever loaded in 8 bits before
    model = load(quant_dir, INT8)
    with caplog.at_level(logging.WARNING, logger="bitsandbytes"):
        greedy(model)  # dozens of 8-bit matmuls on CPU, each casting its float32 input
    notices = [record for record in caplog.records if record.getMessage().startswith("MatMul8bitLt: inputs will be cast")]
    assert len(notices) == 1
