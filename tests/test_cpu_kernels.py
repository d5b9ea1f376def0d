"""The CPU routes of FastViTHD's blocks (`fastvlm_hf.cpu.kernels`, put on the blocks by `fastvlm_hf.cpu.routes`): each
is taken where its rule says, not taken inside `fast_routes_off()` or with autograd, and gives the plain result."""

import collections
import copy
import io
import math

import pytest
import torch
from helpers.fastvithd_by_hand import (
    conv_act_by_hand,
    conv_mlp_by_hand,
    relative_error,
    tiny_eval_tower,
    tower_by_hand,
)
from helpers.markers import needs_native_bfloat16
from helpers.tiny_model import TINY_VISION_CONFIG

from fastvlm_hf import FastViTHDConfig
from fastvlm_hf.cpu import fast_routes_enabled, fast_routes_off, kernels
from fastvlm_hf.cpu import settings as cpu_settings
from fastvlm_hf.cpu.routes import RoutedForward, install_cpu_routes, remove_cpu_routes
from fastvlm_hf.modeling_fastvithd import (
    FastViTHDConvAct,
    FastViTHDConvMlp,
    FastViTHDPatchEmbed,
)
from fastvlm_hf.testing import with_working_weights

ROUTES = ["conv_act", "pointwise_layers", "stem_in_row_bands"]


@pytest.fixture
def config():
    return FastViTHDConfig(**TINY_VISION_CONFIG)


@pytest.fixture
def eval_tower():
    return tiny_eval_tower()


@pytest.fixture
def routes_taken(monkeypatch):
    """How often each route of `kernels` was taken (gave a result instead of None), by name."""
    taken = collections.Counter()
    for name in ROUTES:

        def counted(*args, _name=name, _route=getattr(kernels, name)):
            result = _route(*args)
            taken[_name] += result is not None
            return result

        monkeypatch.setattr(kernels, name, counted)
    return taken


@pytest.fixture
def convolutions(monkeypatch):
    """The convolutions run, plain (`F.conv2d`) or fused with their activation (oneDNN), counted together."""
    calls = collections.Counter()
    for owner, name in [(torch.nn.functional, "conv2d"), (torch.ops.mkldnn, "_convolution_pointwise")]:

        def counted(*args, _function=getattr(owner, name), **kwargs):
            calls["convolutions"] += 1
            return _function(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)
    return calls


def routed(module, hidden_act="gelu"):
    install_cpu_routes(module, hidden_act)
    return module


# ----------------------------------------------------------------------------------------------------------------------
# Where the routes sit


def test_the_encoder_routes_its_stem_convffns_and_convolution_blocks_without_squeeze_excite(eval_tower):
    routed_blocks = {name for name, module in eval_tower.named_modules() if "forward" in module.__dict__}
    assert "stem" in routed_blocks and "stem.0" in routed_blocks
    assert "stages.0.blocks.0.mlp" in routed_blocks and "stages.1.downsample.proj.0" in routed_blocks
    assert "final_conv" not in routed_blocks  # a squeeze-excite between its convolution and its activation
    assert not any(name.endswith(("token_mixer", "mlp.conv", "fc1")) for name in routed_blocks)
    for name in routed_blocks:
        forward = eval_tower.get_submodule(name).forward
        assert isinstance(forward, RoutedForward) and forward.module is eval_tower.get_submodule(name)


def test_routes_follow_a_copy_of_the_encoder(eval_tower):
    for copied in (copy.deepcopy(eval_tower), torch.load(_saved(eval_tower), weights_only=False)):
        assert copied.stem.forward.module is copied.stem
        assert copied.stages[0].blocks[0].mlp.forward.module is copied.stages[0].blocks[0].mlp
        pixel_values = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            assert torch.equal(copied(pixel_values).last_hidden_state, eval_tower(pixel_values).last_hidden_state)


def _saved(module):
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return buffer


def test_removed_routes_leave_the_blocks_their_own_forwards(eval_tower):
    remove_cpu_routes(eval_tower)
    assert not any("forward" in module.__dict__ for module in eval_tower.modules())
    eval_tower.float()  # moving or casting the encoder on the CPU installs them again
    assert isinstance(eval_tower.stem.forward, RoutedForward)


# ----------------------------------------------------------------------------------------------------------------------
# The whole encoder


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
def test_optimised_eval_path_matches_plain_math_in_float32(eval_tower, chunking, routes_taken):
    # The reference applies every operation as written, in float64.
    pixel_values = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    expected = tower_by_hand(copy.deepcopy(eval_tower).double(), pixel_values.double())
    assert relative_error(eval_tower(pixel_values).last_hidden_state, expected) <= 1e-5
    assert routes_taken["pointwise_layers"] > 0  # linear layers on the last stages' maps, or chunks everywhere
    assert routes_taken["stem_in_row_bands"] == (chunking == "pixel chunks and row bands")


