"""FastViTHD: each block against hand-written math, the whole encoder's shapes, layout and serialisation."""

import copy
import math

import pytest
import torch
from conftest import (
    TINY_VISION_CONFIG,
    count_calls,
    give_weights_a_working_scale,
    needs_native_bfloat16,
    randomize_non_parameter_state,
)
from transformers import AutoConfig, AutoModel

from fastvlm_hf import FastViTHDConfig, FastViTHDModel
from fastvlm_hf.cpu import fast_routes_enabled, fast_routes_off, kernels
from fastvlm_hf.cpu import settings as cpu_settings
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
from fastvlm_hf.testing import with_working_weights


def depthwise_conv_by_hand(x, weight, bias):
    """Same-padded depthwise cross-correlation as an explicit sum of shifted, weighted copies."""
    channels, _, kernel, _ = weight.shape
    pad = kernel // 2
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    height, width = x.shape[-2:]
    out = torch.zeros_like(x)
    for dy in range(kernel):
        for dx in range(kernel):
            out += padded[:, :, dy : dy + height, dx : dx + width] * weight[:, 0, dy, dx].view(1, channels, 1, 1)
    return out + bias.view(1, channels, 1, 1)


def pointwise_by_hand(x, weight, bias):
    return torch.einsum("oc,bchw->bohw", weight[:, :, 0, 0], x) + bias.view(1, -1, 1, 1)


