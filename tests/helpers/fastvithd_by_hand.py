"""FastViTHD written out by hand: each block's math as explicit tensor operations, to test the modules against."""

import math

import torch
from helpers.tiny_model import TINY_VISION_CONFIG

from fastvlm_hf import FastViTHDConfig, FastViTHDModel
from fastvlm_hf.modeling_fastvithd import FastViTHDRepMixerBlock
from fastvlm_hf.testing import (
    give_weights_a_working_scale,
    randomize_non_parameter_state,
)


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



def tiny_eval_tower() -> FastViTHDModel:
    """A tiny tower in which every stage shapes the output (`test_every_stage_moves_the_output` shows it)."""
    torch.manual_seed(0)
    model = FastViTHDModel(FastViTHDConfig(**TINY_VISION_CONFIG))
    randomize_non_parameter_state(model)
    give_weights_a_working_scale(model)
    return model.eval()
