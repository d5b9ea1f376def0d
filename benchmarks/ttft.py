"""Time to first token, decode speed, second-turn TTFT and peak memory of FastVLM: fastvlm_hf's
`FastVLMForConditionalGeneration` against transformers' own `FastVlmForConditionalGeneration` (5.x, timm inside), on
the same random weights (converted by fastvlm_hf's key map), in one process, runs interleaved.

    python benchmarks/ttft.py --output results/ttft.json
    python benchmarks/ttft.py --sizes tiny --resolution 256 --repeats 1 --decode-repeats 1 --new-tokens 8   # smoke

One prompt: an image and "Describe the image in detail." through the chat template, as `fastvlm-hf predict` builds
it (256 image tokens at 1024 px, 282 tokens in all). The tokenizer is a small byte-level BPE trained here, offline, on
the prompt's words: one token per word or punctuation mark, as Qwen2's vocabulary has for these common words. The
models keep Qwen2's real vocabulary size.

- TTFT: each side's processor on the image and chat, then `generate(max_new_tokens=1)`.
- Decode: the time from the first new token to the last of `generate(max_new_tokens=N+1)`, over N, read from a
  streamer's timestamps; `min_new_tokens` so that nothing stops early.
- Second turn: the answer to the first (`--answer-tokens`) and a new user question appended, generation continuing
  from the first turn's `DynamicCache` without `pixel_values`.
- Floor: the FLOPs one TTFT run executes (FlopCounterMode on an untimed run) over the best rate of a large
  `torch.mm` in the same dtype measured in the same run (before the first model and after each one).
- Peak memory: one child process per model (CPU: resident-set high-water mark; CUDA: peak allocated).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
from functools import partial
from pathlib import Path
from typing import Any

import _torchvision_shim  # noqa: F401  (first: before anything imports torchvision)
import torch
import transformers
from common import (
    DTYPES,
    REPO,
    Stats,
    add_common_arguments,
    configure_torch,
    count_flops,
    describe_machine,
    interleave,
    log,
    machine_line,
    markdown_table,
    matmul_flops_per_second,
    memory_baseline,
    parse_dtypes,
    parse_list,
    peak_cell,
    probe_memory,
    report_memory,
    write_results,
)
from models import (
    DEFAULT_IMAGE,
    SIZES,
    Side,
    build_native,
    build_ours,
    build_processors,
    build_tokenizer,
    fastvlm_config,
    generation_kwargs,
    rgb_image,
)

from fastvlm_hf import FastVLMForConditionalGeneration

SIDES = ("ours", "native")


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sizes", default="0.5b,1.5b", help=f"comma-separated, from {', '.join(SIZES)} (default: 0.5b,1.5b)"
    )
    parser.add_argument("--dtypes", type=parse_dtypes, default=["bf16", "fp32"], help="default: bf16,fp32")
    parser.add_argument("--layers", type=int, help="override the language model's number of layers (smoke runs)")
    parser.add_argument("--resolution", type=int, default=1024, help="image side in pixels (default: 1024)")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="default: examples/house.png")
    parser.add_argument("--repeats", type=int, default=3, help="timed TTFT runs of each side (default: 3)")
    parser.add_argument("--decode-repeats", type=int, default=2, help="timed N+1-token generations (default: 2)")
    parser.add_argument("--new-tokens", type=int, default=64, help="N, the decoded tokens timed (default: 64)")
    parser.add_argument("--answer-tokens", type=int, default=16, help="length of the first answer (default: 16)")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True, help="measure peak memory")
    parser.add_argument(
        "--pack",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on CPU, pack our language model's linear weights (`pack_weights()`), as the CLI does (default: on)",
    )
    parser.add_argument("--memory-probe", choices=SIDES, help=argparse.SUPPRESS)  # the child process of --memory
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    args.sizes = parse_list(args.sizes)
    unknown = [size for size in args.sizes if size not in SIZES]
    if unknown:
        parser.error(f"unknown size(s) {unknown}; choose from {', '.join(SIZES)}")
    return args


# ----------------------------------------------------------------------------------------------------------------------
# Models


def packed_for(args: argparse.Namespace, ours: FastVLMForConditionalGeneration) -> FastVLMForConditionalGeneration:
    """`ours` with its language model's weights packed where `--pack` asks for it (CPU only)."""
    if args.pack and args.device == "cpu":
        ours.pack_weights()
    return ours


