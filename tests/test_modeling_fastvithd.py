"""FastViTHD: each block against hand-written math, the whole encoder's shapes, layout and serialisation."""

import copy

import pytest
import torch
from helpers.fastvithd_by_hand import (
    attention_by_hand,
    channel_layer_norm_by_hand,
    conv_mlp_by_hand,
    depthwise_conv_by_hand,
    gelu_by_hand,
    pointwise_by_hand,
    relative_error,
    scaled,
    tiny_eval_tower,
    tower_by_hand,
)
from helpers.markers import needs_native_bfloat16
from helpers.tiny_model import TINY_VISION_CONFIG
from transformers import AutoConfig, AutoModel

from fastvlm_hf import FastViTHDConfig, FastViTHDModel
from fastvlm_hf.cpu import fast_routes_off
from fastvlm_hf.modeling_fastvithd import (
    FastViTHDAttentionBlock,
    FastViTHDConvAct,
    FastViTHDConvMlp,
    FastViTHDConvNorm,
    FastViTHDLayerNorm2d,
    FastViTHDPatchEmbed,
    FastViTHDRepMixerBlock,
    FastViTHDStage,
)
from fastvlm_hf.testing import randomize_non_parameter_state, with_working_weights


@pytest.fixture
def config():
    return FastViTHDConfig(**TINY_VISION_CONFIG)


@torch.no_grad()
def test_repmixer_is_its_depthwise_conv_without_residual(config):
    block = with_working_weights(FastViTHDRepMixerBlock(config, channels=8, mlp_ratio=2.0))
    x = torch.randn(2, 8, 9, 7, dtype=torch.float64)
    block.double()
    mixed = depthwise_conv_by_hand(x, block.token_mixer.reparam_conv.weight, block.token_mixer.reparam_conv.bias)
    assert torch.allclose(block.token_mixer(x), mixed, atol=1e-12)
    expected = mixed + block.layer_scale.gamma.view(1, -1, 1, 1) * conv_mlp_by_hand(block.mlp, mixed)
    assert torch.allclose(block(x), expected, atol=1e-10)


@torch.no_grad()
def test_repcpe_is_its_7x7_depthwise_conv_without_residual(config):
    stage = with_working_weights(FastViTHDStage(config, stage_index=3)).double()
    x = torch.randn(1, 64, 6, 6, dtype=torch.float64)
    conv = stage.pos_emb.reparam_conv
    assert conv.kernel_size == (7, 7) and conv.groups == 64
    assert torch.allclose(stage.pos_emb(x), depthwise_conv_by_hand(x, conv.weight, conv.bias), atol=1e-12)


@torch.no_grad()
def test_convffn_uses_batchnorm_running_statistics(config):
    mlp = with_working_weights(FastViTHDConvMlp(config, channels=8, hidden_channels=16)).double()
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    assert torch.allclose(mlp(x), conv_mlp_by_hand(mlp, x), atol=1e-10)


@torch.no_grad()
def test_channel_layer_norm_matches_biased_variance_formula():
    norm = FastViTHDLayerNorm2d(channels=6, eps=1e-5)
    with_working_weights(norm)
    x = torch.randn(3, 6, 4, 5) * 3 + 1
    expected = channel_layer_norm_by_hand(x.double(), norm.weight.double(), norm.bias.double(), 1e-5)
    assert torch.allclose(norm(x).double(), expected, atol=1e-5)



@torch.no_grad()
def test_attention_block_matches_explicit_softmax_attention():
    config = FastViTHDConfig(**{**TINY_VISION_CONFIG, "attention_head_dim": 32})
    block = with_working_weights(FastViTHDAttentionBlock(config, channels=64, mlp_ratio=2.0)).double()
    x = torch.randn(2, 64, 3, 5, dtype=torch.float64)

    mixer = block.token_mixer
    assert mixer.qkv.bias is None and mixer.num_heads == 2
    normed = channel_layer_norm_by_hand(x, block.norm.weight, block.norm.bias, config.layer_norm_eps)
    expected = x + scaled(block.layer_scale_1, attention_by_hand(mixer, normed))
    expected = expected + scaled(block.layer_scale_2, conv_mlp_by_hand(block.mlp, expected))
    assert torch.allclose(block(x), expected, atol=1e-10)


