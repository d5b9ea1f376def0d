"""The folder transformers.js (`AutoModelForImageTextToText`, model type `llava_qwen2`) and onnxruntime read:

    config.json                 Apple's flat llava_qwen2 config, with the real `<image>` id as `image_token_index`
                                and a `transformers.js_config` (default dtype, external data files)
    generation_config.json      greedy, ending at `<|im_end|>`
    preprocessor_config.json    a CLIPImageProcessor at the vision graph's side (resize the shortest edge, crop)
    processor_config.json       LlavaProcessor: `image_token`, `patch_size`, `num_additional_image_tokens`
    tokenizer.json, tokenizer_config.json (with the chat template), chat_template.jinja
    onnx/<graph><suffix>.onnx   `vision_encoder`, `embed_tokens`, `decoder_model_merged` per dtype; weights over
                                2 GB in `onnx/<graph><suffix>.onnx_data`
    README.md                   the model card
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import checkpoints
from ..conversion import generation_config

ONNX_FOLDER = "onnx"
GRAPHS = ("vision_encoder", "embed_tokens", "decoder_model_merged")
# transformers.js's dtype names and the file-name suffix it loads for each.
SUFFIXES = {"fp32": "", "fp16": "_fp16", "q8": "_quantized", "q4": "_q4"}


def graph_file(graph: str, dtype: str) -> str:
    return f"{graph}{SUFFIXES[dtype]}.onnx"


def write_configs(folder: Path, model, processor, side: int, default_dtype: str, external: list[str]) -> None:
    """Every file but the graphs and the card. `external`: the graph files whose weights are in `*.onnx_data`."""
    config = checkpoints.apple_config_dict(model.config, dtype="float32")
    config["transformers.js_config"] = {"dtype": default_dtype}
    if external:
        config["transformers.js_config"]["use_external_data_format"] = dict.fromkeys(external, 1)
    _write_json(folder / "config.json", config)
    generation_config(model, processor.tokenizer).save_pretrained(folder)
    _write_json(folder / "preprocessor_config.json", clip_image_processor(processor.image_processor, side))
    _write_json(folder / "processor_config.json", {
        "processor_class": "LlavaProcessor",
        "image_token": processor.image_token,
        "patch_size": processor.image_processor.patch_size,
        "num_additional_image_tokens": 0,
        "vision_feature_select_strategy": "full",
    })  # fmt: skip
    processor.tokenizer.save_pretrained(folder)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = processor.chat_template  # where transformers.js looks for it
    _write_json(folder / "tokenizer_config.json", tokenizer_config)
    (folder / "chat_template.jinja").write_text(processor.chat_template, encoding="utf-8")


def clip_image_processor(image_processor, side: int) -> dict:
    """The closest a CLIPImageProcessor (all transformers.js has for LLaVA) comes to FastVLM's preprocessing: resize
    the shortest edge to `side` and crop the centre, where FastVLM pads to a square (`image_mode="pad"`) or crops
    (`"crop"`) before resizing. Square images come out the same either way."""
    return {
        "image_processor_type": "CLIPImageProcessor",
        "processor_class": "LlavaProcessor",
        "do_resize": True,
        "size": {"shortest_edge": side},
        "resample": int(image_processor.resample),
        "do_center_crop": True,
        "crop_size": {"height": side, "width": side},
        "do_rescale": image_processor.do_rescale,
        "rescale_factor": image_processor.rescale_factor,
        "do_normalize": image_processor.do_normalize,
        "image_mean": list(image_processor.image_mean),
        "image_std": list(image_processor.image_std),
        "do_convert_rgb": True,
    }


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def files_by_dtype(onnx_folder: Path, dtypes: list[str]) -> list[dict]:
    """For the model card: per dtype, its graph files and their total size."""
    rows = []
    for dtype in dtypes:
        files = [onnx_folder / graph_file(name, dtype) for name in GRAPHS]
        files += [path.with_name(f"{path.name}_data") for path in files if path.with_name(f"{path.name}_data").exists()]
        size = sum(path.stat().st_size for path in files)
        rows.append({"dtype": dtype, "names": ", ".join(f"`{path.name}`" for path in files), "size": _megabytes(size)})
    return rows


def _megabytes(size: int) -> str:
    return f"{size / 1e6:,.1f} MB"