def gelu_by_hand(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def channel_layer_norm_by_hand(x, weight, bias, eps):
    mean = x.mean(dim=1, keepdim=True)
    biased_variance = ((x - mean) ** 2).sum(dim=1, keepdim=True) / x.shape[1]
    return (x - mean) / torch.sqrt(biased_variance + eps) * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


def conv_mlp_by_hand(mlp, x):
    bn = mlp.conv.bn
    y = depthwise_conv_by_hand(x, mlp.conv.conv.weight, torch.zeros(x.shape[1], dtype=x.dtype))
    y = (y - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps)
    y = y * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    y = gelu_by_hand(pointwise_by_hand(y, mlp.fc1.weight, mlp.fc1.bias))
    return pointwise_by_hand(y, mlp.fc2.weight, mlp.fc2.bias)


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


def attention_by_hand(mixer, x):
    """Multi-head softmax(q·kᵀ/√d)·v over the pixels of a (B, C, H, W) map, then the output projection."""
    channels, head_dim = x.shape[1], mixer.head_dim
    tokens = x.flatten(2).transpose(1, 2)  # (B, N, C), row-major
    q, k, v = (tokens @ mixer.qkv.weight.T).split(channels, dim=-1)
    heads = []
    for h in range(channels // head_dim):  # channels [d·h, d·h + d) belong to head h
        qh, kh, vh = (t[..., head_dim * h : head_dim * (h + 1)] for t in (q, k, v))
        weights = torch.softmax((qh * head_dim**-0.5) @ kh.transpose(1, 2), dim=-1)
        heads.append(weights @ vh)
    attended = torch.cat(heads, dim=-1) @ mixer.proj.weight.T + mixer.proj.bias
    return attended.transpose(1, 2).reshape_as(x)


def scaled(layer_scale, x):
    return layer_scale.gamma.view(1, -1, 1, 1) * x


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


def conv_act_by_hand(block, x):
    """`FastViTHDConvAct` written out: convolution, optional squeeze-excite, GELU."""
    conv = block.reparam_conv
    x = torch.nn.functional.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, groups=conv.groups)
    if not isinstance(block.se, torch.nn.Identity):
        gate = pointwise_by_hand(x.mean(dim=(2, 3), keepdim=True), block.se.fc1.weight, block.se.fc1.bias)
        x = x * torch.sigmoid(pointwise_by_hand(torch.relu(gate), block.se.fc2.weight, block.se.fc2.bias))
    return gelu_by_hand(x)


def tower_by_hand(model, pixel_values):
    """The whole encoder in plain NCHW math, with every BatchNorm applied on its own after its convolution."""
    x = pixel_values
    for block in model.stem:
        x = conv_act_by_hand(block, x)
    for stage in model.stages:
        if not isinstance(stage.downsample, torch.nn.Identity):
            for block in stage.downsample.proj:
                x = conv_act_by_hand(block, x)
        if not isinstance(stage.pos_emb, torch.nn.Identity):
            x = depthwise_conv_by_hand(x, stage.pos_emb.reparam_conv.weight, stage.pos_emb.reparam_conv.bias)
        for block in stage.blocks:
            if isinstance(block, FastViTHDRepMixerBlock):
                x = depthwise_conv_by_hand(x, block.token_mixer.reparam_conv.weight, block.token_mixer.reparam_conv.bias)
                x = x + scaled(block.layer_scale, conv_mlp_by_hand(block.mlp, x))
            else:
                normed = channel_layer_norm_by_hand(x, block.norm.weight, block.norm.bias, block.norm.eps)
                x = x + scaled(block.layer_scale_1, attention_by_hand(block.token_mixer, normed))
                x = x + scaled(block.layer_scale_2, conv_mlp_by_hand(block.mlp, x))
    return conv_act_by_hand(model.final_conv, x)


def relative_error(actual, expected):
    return float((actual.double() - expected).norm() / expected.norm())


@pytest.fixture
def eval_tower(config):
    """A tiny tower in which every stage shapes the output (`test_every_stage_moves_the_output` shows it)."""
    torch.manual_seed(0)
    model = FastViTHDModel(config)
    randomize_non_parameter_state(model)
    give_weights_a_working_scale(model)
    return model.eval()


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


@pytest.fixture(params=["whole maps", "pixel chunks and row bands"])
def chunking(request, monkeypatch):
    """Runs a test twice: with the work split as the encoder picks at this size (maps too small for chunking; the last
    two stages, with fewer pixels than channels, run their ConvFFNs as linear layers over all pixels), and with
    every ConvFFN's pointwise layers in chunks of 4736 bytes of float32 hidden activations (37 pixels in the first
    stage, 18, 9, 4 and 2 in the wider later ones; each map's last chunk shorter) and the stem in bands of 3 output
    rows (the first layer's output in 7-row bands for a batch of 2 at 128 px; the last band shorter)."""
    if request.param == "pixel chunks and row bands":
        monkeypatch.setattr(cpu_settings, "convffn_chunking_min_bytes", 0)
        monkeypatch.setattr(cpu_settings, "convffn_chunk_bytes", 37 * 4 * 32)
        monkeypatch.setattr(cpu_settings, "stem_banding_min_bytes", 0)
        monkeypatch.setattr(cpu_settings, "stem_band_bytes", 7 * 2 * 8 * 64 * 4)
    return request.param


@torch.no_grad()
def test_optimised_eval_path_matches_plain_math_in_float32(eval_tower, chunking):
    # Eval mode runs channels-last with each ConvFFN BatchNorm folded into its convolution; the reference
    # applies every operation as written, in float64.
    pixel_values = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    expected = tower_by_hand(copy.deepcopy(eval_tower).double(), pixel_values.double())
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


def test_inference_kernels_match_the_differentiable_path(eval_tower):
    # Without gradients, convolutions and their activations on large maps run as one fused CPU kernel; with them, as
    # two modules. At 256 px the first stage's maps (64×64) are large enough.
    pixel_values = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(4))
    mlp = eval_tower.stages[0].blocks[0].mlp
    first_stage_map = torch.empty(2, eval_tower.config.embed_dims[0], 64, 64)
    with torch.no_grad():
        assert kernels._onednn_can_fuse(mlp.fc1, mlp.act, first_stage_map)
        fused = eval_tower(pixel_values).last_hidden_state
    assert not kernels._onednn_can_fuse(mlp.fc1, mlp.act, first_stage_map)
    plain = eval_tower(pixel_values).last_hidden_state
    assert plain.requires_grad
    assert relative_error(fused, plain.detach().double()) <= 1e-6