@torch.no_grad()
def test_patch_embed_is_grouped_strided_conv_with_gelu_then_pointwise_with_gelu(config):
    embed = with_working_weights(FastViTHDPatchEmbed(config, in_channels=8, out_channels=16)).double()
    x = torch.randn(1, 8, 10, 10, dtype=torch.float64)
    large = embed.proj[0].reparam_conv
    assert large.groups == 8 and large.stride == (2, 2) and large.kernel_size == (7, 7)
    # groups = in_channels with 2 outputs per group: output channel o reads input channel o // 2
    expanded = x.repeat_interleave(2, dim=1)
    y = depthwise_conv_by_hand(expanded, large.weight, large.bias)[:, :, ::2, ::2]
    y = gelu_by_hand(y)
    y = gelu_by_hand(pointwise_by_hand(y, embed.proj[1].reparam_conv.weight, embed.proj[1].reparam_conv.bias))
    assert torch.allclose(embed(x), y, atol=1e-10)


@pytest.mark.parametrize("side", [8, 24])
@torch.no_grad()
def test_squeeze_excite_pools_the_whole_map(side):
    """At 512 px the final map is 8×8 and at 1536 px 24×24: the gate must average every pixel."""
    final_conv = with_working_weights(FastViTHDConvAct(16, 32, 3, "gelu", groups=16, se_hidden_size=4)).double()
    x = torch.randn(1, 16, side, side, dtype=torch.float64)
    conv = final_conv.reparam_conv(x)
    pooled = conv.sum(dim=(2, 3), keepdim=True) / (side * side)
    se = final_conv.se
    gate = torch.sigmoid(pointwise_by_hand(torch.relu(pointwise_by_hand(pooled, se.fc1.weight, se.fc1.bias)), se.fc2.weight, se.fc2.bias))
    assert torch.allclose(final_conv(x), gelu_by_hand(conv * gate), atol=1e-10)


