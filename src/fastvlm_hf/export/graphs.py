"""The three ONNX graphs of the transformers.js/onnxruntime layout, traced from the PyTorch model with torch's
exporter (`torch.onnx.export(..., dynamo=True)`):

``vision_encoder``: `pixel_values` (batch, 3, side, side), float32 at a fixed side → `image_features` (batch,
tokens per image, text width): the encoder and the projector.
``embed_tokens``: `input_ids` (batch, sequence) → `inputs_embeds` (batch, sequence, text width).
``decoder_model_merged``: `inputs_embeds`, `attention_mask` (batch, past + sequence), `position_ids`, and
`past_key_values.N.key` / `.value` (batch, key-value heads, past, head dim) for each layer N → `logits` and
`present.N.key` / `.value`. An empty past (length 0) is the first step.

Only the batch and sequence axes are dynamic, under the names transformers.js reads: it sizes the empty first-step
cache from the decoder's input shapes, taking `batch_size` for the batch and 0 for any other named axis, so heads
and head dim must be fixed numbers.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import onnx_ir as ir
import torch
from torch import nn
from transformers import DynamicCache

from ..compat import language_model_kwargs
from ..cpu import fast_routes_off

BATCH, SEQUENCE, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"
OPSET = 18
EXTERNAL_DATA_ABOVE = 2**31 - 2**26  # protobuf caps a file at 2 GiB; this leaves room for the graph


class VisionEncoder(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values, return_dict=True).pooler_output


class EmbedTokens(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.embed_tokens = model.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


class Decoder(nn.Module):
    """The language model and its head over a cache given as flat tensors, (key, value) per layer."""

    def __init__(self, model):
        super().__init__()
        self.language_model = model.language_model
        self.lm_head = model.lm_head
        self.num_layers = model.config.text_config.num_hidden_layers

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        cache = DynamicCache()
        for layer in range(self.num_layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            return_dict=True,
            **language_model_kwargs(cache),
        )
        present = []
        for layer in range(self.num_layers):
            layer_cache = cache.layers[layer]
            present += [layer_cache.keys, layer_cache.values]
        return (self.lm_head(outputs.last_hidden_state), *present)


def cache_names(num_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{layer}.{part}" for layer in range(num_layers) for part in ("key", "value")]


def cache_shape(text_config) -> tuple[int, int]:
    """(key-value heads, head dim) of the language model's cache."""
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    return text_config.num_key_value_heads, head_dim


def export_vision_encoder(model, path: Path, side: int) -> None:
    pixel_values = torch.zeros(2, 3, side, side, dtype=model.dtype)
    _export(VisionEncoder(model), (pixel_values,), path, ["pixel_values"], ["image_features"],
            {"pixel_values": {0: BATCH}, "image_features": {0: BATCH}})  # fmt: skip


def export_embed_tokens(model, path: Path) -> None:
    input_ids = torch.zeros(2, 3, dtype=torch.long)
    _export(EmbedTokens(model), (input_ids,), path, ["input_ids"], ["inputs_embeds"],
            {"input_ids": {0: BATCH, 1: SEQUENCE}, "inputs_embeds": {0: BATCH, 1: SEQUENCE}})  # fmt: skip


def export_decoder(model, path: Path) -> None:
    text_config = model.config.text_config
    heads, head_dim = cache_shape(text_config)
    batch, sequence, past = 2, 3, 4
    inputs_embeds = torch.zeros(batch, sequence, text_config.hidden_size, dtype=model.dtype)
    attention_mask = torch.ones(batch, past + sequence, dtype=torch.long)
    position_ids = torch.arange(past, past + sequence).expand(batch, -1)
    cache = [torch.zeros(batch, heads, past, head_dim, dtype=model.dtype) for _ in range(2 * text_config.num_hidden_layers)]
    past_names = cache_names(text_config.num_hidden_layers, "past_key_values")
    present_names = cache_names(text_config.num_hidden_layers, "present")
    axes = {
        "inputs_embeds": {0: BATCH, 1: SEQUENCE},
        "attention_mask": {0: BATCH, 1: TOTAL},
        "position_ids": {0: BATCH, 1: SEQUENCE},
        "logits": {0: BATCH, 1: SEQUENCE},
        **{name: {0: BATCH, 2: PAST} for name in past_names},
        **{name: {0: BATCH, 2: TOTAL} for name in present_names},
    }
    _export(Decoder(model), (inputs_embeds, attention_mask, position_ids, *cache), path,
            ["inputs_embeds", "attention_mask", "position_ids", *past_names], ["logits", *present_names], axes, fixed_inputs=3)  # fmt: skip


def _export(module, args, path, input_names, output_names, axes, fixed_inputs: int = 1) -> None:
    shapes = [{axis: torch.export.Dim.DYNAMIC for axis in axes.get(name, {})} for name in input_names]
    if len(shapes) > fixed_inputs:  # the rest go to the `*past` of `Decoder.forward`, as one tuple
        shapes = [*shapes[: fixed_inputs], tuple(shapes[fixed_inputs:])]
    with torch.no_grad(), fast_routes_off(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module.eval(),
            tuple(args),
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=tuple(shapes),
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    model = program.model
    _name_axes(model, axes)
    save(model, path)


def save(model: ir.Model, path: Path) -> None:
    """`model` at `path`; weights past protobuf's 2 GB limit go to `<file>_data` beside it (transformers.js's name
    for external data: it loads it when `use_external_data_format` in config.json names the file)."""
    size = sum(value.const_value.nbytes for value in model.graph.initializers.values() if value.const_value is not None)
    external = f"{path.name}_data" if size > EXTERNAL_DATA_ABOVE else None
    ir.save(model, path, external_data=external)


def _name_axes(model: ir.Model, axes) -> None:
    """The dynamic axes under the names transformers.js reads, instead of the exporter's own."""
    for value in [*model.graph.inputs, *model.graph.outputs]:
        if value.name in axes:
            dims = list(value.shape)
            for axis, name in axes[value.name].items():
                dims[axis] = ir.SymbolicDim(name)
            value.shape = ir.Shape(dims)
