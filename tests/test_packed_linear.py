"""Linear weights packed for oneDNN's CPU kernels: the same outputs, plain checkpoints, and a clean way back."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers.checkpoints import model_inputs
from helpers.markers import needs_native_bfloat16
from torch import nn

from fastvlm_hf import FastVLMForConditionalGeneration, FastVLMModel
from fastvlm_hf.cpu import fast_routes_off
from fastvlm_hf.cpu.packed_linear import PackedLinear, can_pack

pytestmark = needs_native_bfloat16


def model_in(tiny_model, dtype):
    model = copy.deepcopy(tiny_model).to(dtype)
    inputs = model_inputs(model.config)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return model, inputs


def layer_types(model):
    layers = (nn.Linear, PackedLinear)
    return {name: type(module) for name, module in model.named_modules() if isinstance(module, layers)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_layer_computes_the_linear_map(dtype, bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 80, bias=bias, dtype=dtype)
    packed = PackedLinear(linear)
    with torch.no_grad():
        for inputs in (torch.randn(1, 96, dtype=dtype), torch.randn(2, 7, 96, dtype=dtype)):
            expected = (inputs.double() @ linear.weight.double().T + (linear.bias.double() if bias else 0)).to(dtype)
            torch.testing.assert_close(packed(inputs), expected)  # the dtype's own tolerance
        contiguous = torch.randn(3, 5, 96, dtype=dtype)
        actual = packed(contiguous)
        if dtype == torch.bfloat16:  # the same kernel as F.linear's, on the same weight: bit for bit
            assert torch.equal(actual, F.linear(contiguous, linear.weight, linear.bias))


@torch.no_grad()
def test_packed_layer_multiplies_by_the_plain_weight_with_the_fast_routes_off(onednn_calls):
    torch.manual_seed(0)
    linear = nn.Linear(96, 80)
    packed = PackedLinear(linear)
    inputs = torch.randn(3, 96)
    packed(inputs)
    assert onednn_calls == {"_linear_pointwise": 1}
    with fast_routes_off():
        assert torch.equal(packed(inputs), F.linear(inputs, linear.weight, linear.bias))
    assert onednn_calls == {"_linear_pointwise": 1}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_packed_model_gives_the_same_logits_and_tokens(tiny_model, dtype):
    reference, inputs = model_in(tiny_model, dtype)
    model = copy.deepcopy(reference)
    packed = model.pack_weights()

    language_model = [name for name in layer_types(reference) if name.startswith("model.language_model.")]
    assert len(language_model) == 7 * reference.config.text_config.num_hidden_layers
    assert sorted(packed) == sorted([*language_model, "lm_head"])
    types = layer_types(model)
    assert {name for name, kind in types.items() if kind is PackedLinear} == set(packed)
    # The vision tower (its attention's qkv included) and the projector stay plain.
    assert types["model.multi_modal_projector.linear_1"] is nn.Linear
    assert any(name.startswith("model.vision_tower.") and kind is nn.Linear for name, kind in types.items())

    with torch.no_grad():
        logits, expected = model(**inputs).logits, reference(**inputs).logits
        if dtype == torch.bfloat16:
            assert torch.equal(logits, expected)
        else:
            torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        generate = {"max_new_tokens": 6, "do_sample": False, "eos_token_id": None}
        assert torch.equal(model.generate(**inputs, **generate), reference.generate(**inputs, **generate))


def test_base_model_packs_its_language_model(tiny_model):
    base = FastVLMModel(tiny_model.config).eval()
    packed = base.pack_weights()
    assert packed and all(name.startswith("language_model.") for name in packed)


def test_packed_model_keeps_plain_weights_in_its_state_dict_and_checkpoints(tiny_model, tmp_path):
    model, inputs = model_in(tiny_model, torch.bfloat16)
    expected = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    model.pack_weights()

    state = model.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[name], expected[name]) for name in expected)

    model.save_pretrained(tmp_path)
    assert type(model.lm_head) is PackedLinear  # still packed after saving
    reloaded = FastVLMForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16)
    reloaded_state = reloaded.state_dict()
    assert all(torch.equal(reloaded_state[name], expected[name]) for name in expected)
    assert reloaded.lm_head.weight is reloaded.model.language_model.embed_tokens.weight


def test_unpacking_gives_back_tied_plain_layers(tiny_model):
    model, inputs = model_in(tiny_model, torch.bfloat16)
    expected = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    packed = model.pack_weights()
    assert model.unpack_weights() == packed
    assert not any(isinstance(module, PackedLinear) for module in model.modules())
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert all(torch.equal(tensor, expected[name]) for name, tensor in model.state_dict().items())
    model.train()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()  # trainable again
    assert model.model.language_model.layers[0].mlp.up_proj.weight.grad is not None


def test_packed_layers_refuse_gradients_and_casts_with_a_clear_error(tiny_model):
    model, inputs = model_in(tiny_model, torch.bfloat16)
    model.pack_weights()
    with pytest.raises(RuntimeError, match="no gradient.*unpack_weights"):
        model.train()(**inputs, labels=inputs["input_ids"])

    before = {name: (tensor.dtype, tensor.clone()) for name, tensor in model.state_dict().items()}
    for cast in (lambda m: m.to(torch.float32), lambda m: m.float(), lambda m: m.half(), lambda m: m.to("meta")):
        with pytest.raises(RuntimeError, match="packed for torch.bfloat16 on CPU.*`unpack_weights\(\)` before"):
            cast(model.eval())
    after = model.state_dict()  # refused before anything moved: the model is as it was, and still works
    assert all(after[name].dtype == dtype and torch.equal(after[name], tensor) for name, (dtype, tensor) in before.items())
    model.to("cpu")  # a move to where it is passes
    with torch.no_grad():
        packed_logits = model(**inputs).logits

    model.unpack_weights()  # the fix the message names: unpack, cast, pack again
    model.float().pack_weights()
    inputs["pixel_values"] = inputs["pixel_values"].float()
    with torch.no_grad():
        logits = model(**inputs).logits
        with fast_routes_off():  # the plain float32 computation of the same weights
            expected = model(**inputs).logits
    assert logits.dtype == torch.float32 and all(p.dtype == torch.float32 for p in model.parameters())
    assert relative_error(logits, expected) <= 1e-5
    assert packed_logits.dtype == torch.bfloat16


def relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def test_only_plain_cpu_layers_in_bfloat16_or_float32_are_packed(tiny_model):
    assert can_pack(nn.Linear(8, 8)) and can_pack(nn.Linear(8, 8, dtype=torch.bfloat16))
    assert not can_pack(nn.Linear(8, 8, dtype=torch.float16))
    assert not can_pack(nn.Linear(8, 8, device="meta"))
    assert not can_pack(type("QuantizedLinear", (nn.Linear,), {})(8, 8))  # e.g. bitsandbytes' layers
    model, _ = model_in(tiny_model, torch.float16)
    assert model.pack_weights() == []
