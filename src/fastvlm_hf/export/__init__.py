"""Export a FastVLM checkpoint of any layout to ONNX, in the folder layout transformers.js and onnxruntime read
(see `layout`): three graphs (`graphs`), in float32 and in the lower precisions asked for (`variants`), checked with
onnxruntime against PyTorch (`verify`, running `runtime`).

    fastvlm-hf export apple/FastVLM-0.5B FastVLM-0.5B-ONNX --dtype fp32,q4 --verify

The output folder appears only once complete (and verified, with `verify`), as `fastvlm-hf convert` writes its own.
Needs the `onnx` extra: `pip install "fastvlm-hf[onnx]"`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import model_card
from ..cli.messages import first_line
from ..conversion import load_model
from ..output_folder import check_output, complete_or_nothing
from ..processing_fastvlm import FastVLMProcessor
from . import graphs, layout, variants
from .verify import verify_export

DTYPES = tuple(layout.SUFFIXES)


class ExportError(RuntimeError):
    """An export that cannot be done or did not come out right; the message says why and what to do."""


def export(
    source: str,
    output: str | Path,
    dtypes: list[str] | tuple[str, ...] = ("fp32",),
    resolution: int | None = None,
    *,
    verify: bool = False,
    overwrite: bool = False,
    local_files_only: bool = False,
):
    """Loads `source` (any FastVLM layout) and writes its ONNX export to `output` in each of `dtypes` (of `DTYPES`),
    the vision graph at `resolution` pixels a side (default: the checkpoint's). With `verify`, returns the
    `verify.Verification` of the float32 graphs, which must pass before `output` appears."""
    dtypes = list(dict.fromkeys(dtypes))
    unknown = [dtype for dtype in dtypes if dtype not in DTYPES]
    if unknown or not dtypes:
        raise ExportError(f"Unknown dtype {', '.join(map(repr, unknown)) or 'list (empty)'}: choose from "
                          f"{', '.join(DTYPES)}.")  # fmt: skip
    output = Path(output)
    check_output(source, output, overwrite, error=ExportError, what="export")
    model = load_model(source, torch.float32, local_files_only=local_files_only).eval()
    refuse_unexportable(model, source)
    processor = FastVLMProcessor.from_pretrained(source, local_files_only=local_files_only)
    side = resolution or processor.image_processor.size["height"]
    patch_size = model.config.vision_config.patch_size
    if side % patch_size:
        raise ExportError(f"--resolution {side} is not a multiple of the vision tower's stride, {patch_size}.")
    if side != processor.image_processor.size["height"]:
        processor.image_processor.size = {"height": side, "width": side}
    with complete_or_nothing(output) as folder:
        onnx_folder = folder / layout.ONNX_FOLDER
        onnx_folder.mkdir()
        fp32 = {name: onnx_folder / layout.graph_file(name, "fp32") for name in layout.GRAPHS}
        try:
            graphs.export_vision_encoder(model, fp32["vision_encoder"], side)
            graphs.export_embed_tokens(model, fp32["embed_tokens"])
            graphs.export_decoder(model, fp32["decoder_model_merged"])
        except Exception as error:  # torch.export's own errors vary by release
            raise ExportError(f"torch's ONNX exporter cannot trace {source}: {first_line(error)}") from error
        for dtype in dtypes:
            if dtype != "fp32":
                for name in layout.GRAPHS:
                    variants.write_variant(fp32[name], onnx_folder / layout.graph_file(name, dtype), dtype)
        result = None
        if verify:
            result = verify_export(model, processor, folder)
        if "fp32" not in dtypes:
            for path in fp32.values():
                for file in (path, path.with_name(f"{path.name}_data")):
                    file.unlink(missing_ok=True)
        external = sorted(path.name.removesuffix("_data") for path in onnx_folder.glob("*.onnx_data"))
        layout.write_configs(folder, model, processor, side, dtypes[0], external)
        card = model_card.render_onnx(model.config, repo_id=output.resolve().name, source=source, side=side,
                                      files=layout.files_by_dtype(onnx_folder, dtypes), default_dtype=dtypes[0])  # fmt: skip
        (folder / "README.md").write_text(card, encoding="utf-8")
    return result


def refuse_unexportable(model, source: str) -> None:
    """Packed (`pack_weights`) or quantized (bitsandbytes) weights have no plain ONNX form."""
    from ..cpu.packed_linear import PackedLinear

    if getattr(model, "is_quantized", False) or any(isinstance(m, PackedLinear) for m in model.modules()):
        raise ExportError(f"{source} loaded with packed or quantized weights, which ONNX cannot hold: export the "
                          "full-precision checkpoint (--dtype q8 or q4 quantizes the ONNX graphs).")  # fmt: skip