@pytest.mark.parametrize("side,tokens", [(512, 64), (1536, 576)])
@torch.no_grad()
def test_squeeze_excite_is_global_inside_the_encoder(config, side, tokens):
    model = with_working_weights(FastViTHDModel(config))
    captured = {}
    model.final_conv.se.register_forward_hook(lambda module, args, out: captured.update(x=args[0], out=out))
    output = model(torch.rand(1, 3, side, side))
    x = captured["x"]
    assert x.shape[-2] * x.shape[-1] == tokens
    se = model.final_conv.se
    gate = torch.sigmoid(se.fc2(torch.relu(se.fc1(x.mean(dim=(2, 3), keepdim=True)))))
    assert torch.allclose(captured["out"], x * gate, atol=1e-6)
    assert output.last_hidden_state.shape == (1, 256, side // 64, side // 64)


@pytest.mark.parametrize("side", [64, 256, 512, 768, 1536])
@torch.no_grad()
def test_any_multiple_of_64_gives_side_over_64_squared_tokens(config, side):
    model = FastViTHDModel(config).eval()
    out = model(torch.rand(1, 3, side, side), output_hidden_states=True)
    assert out.last_hidden_state.shape == (1, config.hidden_size, side // 64, side // 64)
    assert out.pooler_output.shape == (1, config.hidden_size)
    assert torch.allclose(out.pooler_output, out.last_hidden_state.mean(dim=(2, 3)))
    # stem, then one map per stage, each stage after the first halving the resolution
    assert [h.shape[1:] for h in out.hidden_states] == [
        (8, side // 4, side // 4),
        (8, side // 4, side // 4),
        (16, side // 8, side // 8),
        (32, side // 16, side // 16),
        (64, side // 32, side // 32),
        (128, side // 64, side // 64),
    ]


def test_non_square_and_non_multiple_inputs(config):
    model = FastViTHDModel(config).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 128, 320)).last_hidden_state.shape == (2, 256, 2, 5)
        with pytest.raises(ValueError, match="multiples of 64, got 100×128"):
            model(torch.rand(1, 3, 100, 128))


def test_the_input_embedding_is_the_stem(config):
    model = FastViTHDModel(config)
    assert model.get_input_embeddings() is model.stem


def test_default_config_is_fastvithd():
    config = FastViTHDConfig()
    assert config.depths == [2, 12, 24, 4, 2]
    assert config.embed_dims == [96, 192, 384, 768, 1536]
    assert config.patch_size == 64 and config.hidden_size == 3072 and config.se_hidden_size == 192
    with torch.device("meta"):
        model = FastViTHDModel(config)
    # Apple's 629 vision tensors minus the unused CLIP head, and its 122,714,208 parameters without the head.
    assert len(model.state_dict()) == 628
    assert sum(p.numel() for p in model.parameters()) == 122_714_208


@torch.no_grad()
def test_default_size_forward_at_1024():
    model = AutoModel.from_config(FastViTHDConfig()).eval()
    assert isinstance(model, FastViTHDModel)
    out = model(torch.rand(1, 3, 1024, 1024, dtype=torch.bfloat16).float())
    assert out.last_hidden_state.shape == (1, 3072, 16, 16)
    assert torch.isfinite(out.last_hidden_state).all()


def test_module_names_follow_timm_fastvit(config):
    names = set(FastViTHDModel(config).state_dict())
    for expected in [
        "stem.0.reparam_conv.weight",
        "stem.1.reparam_conv.weight",
        "stages.0.blocks.0.token_mixer.reparam_conv.weight",
        "stages.0.blocks.0.mlp.conv.conv.weight",
        "stages.0.blocks.0.mlp.conv.bn.running_var",
        "stages.0.blocks.0.mlp.fc1.weight",
        "stages.0.blocks.0.layer_scale.gamma",
        "stages.1.downsample.proj.0.reparam_conv.weight",
        "stages.1.downsample.proj.1.reparam_conv.weight",
        "stages.3.pos_emb.reparam_conv.weight",
        "stages.3.blocks.1.norm.weight",
        "stages.3.blocks.1.token_mixer.qkv.weight",
        "stages.3.blocks.1.token_mixer.proj.bias",
        "stages.3.blocks.1.layer_scale_1.gamma",
        "stages.4.blocks.0.layer_scale_2.gamma",
        "final_conv.reparam_conv.weight",
        "final_conv.se.fc1.weight",
        "final_conv.se.fc2.bias",
    ]:
        assert expected in names, expected
    assert not any("stages.0.downsample" in n or "stages.2.pos_emb" in n for n in names)


def test_config_validation():
    with pytest.raises(ValueError, match="`embed_dims` has 4 entries"):
        FastViTHDConfig(embed_dims=[1, 2, 3, 4])
    with pytest.raises(ValueError, match="Unknown token mixer"):
        FastViTHDConfig(token_mixers=["repmixer"] * 4 + ["conv"])


def test_save_and_load_round_trip(tmp_path, config):
    torch.manual_seed(0)
    model = FastViTHDModel(config).eval()
    randomize_non_parameter_state(model)
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), FastViTHDConfig)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, FastViTHDModel)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name
    pixels = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(model(pixels).last_hidden_state, reloaded(pixels).last_hidden_state)


@pytest.fixture
def eval_tower():
    return tiny_eval_tower()


@torch.no_grad()
def test_every_stage_moves_the_output(eval_tower):
    # With initialisation's std 0.02 the early stages' signal vanishes below float32 resolution, and a whole-tower
    # test then checks only the last stages; here scaling any part's output by 1.1 moves the features.
    pixel_values = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    expected = eval_tower(pixel_values).last_hidden_state
    parts = {"stem": eval_tower.stem, "final_conv": eval_tower.final_conv}
    parts.update({f"stage {index}": stage for index, stage in enumerate(eval_tower.stages)})
    for name, part in parts.items():
        handle = part.register_forward_hook(lambda module, args, output: output * 1.1)
        try:
            moved = eval_tower(pixel_values).last_hidden_state
        finally:
            handle.remove()
        assert relative_error(moved, expected) > 1e-3, name


@torch.no_grad()
def test_eval_path_matches_plain_math_in_float32(eval_tower):
    # Eval mode runs channels-last with each ConvFFN BatchNorm folded into its convolution; the reference applies
    # every operation as written, in float64. (tests/test_cpu_kernels.py: the same with the CPU routes.)
    pixel_values = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    expected = tower_by_hand(copy.deepcopy(eval_tower).double(), pixel_values.double())
    with fast_routes_off():
        assert relative_error(eval_tower(pixel_values).last_hidden_state, expected) <= 1e-5


@needs_native_bfloat16
@torch.no_grad()
def test_optimised_eval_path_in_bfloat16_stays_close(eval_tower):
    pixel_values = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    expected = tower_by_hand(copy.deepcopy(eval_tower).double(), pixel_values.double())
    actual = eval_tower.to(torch.bfloat16)(pixel_values.bfloat16()).last_hidden_state
    assert actual.dtype == torch.bfloat16
    assert relative_error(actual, expected) <= 6e-2  # bfloat16's 8-bit mantissa, through five stages (4.9 % here)


@torch.no_grad()
def test_batchnorm_folding_is_exact_and_leaves_the_weights_alone(config):
    conv_norm = with_working_weights(FastViTHDConvNorm(channels=8, kernel_size=7, eps=config.batch_norm_eps))
    published = {name: tensor.clone() for name, tensor in conv_norm.state_dict().items()}
    x = torch.randn(2, 8, 9, 9)
    plain = conv_norm.bn(conv_norm.conv(x))
    assert relative_error(conv_norm(x), plain.double()) <= 1e-6
    assert published.keys() == conv_norm.state_dict().keys()
    assert all(torch.equal(published[name], tensor) for name, tensor in conv_norm.state_dict().items())


def test_training_uses_batch_statistics_and_updates_them(config):
    conv_norm = with_working_weights(FastViTHDConvNorm(channels=8, kernel_size=7, eps=config.batch_norm_eps)).train()
    running_mean = conv_norm.bn.running_mean.clone()
    x = torch.randn(4, 8, 9, 9) * 2 + 1
    out = conv_norm(x)
    conv_out = conv_norm.conv(x)
    batch_mean = conv_out.mean(dim=(0, 2, 3))
    batch_var = conv_out.var(dim=(0, 2, 3), unbiased=False)
    expected = (conv_out - batch_mean.view(1, -1, 1, 1)) / torch.sqrt(batch_var.view(1, -1, 1, 1) + conv_norm.bn.eps)
    expected = expected * conv_norm.bn.weight.view(1, -1, 1, 1) + conv_norm.bn.bias.view(1, -1, 1, 1)
    assert torch.allclose(out, expected, atol=1e-5)
    assert not torch.allclose(conv_norm.bn.running_mean, running_mean)
    out.sum().backward()
    assert conv_norm.bn.weight.grad is not None and conv_norm.conv.weight.grad is not None


def test_train_and_eval_modes_switch_back_and_forth(eval_tower):
    pixel_values = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = eval_tower(pixel_values).last_hidden_state
        eval_tower.train()
        in_training = eval_tower(pixel_values).last_hidden_state  # batch statistics (updates the running ones)
        eval_tower.eval()
    assert not torch.allclose(in_training, before, atol=1e-4)
    with torch.no_grad():
        expected = tower_by_hand(copy.deepcopy(eval_tower).double(), pixel_values.double())
        assert relative_error(eval_tower(pixel_values).last_hidden_state, expected) <= 1e-5


def test_torch_compile_captures_the_encoder_in_one_graph(eval_tower):
    pixel_values = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    compiled = torch.compile(eval_tower, fullgraph=True, backend="eager")
    with torch.no_grad():
        compiled_features = compiled(pixel_values).last_hidden_state  # the compiler may reorder float32 sums
        assert relative_error(compiled_features, eval_tower(pixel_values).last_hidden_state) <= 1e-5


@torch.no_grad()
def test_return_dict_false_gives_the_outputs_as_a_tuple(config):
    model = FastViTHDModel(config).eval()
    pixel_values = torch.rand(1, 3, 128, 128)
    as_dict = model(pixel_values, output_hidden_states=True)
    as_tuple = model(pixel_values, output_hidden_states=True, return_dict=False)
    assert len(as_tuple) == 3 and len(as_tuple[2]) == 6
    assert torch.equal(as_tuple[0], as_dict.last_hidden_state) and torch.equal(as_tuple[1], as_dict.pooler_output)
    assert all(torch.equal(a, b) for a, b in zip(as_tuple[2], as_dict.hidden_states))
    model.config.return_dict = False
    assert len(model(pixel_values)) == 2  # no hidden states asked for: none in the tuple
    assert isinstance(model(pixel_values, return_dict=True), type(as_dict))
