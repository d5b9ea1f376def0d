"""Memory of FastVLM in bf16, 8-bit and 4-bit (bitsandbytes): weight footprint and peak memory of one generation.

Random weights at the real shapes (FastViTHD at 1024 px plus the Qwen2 of FastVLM-0.5B and -1.5B), saved to a
temporary folder and loaded through `from_pretrained(quantization_config=...)`, the path users take. Each
configuration runs in a fresh subprocess, so that peaks do not carry over. The peak covers loading and one
generation: on CPU the resident-set high-water mark (`VmHWM`) minus the resident set before loading (weights that
safetensors maps from disk count once they are touched); on CUDA `torch.cuda.max_memory_allocated`.

FastVLM-7B is not built: its footprint is computed from its parameter count, and the per-decoder-layer part of that
computation is checked against a 7B-shaped decoder layer that is quantized and measured.

    python benchmarks/memory.py --output benchmarks/results/memory.json   # also writes benchmarks/results/memory.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _torchvision_shim  # noqa: F401  (first: before anything imports torchvision)
import torch
from process_memory import memory_in_use_bytes, peak_memory_bytes, reset_peak_memory

GIB = 1024**3
MODES = ("bf16", "int8", "nf4")
MEASURED_SIZES = ("0.5B", "1.5B")
PROMPT_TEXT_TOKENS = 32
NEW_TOKENS = 8
# Bytes per weight of a quantized Linear as `get_memory_footprint` counts them (the packed weights; the per-block
# scales live outside the module's parameters and buffers).
WEIGHT_BYTES = {"bf16": 2.0, "int8": 1.0, "nf4": 0.5}


def quantization_config(mode: str):
    from transformers import BitsAndBytesConfig

    if mode == "bf16":
        return None
    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)


def save_random_model(config, directory: Path) -> None:
    from fastvlm_hf import FastVLMForConditionalGeneration

    torch.manual_seed(0)
    model = FastVLMForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(directory)


def load(directory: Path, mode: str, device_map):
    import fastvlm_hf  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModelForImageTextToText

    kwargs = {"dtype": torch.bfloat16, "device_map": device_map}
    if mode != "bf16":
        kwargs["quantization_config"] = quantization_config(mode)
    return AutoModelForImageTextToText.from_pretrained(directory, **kwargs).eval()


# ----------------------------------------------------------------------------------------------------------------------
# Peak memory, in a fresh process


def worker(directory: Path, mode: str) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    baseline = memory_in_use_bytes(device)
    reset_peak_memory(device)
    started = time.perf_counter()
    model = load(directory, mode, device_map=device)
    load_seconds = time.perf_counter() - started
    footprint = model.get_memory_footprint()

    config = model.config
    image_side = config.vision_config.image_size
    input_ids = torch.cat(
        [torch.full((1, config.num_image_tokens), config.image_token_id), torch.arange(100, 100 + PROMPT_TEXT_TOKENS)[None]],
        dim=1,
    ).to(model.device)
    pixel_values = torch.rand(1, 3, image_side, image_side, generator=torch.Generator().manual_seed(0)).to(model.device)
    started = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=NEW_TOKENS, do_sample=False)
    return {
        "footprint_bytes": footprint,
        "peak_bytes": peak_memory_bytes(device) - baseline,
        "load_seconds": round(load_seconds, 1),
        "generate_seconds": round(time.perf_counter() - started, 1),
        "device": device,
        "prompt_tokens": input_ids.shape[1],
        "new_tokens": NEW_TOKENS,
    }


def run_worker(directory: Path, mode: str) -> dict:
    command = [sys.executable, __file__, "--worker", str(directory), mode]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{mode} run on {directory} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------------------
# FastVLM-7B from its parameter count


def parameter_counts(config) -> dict[str, int]:
    """Parameters of FastVLM under `config`, split into the language model's decoder Linear weights (what
    bitsandbytes quantizes), their count per decoder layer, and everything else."""
    from torch import nn

    from fastvlm_hf import FastVLMForConditionalGeneration

    with torch.device("meta"):
        model = FastVLMForConditionalGeneration(config)
    layers = model.model.language_model.layers
    quantized = sum(m.weight.numel() for m in layers.modules() if isinstance(m, nn.Linear))
    total = sum(p.numel() for p in model.parameters())  # a tied head is counted once
    return {
        "total": total,
        "quantized_linear": quantized,
        "other": total - quantized,
        "layer_linear": quantized // len(layers),
        "layer_other": sum(p.numel() for p in layers[0].parameters()) - quantized // len(layers),
    }


def computed_footprint(counts: dict[str, int], mode: str) -> float:
    return counts["other"] * WEIGHT_BYTES["bf16"] + counts["quantized_linear"] * WEIGHT_BYTES[mode]


def computed_layer_bytes(counts: dict[str, int], mode: str) -> float:
    return counts["layer_other"] * WEIGHT_BYTES["bf16"] + counts["layer_linear"] * WEIGHT_BYTES[mode]


def measured_7b_layer_bytes(workdir: Path) -> dict[str, int]:
    """Footprint of one 7B decoder layer, per mode: a 2-layer minus a 1-layer 7B-shaped model, both loaded."""
    from models import fastvlm_config

    directories = {}
    for layers in (1, 2):
        directories[layers] = workdir / f"7B-{layers}-layers"
        save_random_model(fastvlm_config("7b", layers), directories[layers])
    measured = {}
    for mode in MODES:
        footprints = {}
        for layers, directory in directories.items():
            model = load(directory, mode, device_map="cpu")
            footprints[layers] = model.get_memory_footprint()
            del model
        measured[mode] = footprints[2] - footprints[1]
    return measured


# ----------------------------------------------------------------------------------------------------------------------
# Report


def markdown(results: dict) -> str:
    lines = [
        "| Model | Mode | Weights (`get_memory_footprint`) | Peak memory, load + one generation |",
        "|---|---|---|---|",
    ]
    for size in MEASURED_SIZES:
        for mode in MODES:
            row = results["measured"][size][mode]
            lines.append(
                f"| FastVLM-{size} | {mode} | {row['footprint_bytes'] / GIB:.2f} GiB | "
                f"{row['peak_bytes'] / GIB:.2f} GiB |"
            )
    for mode in MODES:
        lines.append(f"| FastVLM-7B | {mode} | {results['computed_7b'][mode]['footprint_bytes'] / GIB:.2f} GiB (computed) | — |")
    check = results["computed_7b"]
    lines += [
        "",
        f"Measured on {results['device']} with random weights; one {results['image_side']} px image "
        f"({results['image_tokens']} image tokens) plus {PROMPT_TEXT_TOKENS} text tokens, {NEW_TOKENS} new tokens, "
        "greedy. 8-bit is `load_in_8bit`; 4-bit is NF4 with bf16 compute. The vision tower, projector and `lm_head` "
        "stay in bf16 in every mode. The peak is above the process's memory before loading. On CPU the quantized "
        "modes peak above bf16: loading quantizes from the bf16 checkpoint, whose memory-mapped pages stay resident, "
        "and 8-bit matmuls cast their inputs to fp16. "
        "`get_memory_footprint` counts packed weights only: bitsandbytes' per-block scales add about 1/16 of a byte "
        "per 4-bit weight and 4 bytes per 8-bit output row.",
        "",
        "FastVLM-7B is computed from its parameter count (bf16 for everything but the decoder Linear weights). "
        "Check against a 7B decoder layer loaded and measured: "
        + ", ".join(
            f"{mode} {check[mode]['layer_computed_bytes'] / 2**20:.1f} MiB computed vs "
            f"{check[mode]['layer_measured_bytes'] / 2**20:.1f} MiB measured"
            for mode in MODES
        )
        + ".",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "memory.json", help="where to write the JSON results")
    parser.add_argument("--markdown", type=Path, default=Path(__file__).parent / "results" / "memory.md", help="Markdown table")
    parser.add_argument("--sizes", nargs="+", default=list(MEASURED_SIZES), choices=list(MEASURED_SIZES))
    parser.add_argument("--from-json", type=Path, help="only rewrite the Markdown table from an earlier --output")
    parser.add_argument("--worker", nargs=2, metavar=("DIR", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(Path(args.worker[0]), args.worker[1])))
        return
    if args.from_json:
        table = markdown(json.loads(args.from_json.read_text()))
        args.markdown.write_text("## Memory\n\n" + table)
        print(table)
        return

    from models import fastvlm_config  # not before: the worker reads its memory before importing transformers
    from transformers import __version__ as transformers_version

    results = {"measured": {}, "computed_7b": {}, "transformers": transformers_version, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for size in args.sizes:
            directory = workdir / size
            save_random_model(fastvlm_config(size.lower()), directory)
            results["measured"][size] = {}
            for mode in MODES:
                results["measured"][size][mode] = row = run_worker(directory, mode)
                print(f"FastVLM-{size} {mode}: {json.dumps(row)}", file=sys.stderr)
            for child in directory.iterdir():
                child.unlink()
        measured_layer = measured_7b_layer_bytes(workdir)

    counts = parameter_counts(fastvlm_config("7b"))
    for mode in MODES:
        results["computed_7b"][mode] = {
            "footprint_bytes": computed_footprint(counts, mode),
            "layer_computed_bytes": computed_layer_bytes(counts, mode),
            "layer_measured_bytes": measured_layer[mode],
        }
    results["parameters_7b"] = counts
    first = results["measured"][args.sizes[0]]["bf16"]
    results["device"] = "CUDA" if first["device"] == "cuda" else "CPU"
    config = fastvlm_config("0.5b")
    results["image_side"] = config.vision_config.image_size
    results["image_tokens"] = config.num_image_tokens

    table = markdown(results) if args.sizes == list(MEASURED_SIZES) else None
    args.output.write_text(json.dumps(results, indent=2))
    if table:
        args.markdown.write_text("## Memory\n\n" + table)
        print(table)
    else:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
