"""The lower-precision graphs, each made from the float32 one by onnxruntime's own tools:

``fp16``: `onnxruntime.transformers.float16` converts weights and compute to float16; the vision graph keeps its
float32 `pixel_values` (transformers.js always feeds float32 pixels) and, like the other two, returns float16, so
that image features and token embeddings have the one dtype transformers.js copies between them.
``q8``: `onnxruntime.quantization.quantize_dynamic`: 8-bit weights for the matrix products and the embedding table,
activations quantized on the fly.
``q4``: `MatMulNBitsQuantizer`: 4-bit weights in blocks of `Q4_BLOCK_SIZE` for the matrix products (`MatMulNBits`)
and the embedding table (`GatherBlockQuantized`); the rest (the vision tower's convolutions) stays float32.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.transformers.float16 import convert_float_to_float16

from .graphs import save

Q4_BLOCK_SIZE = 32
Q4_AXES = (("MatMul", 0), ("Gather", 1))  # blocks along the input features, and along each embedding row
Q8_OPS = ["MatMul", "Gather"]
FLOAT32_INPUTS = {"pixel_values"}


def write_variant(fp32_path: Path, path: Path, dtype: str) -> None:
    """The graph at `fp32_path` in `dtype` ("fp16", "q8" or "q4"), written at `path`."""
    writers = {"fp16": _fp16, "q8": _q8, "q4": _q4}
    with _quiet_root_logger():
        model = writers[dtype](fp32_path)
    save(model, path)


@contextlib.contextmanager
def _quiet_root_logger():
    """onnxruntime's quantizers log through the root logger, a line per node, and one of them sets the root logger
    to INFO when imported: errors only while they run, and the root logger as it was afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def _fp16(fp32_path: Path) -> ir.Model:
    proto = onnx.load(fp32_path)
    keep_float32 = [value.name for value in proto.graph.input if value.name in FLOAT32_INPUTS]
    proto = convert_float_to_float16(proto, keep_io_types=bool(keep_float32), disable_shape_infer=True)
    model = ir.from_proto(proto)
    if keep_float32:  # float32 in, and back to float16 out
        for output in list(model.graph.outputs):
            cast = ir.node("Cast", [output], attributes={"to": ir.DataType.FLOAT16})
            model.graph.append(cast)
            result = cast.outputs[0]
            result.dtype, result.shape = ir.DataType.FLOAT16, output.shape
            name = output.name
            output.name = f"{name}_float32"
            result.name = name
            model.graph.outputs[model.graph.outputs.index(output)] = result
    return model


def _q8(fp32_path: Path) -> ir.Model:
    with tempfile.TemporaryDirectory() as scratch:
        quantized = Path(scratch) / "model.onnx"
        quantize_dynamic(fp32_path, quantized, op_types_to_quantize=Q8_OPS, weight_type=QuantType.QUInt8,
                         use_external_data_format=True)  # fmt: skip
        return ir.from_proto(onnx.load(quantized))  # read in full before the scratch folder goes


def _q4(fp32_path: Path) -> ir.Model:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(str(fp32_path), bits=4, block_size=Q4_BLOCK_SIZE, is_symmetric=True,
                                     op_types_to_quantize=("MatMul", "Gather"), quant_axes=Q4_AXES)  # fmt: skip
    quiet = logging.getLogger(MatMulNBitsQuantizer.__module__)  # its own logger, at INFO
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        quantizer.process()
    finally:
        quiet.setLevel(level)
    return ir.from_proto(quantizer.model.model)