# ----------------------------------------------------------------------------------------------------------------------
# Measurements


def measure(sides: dict[str, Side], args: argparse.Namespace) -> dict[str, Any]:
    """Everything timed for one (size, dtype), both sides interleaved."""
    device = args.device
    prompt_tokens = {name: side.inputs()["input_ids"].shape[1] for name, side in sides.items()}
    if len(set(prompt_tokens.values())) != 1:
        sys.exit(f"the two processors build prompts of different lengths: {prompt_tokens}")
    log("  FLOPs of one TTFT run")
    flops = {name: count_flops(partial(side.generate, 1))[0] for name, side in sides.items()}
    log("  preprocessing")
    preprocess_runs = {name: side.inputs for name, side in sides.items()}
    preprocess = interleave(preprocess_runs, device, warmup=1, repeats=max(args.repeats, 5))
    log("  TTFT")
    ttft_runs = {name: partial(side.generate, 1) for name, side in sides.items()}
    ttft = interleave(ttft_runs, device, warmup=args.warmup, repeats=args.repeats)
    log("  second turn")
    first_turns = {name: side.first_turn(args.answer_tokens) for name, side in sides.items()}  # also warms decoding
    turn2_runs = {name: partial(side.second_turn, first_turns[name][0]) for name, side in sides.items()}
    fresh_caches = {name: partial(copy.deepcopy, first_turns[name][1]) for name in sides}  # generate extends a cache
    turn2 = interleave(turn2_runs, device, warmup=1, repeats=args.repeats, prepare=fresh_caches)
    log(f"  {args.new_tokens + 1}-token generations")
    decode_s_per_token: dict[str, list[float]] = {name: [] for name in sides}
    decode_runs = {
        name: partial(side.timed_decode, args.new_tokens, decode_s_per_token[name]) for name, side in sides.items()
    }
    interleave(decode_runs, device, warmup=0, repeats=args.decode_repeats)
    return {
        "prompt_tokens": prompt_tokens["ours"],
        "flops": flops,
        "preprocess_s": preprocess.samples,
        "ttft_s": ttft.samples,
        "decode_s_per_token": decode_s_per_token,
        "turn2_ttft_s": turn2.samples,
    }


def summarize(raw: dict[str, Any], floor_rate: float) -> dict[str, Any]:
    """Medians and ratios of one (size, dtype) from its samples."""
    ttft = {name: Stats.of(raw["ttft_s"][name]) for name in SIDES}
    decode = side_stats(raw, "decode_s_per_token")
    turn2 = {name: Stats.of(raw["turn2_ttft_s"][name]) for name in SIDES}
    work = min(raw["flops"].values())  # the least work either side needed for the same answer
    floor = work / floor_rate
    return {
        "ttft_median_s": {name: ttft[name].median for name in SIDES},
        "decode_median_s_per_token": {name: decode[name].median for name in SIDES},
        "turn2_median_s": {name: turn2[name].median for name in SIDES},
        "ttft_native_over_ours": ttft["native"].median / ttft["ours"].median,
        "decode_native_over_ours": decode["native"].median / decode["ours"].median,
        "turn2_over_turn1": {name: turn2[name].median / ttft[name].median for name in SIDES},
        "floor_flops": work,
        "floor_rate_flops_per_s": floor_rate,
        "floor_s": floor,
        "ttft_over_floor": {name: ttft[name].median / floor for name in SIDES},
    }


# ----------------------------------------------------------------------------------------------------------------------
# Peak memory, one child process per model