@torch.no_grad()
def test_one_switch_turns_every_fast_route_off(eval_tower, monkeypatch, onednn_calls):
    monkeypatch.setattr(cpu_settings, "convffn_chunking_min_bytes", 0)  # every ConvFFN over chunks of pixels
    monkeypatch.setattr(cpu_settings, "stem_banding_min_bytes", 0)  # the stem over bands of rows
    routes = count_calls(monkeypatch, kernels, ["_repeat_each_channel", "_stem_rows"])
    pixel_values = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(6))  # fused convolutions too
    fast = eval_tower(pixel_values).last_hidden_state
    assert set(routes) == {"_repeat_each_channel", "_stem_rows"}
    assert set(onednn_calls) == {"_convolution_pointwise", "_linear_pointwise"}
    routes.clear()
    onednn_calls.clear()
    with fast_routes_off():
        plain = eval_tower(pixel_values).last_hidden_state
    assert fast_routes_enabled()
    assert not routes and not onednn_calls
    with torch.enable_grad():  # the differentiable path: the blocks as written, no route
        assert torch.equal(plain, eval_tower(pixel_values).last_hidden_state)
    assert relative_error(fast, plain.double()) <= 1e-6


@torch.no_grad()
def test_convffn_runs_its_pointwise_layers_in_chunks_on_large_maps(config, monkeypatch):
    mlp = with_working_weights(FastViTHDConvMlp(config, channels=8, hidden_channels=32))
    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=torch.channels_last)
    assert kernels._convffn_chunk_pixels(mlp.fc1, mlp.act, x) is None  # 20 KiB of hidden activations: all at once
    monkeypatch.setattr(cpu_settings, "convffn_chunking_min_bytes", 0)
    monkeypatch.setattr(cpu_settings, "convffn_chunk_bytes", 37 * 4 * 32)
    assert kernels._convffn_chunk_pixels(mlp.fc1, mlp.act, x) == 37  # 162 pixels: 4 chunks of 37, then 14
    assert kernels._convffn_chunk_pixels(mlp.fc1, mlp.act, x.contiguous()) is None  # NCHW maps keep their layout
    chunked = mlp(x)
    expected = conv_mlp_by_hand(copy.deepcopy(mlp).double(), x.double())
    assert chunked.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(chunked, expected) <= 1e-6
    assert relative_error(mlp.bfloat16()(x.bfloat16()), expected) <= 2e-2
    with torch.enable_grad():
        assert kernels._convffn_chunk_pixels(mlp.fc1, mlp.act, x) is None  # training runs the modules


@torch.no_grad()
def test_convffn_runs_its_pointwise_layers_as_linear_layers_on_maps_with_few_pixels(config):
    mlp = with_working_weights(FastViTHDConvMlp(config, channels=8, hidden_channels=32))
    x = torch.randn(2, 8, 2, 2).contiguous(memory_format=torch.channels_last)  # 8 pixels, 8 channels
    assert kernels._convffn_chunk_pixels(mlp.fc1, mlp.act, x) == 8  # one chunk: every pixel
    nine_pixels = torch.randn(1, 8, 3, 3).contiguous(memory_format=torch.channels_last)
    assert kernels._convffn_chunk_pixels(mlp.fc1, mlp.act, nine_pixels) is None  # more pixels than channels: convs
    expected = conv_mlp_by_hand(copy.deepcopy(mlp).double(), x.double())
    as_linear = mlp(x)
    assert as_linear.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(as_linear, expected) <= 1e-6
    assert relative_error(mlp.bfloat16()(x.bfloat16()), expected) <= 2e-2