def test_inference_kernels_match_the_differentiable_path(eval_tower, onednn_calls):
    # Without gradients, convolutions and their activations on large maps run as one fused CPU kernel; with them, as
    # two modules. At 256 px the first stage's maps (64×64) are large enough.
    pixel_values = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        fused = eval_tower(pixel_values).last_hidden_state
    assert onednn_calls["_convolution_pointwise"] > 0
    onednn_calls.clear()
    plain = eval_tower(pixel_values).last_hidden_state
    assert plain.requires_grad and not onednn_calls
    assert relative_error(fused, plain.detach().double()) <= 1e-6


@torch.no_grad()
def test_one_switch_turns_every_fast_route_off(eval_tower, monkeypatch, onednn_calls, routes_taken):
    monkeypatch.setattr(cpu_settings, "convffn_chunking_min_bytes", 0)  # every ConvFFN over chunks of pixels
    monkeypatch.setattr(cpu_settings, "stem_banding_min_bytes", 0)  # the stem over bands of rows
    pixel_values = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(6))  # fused convolutions too
    fast = eval_tower(pixel_values).last_hidden_state
    assert set(routes_taken) == set(ROUTES) and all(routes_taken.values())
    assert set(onednn_calls) == {"_convolution_pointwise", "_linear_pointwise"}
    routes_taken.clear()
    onednn_calls.clear()
    with fast_routes_off():
        plain = eval_tower(pixel_values).last_hidden_state
    assert fast_routes_enabled()
    assert not any(routes_taken.values()) and not onednn_calls
    with torch.enable_grad():  # the differentiable path: the blocks as written, no route
        assert torch.equal(plain, eval_tower(pixel_values).last_hidden_state)
    remove_cpu_routes(eval_tower)  # the blocks' own forwards
    assert torch.equal(plain, eval_tower(pixel_values).last_hidden_state)
    assert relative_error(fast, plain.double()) <= 1e-6


# ----------------------------------------------------------------------------------------------------------------------
# ConvFFN pointwise layers


@torch.no_grad()
def test_convffn_runs_its_pointwise_layers_in_chunks_on_large_maps(config, monkeypatch, onednn_calls, routes_taken):
    mlp = routed(with_working_weights(FastViTHDConvMlp(config, channels=8, hidden_channels=32)))
    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=torch.channels_last)  # 162 pixels
    expected = conv_mlp_by_hand(copy.deepcopy(mlp).double(), x.double())
    mlp(x)  # 20 KiB of hidden activations: not chunked (more pixels than channels: convolutions)
    assert not routes_taken["pointwise_layers"] and not onednn_calls
    monkeypatch.setattr(cpu_settings, "convffn_chunking_min_bytes", 0)
    monkeypatch.setattr(cpu_settings, "convffn_chunk_bytes", 37 * 4 * 32)
    chunked = mlp(x)
    assert routes_taken["pointwise_layers"] == 1
    assert onednn_calls["_linear_pointwise"] == 2 * 5  # fc1 and fc2 on 4 chunks of 37 pixels, then 14
    assert chunked.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(chunked, expected) <= 1e-6
    onednn_calls.clear()
    mlp(x.contiguous())  # NCHW maps keep their layout
    assert not onednn_calls
    with torch.enable_grad():
        assert relative_error(mlp(x).detach(), expected) <= 1e-6  # training runs the modules
    assert not onednn_calls
    assert relative_error(mlp.bfloat16()(x.bfloat16()), expected) <= 2e-2


@torch.no_grad()
def test_convffn_runs_its_pointwise_layers_as_linear_layers_on_maps_with_few_pixels(config, onednn_calls):
    mlp = routed(with_working_weights(FastViTHDConvMlp(config, channels=8, hidden_channels=32)))
    x = torch.randn(2, 8, 2, 2).contiguous(memory_format=torch.channels_last)  # 8 pixels, 8 channels
    expected = conv_mlp_by_hand(copy.deepcopy(mlp).double(), x.double())
    as_linear = mlp(x)
    assert onednn_calls["_linear_pointwise"] == 2  # one chunk: every pixel
    assert as_linear.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(as_linear, expected) <= 1e-6
    onednn_calls.clear()
    mlp(torch.randn(1, 8, 3, 3).contiguous(memory_format=torch.channels_last))  # more pixels than channels: convs
    assert not onednn_calls
    assert relative_error(mlp.bfloat16()(x.bfloat16()), expected) <= 2e-2


# ----------------------------------------------------------------------------------------------------------------------
# The stem in row bands