def memory_probe(args: argparse.Namespace) -> None:
    """Child process: builds one model as the parent would, runs one TTFT, prints its memory as a JSON line."""
    size, dtype_name = args.sizes[0], args.dtypes[0]
    tokenizer = build_tokenizer()
    processor = build_processors(tokenizer, args.resolution)[args.memory_probe]
    image = rgb_image(args.image)
    config = fastvlm_config(size, args.layers, args.resolution, tokenizer)
    baseline = memory_baseline(args.device)
    dtype = DTYPES[dtype_name]
    if args.memory_probe == "ours":
        model = packed_for(args, build_ours(config, dtype, args.device, args.seed)).eval()
    else:
        model = build_native(config, dtype, args.device).eval()
    Side(model, processor, image, args.device, generation_kwargs(tokenizer)).generate(1)
    report_memory(args.device, baseline, model)


def measure_memory(size: str, dtype_name: str, side: str, args: argparse.Namespace) -> dict[str, Any] | None:
    command = [
        str(Path(__file__).resolve()), "--memory-probe", side, "--sizes", size, "--dtypes", dtype_name,
        "--resolution", str(args.resolution), "--image", str(args.image), "--device", args.device,
        "--threads", str(args.threads), "--seed", str(args.seed),
    ]  # fmt: skip
    if args.layers:
        command += ["--layers", str(args.layers)]
    return probe_memory(command, side)


# ----------------------------------------------------------------------------------------------------------------------
# Report


LATENCY_HEADERS = [
    "model", "dtype", "prompt tokens", "preprocess ours / native ms", "TTFT ours ms", "TTFT native ms", "native/ours",
    "decode ours ms/token", "decode native ms/token", "native/ours",
]  # fmt: skip
MORE_HEADERS = [
    "model", "dtype", "turn-2 TTFT ours ms", "turn 2/turn 1 ours", "turn-2 TTFT native ms", "GFLOP", "floor ms",
    "ours/floor", "native/floor", "peak ours GiB (+model)", "peak native GiB (+model)",
]  # fmt: skip


def side_stats(raw: dict[str, Any], key: str) -> dict[str, Stats]:
    return {name: Stats.of(raw[key][name]) for name in SIDES}


def latency_cells(row: dict[str, Any]) -> list[Any]:
    raw, summary = row["raw"], row["summary"]
    preprocess, ttft = side_stats(raw, "preprocess_s"), side_stats(raw, "ttft_s")
    decode = side_stats(raw, "decode_s_per_token")
    return [
        row["size"], row["dtype"], raw["prompt_tokens"],
        f"{preprocess['ours'].median * 1e3:.1f} / {preprocess['native'].median * 1e3:.1f}",
        ttft["ours"].ms(0), ttft["native"].ms(0), f"{summary['ttft_native_over_ours']:.2f}×",
        decode["ours"].ms(), decode["native"].ms(), f"{summary['decode_native_over_ours']:.2f}×",
    ]  # fmt: skip


def more_cells(row: dict[str, Any]) -> list[Any]:
    summary, memory = row["summary"], row.get("memory") or {}
    turn2 = side_stats(row["raw"], "turn2_ttft_s")
    return [
        row["size"], row["dtype"], turn2["ours"].ms(0), f"{summary['turn2_over_turn1']['ours']:.2f}",
        turn2["native"].ms(0), f"{summary['floor_flops'] / 1e9:.0f}", f"{summary['floor_s'] * 1e3:.0f}",
        f"{summary['ttft_over_floor']['ours']:.2f}", f"{summary['ttft_over_floor']['native']:.2f}",
        peak_cell(memory.get("ours")), peak_cell(memory.get("native")),
    ]  # fmt: skip


def footnote(results: dict[str, Any]) -> str:
    settings = results["settings"]
    rates = ", ".join(f"{name} {rate / 1e9:.0f} GFLOP/s" for name, rate in results["matmul_rate_flops_per_s"].items())
    memory = "peak CUDA memory allocated" if settings["device"] == "cuda" else "resident-set high-water mark"
    return (
        f"Milliseconds, median (min–max) of interleaved runs; random weights, the same on both sides. TTFT includes "
        f"each side's processor; decode = time from the first new token to the last of a "
        f"{settings['new_tokens'] + 1}-token generation / {settings['new_tokens']}. {packing(settings)}Turn 2 continues from turn 1's cache after a {settings['answer_tokens']}-token "
        f"answer. Floor = FLOPs of one TTFT run / best large-matmul rate measured in this run ({rates}). Peak memory: "
        f"{memory} of a process that builds one model and runs one TTFT; in brackets, its growth from before the "
        f"model was built."
    )