@pytest.mark.parametrize("first_layer_band_rows", [0, 10, 10**6])  # stem bands of 1 row, 5 rows, the whole map
@pytest.mark.parametrize("fused", [True, False], ids=["fused kernels", "modules"])
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_native_bfloat16)])
def test_stem_in_row_bands_matches_the_whole_map(eval_tower, monkeypatch, first_layer_band_rows, fused, dtype):
    # A 48×96 image: the first layer's output is 24 rows of 48 pixels of 8 channels, the stem's 12 rows.
    first_layer_row_bytes = 8 * 48 * dtype.itemsize
    monkeypatch.setattr(cpu_settings, "stem_banding_min_bytes", 0)
    monkeypatch.setattr(cpu_settings, "stem_band_bytes", first_layer_band_rows * first_layer_row_bytes)
    monkeypatch.setattr(cpu_settings, "onednn_fusion_min_pixels", 0 if fused else math.inf)
    pixel_values = torch.rand(1, 3, 48, 96, generator=torch.Generator().manual_seed(5))
    pixel_values = pixel_values.contiguous(memory_format=torch.channels_last).to(dtype)
    expected = pixel_values.double()
    with torch.no_grad():
        for layer in copy.deepcopy(eval_tower.stem).double():
            expected = conv_act_by_hand(layer, expected)
    stem = eval_tower.stem.to(dtype)
    with torch.no_grad():
        assert kernels._band_rows(stem, pixel_values, [48, 24, 12]) == max(1, first_layer_band_rows // 2)
        banded = stem(pixel_values)
    assert banded.shape == expected.shape
    assert banded.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(banded, expected) <= (1e-6 if dtype == torch.float32 else 1e-2)


def test_stem_runs_on_the_whole_map_with_autograd_or_nchw_input(eval_tower, monkeypatch):
    monkeypatch.setattr(cpu_settings, "stem_banding_min_bytes", 0)
    heights = [48, 24, 12]
    pixel_values = torch.rand(1, 3, 48, 48).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert kernels._band_rows(eval_tower.stem, pixel_values, heights) is not None
        assert kernels._band_rows(eval_tower.stem, pixel_values.contiguous(), heights) is None  # NCHW
    assert kernels._band_rows(eval_tower.stem, pixel_values, heights) is None  # autograd
    monkeypatch.setattr(cpu_settings, "stem_banding_min_bytes", 2**20)
    with torch.no_grad():
        assert kernels._band_rows(eval_tower.stem, pixel_values, heights) is None  # a small first-layer map (18 KiB)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_native_bfloat16)])
def test_channel_multiplier_convolution_runs_as_depthwise_over_repeated_channels(config, dtype):
    embed = with_working_weights(FastViTHDPatchEmbed(config, in_channels=8, out_channels=16))
    large = embed.proj[0]
    x = torch.randn(2, 8, 20, 20).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = conv_act_by_hand(copy.deepcopy(large).double(), x.double())  # grouped: 2 outputs per input channel
    large = large.to(dtype)
    with torch.no_grad():
        assert kernels._can_run_as_depthwise(large.reparam_conv, x.to(dtype))
        assert not kernels._can_run_as_depthwise(large.reparam_conv, x.to(dtype).contiguous())  # NCHW
        depthwise = large(x.to(dtype))
    assert depthwise.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(depthwise, expected) <= (1e-6 if dtype == torch.float32 else 1e-2)
    assert not kernels._can_run_as_depthwise(large.reparam_conv, x.to(dtype))  # with autograd: grouped
    assert relative_error(large(x.to(dtype)).detach(), expected) <= (1e-6 if dtype == torch.float32 else 1e-2)


def test_repeat_each_channel_keeps_channel_order_and_layout():
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2).contiguous(memory_format=torch.channels_last)
    repeated = kernels._repeat_each_channel(x, 3)
    assert torch.equal(repeated, x.repeat_interleave(3, dim=1))
    assert repeated.is_contiguous(memory_format=torch.channels_last)