@pytest.mark.parametrize("first_layer_band_rows", [0, 10, 10**6])  # stem bands of 1 row, 5 rows, the whole map
@pytest.mark.parametrize("fused", [True, False], ids=["fused kernels", "modules"])
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_native_bfloat16)])
def test_stem_in_row_bands_matches_the_whole_map(
    eval_tower, monkeypatch, convolutions, routes_taken, first_layer_band_rows, fused, dtype
):
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
    convolutions.clear()
    with torch.no_grad():
        banded = stem(pixel_values)
    assert routes_taken["stem_in_row_bands"] == 1
    band_rows = max(1, first_layer_band_rows // 2)
    assert convolutions["convolutions"] == 3 * math.ceil(12 / band_rows)  # three layers per band
    assert banded.shape == expected.shape
    assert banded.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(banded, expected) <= (1e-6 if dtype == torch.float32 else 1e-2)


def test_stem_runs_on_the_whole_map_with_autograd_or_nchw_input(eval_tower, monkeypatch):
    monkeypatch.setattr(cpu_settings, "stem_banding_min_bytes", 0)
    gelu = kernels.onednn_post_op("gelu")
    pixel_values = torch.rand(1, 3, 48, 48).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert kernels.stem_in_row_bands(eval_tower.stem, gelu, pixel_values) is not None
        assert kernels.stem_in_row_bands(eval_tower.stem, gelu, pixel_values.contiguous()) is None  # NCHW
    assert kernels.stem_in_row_bands(eval_tower.stem, gelu, pixel_values) is None  # autograd
    monkeypatch.setattr(cpu_settings, "stem_banding_min_bytes", 2**20)
    with torch.no_grad():  # a small first-layer map (18 KiB)
        assert kernels.stem_in_row_bands(eval_tower.stem, gelu, pixel_values) is None


# ----------------------------------------------------------------------------------------------------------------------
# Convolutions with a channel multiplier


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_native_bfloat16)])
def test_channel_multiplier_convolution_runs_as_depthwise_over_repeated_channels(config, monkeypatch, dtype):
    monkeypatch.setattr(cpu_settings, "onednn_fusion_min_pixels", math.inf)  # the depthwise route alone
    embed = routed(with_working_weights(FastViTHDPatchEmbed(config, in_channels=8, out_channels=16)))
    large = embed.proj[0]
    x = torch.randn(2, 8, 20, 20).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = conv_act_by_hand(copy.deepcopy(large).double(), x.double())  # grouped: 2 outputs per input channel
    large = large.to(dtype)
    conv, gelu = large.reparam_conv, kernels.onednn_post_op("gelu")
    groups = _groups_of_convolutions(monkeypatch)
    with torch.no_grad():
        assert kernels.conv_act(conv, large.act, gelu, x.to(dtype).contiguous()) is None  # NCHW
        depthwise = large(x.to(dtype))
    assert groups == [16]  # one depthwise convolution: a group per output channel
    assert depthwise.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(depthwise, expected) <= (1e-6 if dtype == torch.float32 else 1e-2)
    groups.clear()
    grouped = large(x.to(dtype))  # with autograd: grouped, by the module
    assert groups == [8]
    assert relative_error(grouped.detach(), expected) <= (1e-6 if dtype == torch.float32 else 1e-2)


def _groups_of_convolutions(monkeypatch) -> list[int]:
    """The `groups` of every `F.conv2d` call from now on."""
    groups, conv2d = [], torch.nn.functional.conv2d

    def recorded(input, weight, bias=None, stride=1, padding=0, dilation=1, groups_=1):
        groups.append(groups_)
        return conv2d(input, weight, bias, stride, padding, dilation, groups_)

    monkeypatch.setattr(torch.nn.functional, "conv2d", recorded)
    return groups


@torch.no_grad()
def test_a_convolution_block_with_squeeze_excite_takes_no_route(routes_taken, monkeypatch, onednn_calls):
    monkeypatch.setattr(cpu_settings, "onednn_fusion_min_pixels", 0)
    final_conv = routed(with_working_weights(FastViTHDConvAct(16, 32, 3, "gelu", groups=16, se_hidden_size=4)))
    x = torch.randn(1, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    out = final_conv(x)
    assert not routes_taken and not onednn_calls
    assert relative_error(out, conv_act_by_hand(copy.deepcopy(final_conv).double(), x.double())) <= 1e-6


@torch.no_grad()
def test_an_activation_onednn_cannot_fuse_keeps_its_module(config, monkeypatch, onednn_calls):
    monkeypatch.setattr(cpu_settings, "onednn_fusion_min_pixels", 0)
    block = routed(with_working_weights(FastViTHDConvAct(8, 8, 1, "silu")), hidden_act="silu")
    x = torch.randn(1, 8, 8, 8).contiguous(memory_format=torch.channels_last)
    conv = block.reparam_conv
    expected = torch.nn.functional.silu(torch.nn.functional.conv2d(x, conv.weight, conv.bias))
    assert torch.equal(block(x), expected) and not onednn_calls