def packing(settings: dict[str, Any]) -> str:
    if settings.get("pack") and settings["device"] == "cpu":
        return "Ours runs with its language model's linear weights packed (`pack_weights()`, as the CLI does on CPU). "
    return ""


def markdown(results: dict[str, Any]) -> str:
    settings = results["settings"]
    title = (
        f"### FastVLM TTFT and decode: fastvlm_hf vs transformers' FastVlmForConditionalGeneration "
        f"({settings['resolution']} px, {settings['device']})"
    )
    latency_rows = [latency_cells(row) for row in results["rows"]]
    more_rows = [more_cells(row) for row in results["rows"]]
    return "\n\n".join(
        [
            title,
            f"Machine: {machine_line(results['machine'])}",
            markdown_table(LATENCY_HEADERS, latency_rows),
            markdown_table(MORE_HEADERS, more_rows),
            footnote(results),
        ]
    )


# ----------------------------------------------------------------------------------------------------------------------


def run_pair(size: str, dtype_name: str, args, tokenizer, processors, image) -> dict[str, Any]:
    dtype = DTYPES[dtype_name]
    config = fastvlm_config(size, args.layers, args.resolution, tokenizer)
    log(f"{size} {dtype_name}: building both models")
    ours = build_ours(config, dtype, args.device, args.seed)
    native = build_native(config, dtype, args.device, ours)
    packed_for(args, ours)
    generate_kwargs = generation_kwargs(tokenizer)
    sides = {
        "ours": Side(ours.eval(), processors["ours"], image, args.device, generate_kwargs),
        "native": Side(native.eval(), processors["native"], image, args.device, generate_kwargs),
    }
    return measure(sides, args)


def measure_matmul_rate(dtype_name: str, device: str) -> float:
    rate = matmul_flops_per_second(DTYPES[dtype_name], device)
    log(f"{dtype_name} matmul: {rate / 1e9:.0f} GFLOP/s")
    return rate


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    configure_torch(args)
    transformers.logging.set_verbosity_error()
    if args.memory_probe:
        return memory_probe(args)
    if not hasattr(transformers, "FastVlmForConditionalGeneration"):
        sys.exit(f"transformers {transformers.__version__} has no FastVlmForConditionalGeneration: the peer needs 5.x")
    tokenizer = build_tokenizer()
    processors = build_processors(tokenizer, args.resolution)
    image = rgb_image(args.image)
    results: dict[str, Any] = {
        "benchmark": "ttft",
        "machine": describe_machine(args.device),
        "settings": {
            **{key: value for key, value in vars(args).items() if key not in ("output", "memory_probe")},
            "image": os.path.relpath(args.image, REPO),  # results carry no machine paths
        },
        "matmul_rate_flops_per_s": {},
        "rows": [],
    }
    for dtype_name in args.dtypes:
        # The yardstick is measured before and after every pair, and its best is kept: one rate taken while the machine
        # was busy would lower the floor of every row.
        rates = [measure_matmul_rate(dtype_name, args.device)]
        rows = []
        for size in args.sizes:
            raw = run_pair(size, dtype_name, args, tokenizer, processors, image)
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
            rates.append(measure_matmul_rate(dtype_name, args.device))
            row = {"size": size, "dtype": dtype_name, "raw": raw}
            if args.memory:
                log(f"{size} {dtype_name}: peak memory, one process per model")
                row["memory"] = {side: measure_memory(size, dtype_name, side, args) for side in SIDES}
            rows.append(row)
        results["matmul_rate_flops_per_s"][dtype_name] = max(rates)
        for row in rows:
            row["summary"] = summarize(row["raw"], max(rates))
            log(json.dumps(row["summary"], indent=None))
        results["rows"].extend(rows)
    write_results(args.output, results, markdown(results))


if __name__ == "__main__":
    main()
