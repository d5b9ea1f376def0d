"""FastVLM exported to ONNX (`fastvlm_hf.export`), run by onnxruntime in float32, q8 and q4, against fastvlm_hf's
PyTorch path (bfloat16 with packed weights, as `fastvlm-hf predict` runs on CPU, and float32): time to first token,
decode speed, peak memory and file sizes, on the same random weights, in one process, runs interleaved.

    python benchmarks/onnx_export.py --output benchmarks/results/onnx.json
    python benchmarks/onnx_export.py --size tiny --resolution 256 --repeats 1 --new-tokens 4     # smoke

The model has FastVLM-0.5B's shapes (FastViTHD at 1024 px, Qwen2-0.5B with its real vocabulary), random weights;
its checkpoint is written to a temporary folder and exported from there by `fastvlm_hf.export.export`, as
`fastvlm-hf export` does (`--onnx-dir` keeps the export, and reuses one made before). One prompt: the image and
"Describe the image in detail." through the chat template (282 tokens at 1024 px), preprocessed once; the timings
start from the preprocessed inputs.

- TTFT: image features, prompt embedding and prefill to the first token. PyTorch: `generate(max_new_tokens=1)`;
  onnxruntime: `OnnxFastVLM.generate` (`fastvlm_hf.export.runtime`), the loop transformers.js runs.
- Decode: the time between consecutive new tokens of an N+1-token generation (nothing stopping early), stamped by
  a streamer (`generate(streamer=...)`, the same protocol on both sides): the median step of each run, then the
  median over runs.
- Peak memory: resident-set high-water mark of a child process that loads one side and runs one TTFT.
- onnxruntime runs with `--threads` intra-op threads, as torch does, and without spinning between runs (which took
  the cores from the side timed next).

(Not `onnx.py`: a module of that name beside the benchmarks would hide the `onnx` package from them.)
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import _torchvision_shim  # noqa: F401  (first: before anything imports torchvision)
import onnxruntime
import torch
from common import (
    add_common_arguments,
    configure_torch,
    describe_machine,
    gib,
    interleave,
    Stats,
    log,
    machine_line,
    markdown_table,
    peak_memory_bytes,
    write_results,
)
from models import (
    DEFAULT_IMAGE,
    SIZES,
    build_ours,
    build_processors,
    build_tokenizer,
    chat_inputs,
    fastvlm_config,
    generation_kwargs,
    rgb_image,
)

from fastvlm_hf import export
from fastvlm_hf.export import layout
from fastvlm_hf.export.runtime import OnnxFastVLM

TORCH_SIDES = {"torch bf16 packed": torch.bfloat16, "torch fp32": torch.float32}
ONNX_SIDES = {"onnxruntime fp32": "fp32", "onnxruntime q8": "q8", "onnxruntime q4": "q4"}
SIDES = [*TORCH_SIDES, *ONNX_SIDES]


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="0.5b", help="default: 0.5b")
    parser.add_argument("--resolution", type=int, default=1024, help="image side in pixels (default: 1024)")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="default: examples/house.png")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side (default: 3)")
    parser.add_argument("--new-tokens", type=int, default=16, help="N, the decoded tokens timed (default: 16)")
    parser.add_argument("--onnx-dir", type=Path, help="keep the export here; reuse it if it exists")
    parser.add_argument("--sides", type=parse_sides, default=SIDES, help=f"default: {','.join(SIDES)}")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True, help="measure peak memory")
    parser.add_argument("--memory-probe", choices=SIDES, help=argparse.SUPPRESS)  # the child process of --memory
    add_common_arguments(parser)
    return parser.parse_args(argv)


def parse_sides(text: str) -> list[str]:
    sides = [side.strip() for side in text.split(",") if side.strip()]
    if unknown := [side for side in sides if side not in SIDES]:
        raise argparse.ArgumentTypeError(f"unknown side(s) {unknown}; choose from {', '.join(SIDES)}")
    return sides


class Runner:
    """One side: TTFT and N-token generations from the same preprocessed inputs."""

    def __init__(self, name: str, args: argparse.Namespace, config, tokenizer, inputs, onnx_dir: Path):
        self.name, self.inputs = name, inputs
        if name in TORCH_SIDES:
            self.model = build_ours(config, TORCH_SIDES[name], "cpu", args.seed).eval()
            if TORCH_SIDES[name] == torch.bfloat16:
                self.model.pack_weights()
            self.kwargs = generation_kwargs(tokenizer)
        else:
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
            # onnxruntime's threads otherwise spin between runs and take the cores from the next side's run
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self.model = OnnxFastVLM(onnx_dir, ONNX_SIDES[name], session_options=options)

    def generate(self, new_tokens: int, streamer: StepClock | None = None) -> None:
        if isinstance(self.model, OnnxFastVLM):
            self.model.generate(self.inputs["input_ids"].numpy(), self.inputs["pixel_values"].numpy(), new_tokens,
                                streamer=streamer)  # fmt: skip
            return
        with torch.no_grad():
            self.model.generate(**self.inputs, **self.kwargs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                streamer=streamer)  # fmt: skip


class StepClock:
    """A streamer that stamps each new token (its first `put` is the prompt)."""

    def __init__(self):
        self.prompt_seen, self.token_times = False, []

    def put(self, value) -> None:
        if self.prompt_seen:
            self.token_times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self) -> None:
        pass

    def steps(self) -> list[float]:
        return [later - earlier for earlier, later in zip(self.token_times, self.token_times[1:])]


def prepare(args: argparse.Namespace):
    tokenizer = build_tokenizer()
    processor = build_processors(tokenizer, args.resolution)["ours"]
    config = fastvlm_config(args.size, resolution=args.resolution, tokenizer=tokenizer)
    inputs = dict(chat_inputs(processor, rgb_image(args.image), "cpu"))
    return tokenizer, processor, config, inputs


def export_model(args: argparse.Namespace, config, processor) -> tuple[Path, float | None]:
    """The exported folder, and the seconds the export took (None when reused)."""
    onnx_dir = args.onnx_dir or Path(tempfile.mkdtemp(prefix="fastvlm-onnx-")) / "model"
    if (onnx_dir / "config.json").exists():
        return onnx_dir, None
    with tempfile.TemporaryDirectory() as scratch:
        model = build_ours(config, torch.float32, "cpu", args.seed)
        model.save_pretrained(scratch)
        processor.save_pretrained(scratch)
        del model
        log(f"exporting to {onnx_dir} (fp32, q8, q4)")
        seconds, _ = _timed(lambda: export.export(scratch, onnx_dir, dtypes=["fp32", "q8", "q4"]))
    return onnx_dir, seconds


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def file_sizes(onnx_dir: Path) -> dict[str, int]:
    sizes = {}
    for dtype in ONNX_SIDES.values():
        files = [onnx_dir / "onnx" / layout.graph_file(graph, dtype) for graph in layout.GRAPHS]
        files += [path.with_name(f"{path.name}_data") for path in files]
        sizes[dtype] = sum(path.stat().st_size for path in files if path.exists())
    return sizes


def memory_probe(args: argparse.Namespace) -> None:
    """Child process: loads one side, runs one TTFT, prints its peak resident set."""
    tokenizer, processor, config, inputs = prepare(args)
    Runner(args.memory_probe, args, config, tokenizer, inputs, args.onnx_dir).generate(1)
    print(f"PEAK {peak_memory_bytes('cpu')}")


def measure_memory(args: argparse.Namespace, side: str, onnx_dir: Path) -> int | None:
    import subprocess
    import sys

    command = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", side, "--size", args.size,
               "--resolution", str(args.resolution), "--image", str(args.image), "--threads", str(args.threads),
               "--seed", str(args.seed), "--onnx-dir", str(onnx_dir)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in result.stdout.splitlines() if line.startswith("PEAK ")]
    if result.returncode or not lines:
        log(f"memory probe for {side} failed:\n{result.stderr[-2000:]}")
        return None
    return int(lines[-1].split()[1])


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    args.device = "cpu"
    configure_torch(args)
    if args.memory_probe:
        memory_probe(args)
        return
    tokenizer, processor, config, inputs = prepare(args)
    onnx_dir, export_seconds = export_model(args, config, processor)
    sizes = file_sizes(onnx_dir)
    runners = {}
    for side in args.sides:
        log(f"loading {side}")
        runners[side] = Runner(side, args, config, tokenizer, inputs, onnx_dir)
    log("timing TTFT")
    ttft = interleave({side: (lambda r=runner: r.generate(1)) for side, runner in runners.items()}, "cpu",
                      args.warmup, args.repeats)  # fmt: skip
    log(f"timing {args.new_tokens + 1}-token generations step by step")
    clocks: dict[str, list[StepClock]] = {side: [] for side in runners}

    def new_clock(side: str) -> StepClock:
        clocks[side].append(StepClock())
        return clocks[side][-1]

    interleave({side: (lambda clock, r=runner: r.generate(args.new_tokens + 1, clock)) for side, runner in runners.items()},
               "cpu", 0, args.repeats, prepare={side: (lambda s=side: new_clock(s)) for side in runners})  # fmt: skip
    del runners
    memory = {side: measure_memory(args, side, onnx_dir) for side in args.sides} if args.memory else {}

    rows, raw = [], {}
    baseline_side = next(side for side in args.sides if side in TORCH_SIDES) if set(args.sides) & set(TORCH_SIDES) else args.sides[0]
    baseline = ttft.stats(baseline_side).median
    for side in args.sides:
        first = ttft.stats(side)
        steps = Stats.of([statistics.median(clock.steps()) for clock in clocks[side]])
        dtype = ONNX_SIDES.get(side)
        raw[side] = {"ttft_s": ttft.samples[side], "decode_steps_s": [clock.steps() for clock in clocks[side]],
                     "decode_s_per_token": steps.median, "peak_bytes": memory.get(side),
                     "file_bytes": sizes.get(dtype)}  # fmt: skip
        rows.append([side, first.ms(0), f"{first.median / baseline:.2f}×", steps.ms(1),
                     f"{1 / steps.median:.1f}", gib(memory.get(side)), f"{sizes[dtype] / 1e9:.2f}" if dtype else "—"])  # fmt: skip
    machine = describe_machine("cpu")
    prompt_tokens = inputs["input_ids"].shape[1]
    headers = ["side", "TTFT ms", f"TTFT / {baseline_side}", "decode ms/token", "decode tokens/s", "peak GiB", "files GB"]
    export_note = f" The export (fp32, q8, q4) took {export_seconds:.0f} s." if export_seconds else ""
    markdown = "\n\n".join([
        f"### FastVLM-{args.size} exported to ONNX: onnxruntime against PyTorch ({args.resolution} px, cpu)",
        f"Machine: {machine_line(machine)} · onnxruntime {onnxruntime.__version__}",
        markdown_table(headers, rows),
        f"Milliseconds, median (min–max) of {args.repeats} interleaved runs; random weights, the same on every side; "
        f"{prompt_tokens} prompt tokens, preprocessed once. Decode: the time between consecutive tokens of a "
        f"{args.new_tokens + 1}-token generation, stamped by a streamer; median step of each run, median (min–max) "
        f"over runs. Peak: resident-set high-water mark of a process that loads "
        f"one side and runs one TTFT. Files: the three graphs of the dtype.{export_note}",
    ])  # fmt: skip
    settings = {key: value for key, value in vars(args).items() if key not in ("output", "onnx_dir", "memory_probe")}
    settings["image"] = args.image.name  # where the files were is this machine's business
    results = {"machine": machine, "settings": settings, "export_seconds": export_seconds,
               "prompt_tokens": prompt_tokens, "sides": raw}  # fmt: skip
    write_results(args.output, results, markdown)
    if args.onnx_dir is None:
        shutil.rmtree(onnx_dir.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
