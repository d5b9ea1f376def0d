"""What the benchmarks share: interleaved timing, statistics, FLOP counting, matmul throughput, memory, the machine's
description and the JSON + Markdown output (statistics, Markdown tables and device synchronization from
`fastvlm_hf.stats`)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from fastvlm_hf.stats import markdown_table, summarize, synchronize  # noqa: F401  (markdown_table: for the scripts)
from process_memory import (  # noqa: F401  (memory_in_use_bytes, process_status_bytes: for the scripts)
    memory_in_use_bytes,
    peak_memory_bytes,
    process_status_bytes,
    reset_peak_memory,
)

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# ----------------------------------------------------------------------------------------------------------------------
# Command line


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, choices=["cpu", "cuda"], help=f"default: {default_device}")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each side first (default: 1)")
    parser.add_argument("--output", type=Path, help="write the results as JSON here, and a Markdown table beside it")
    parser.add_argument("--seed", type=int, default=0)


def parse_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_dtypes(text: str) -> list[str]:
    names = parse_list(text)
    unknown = [name for name in names if name not in DTYPES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown dtype(s) {unknown}; choose from {', '.join(DTYPES)}")
    return names


def configure_torch(args: argparse.Namespace) -> None:
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)


# ----------------------------------------------------------------------------------------------------------------------
# Timing


def timed(fn: Callable[..., Any], device: str, *args: Any) -> tuple[float, Any]:
    """Wall-clock seconds of `fn(*args)`, with the device drained before and after, and its result."""
    synchronize(device)
    start = time.perf_counter()
    result = fn(*args)
    synchronize(device)
    return time.perf_counter() - start, result


@dataclasses.dataclass
class Stats:
    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, samples: list[float]) -> Stats:
        return cls(*summarize(samples), len(samples))

    def ms(self, digits: int = 1) -> str:
        """'median (min–max)' in milliseconds."""
        return f"{self.median * 1e3:.{digits}f} ({self.min * 1e3:.{digits}f}–{self.max * 1e3:.{digits}f})"


@dataclasses.dataclass
class Timings:
    samples: dict[str, list[float]]
    first_call: dict[str, float]  # the first warm-up call of each side: compilation, one-off initialisation

    def stats(self, name: str) -> Stats:
        return Stats.of(self.samples[name])


def _rotated(names: list[str], shift: int) -> list[str]:
    shift %= len(names)
    return names[shift:] + names[:shift]


def interleave(
    runs: dict[str, Callable[..., Any]],
    device: str,
    warmup: int,
    repeats: int,
    prepare: dict[str, Callable[[], Any]] | None = None,
    min_seconds: float = 0.0,
    max_repeats: int = 50,
) -> Timings:
    """Times each of `runs` `repeats` times or more, in rounds that run every side once, each round in a rotated
    order (A B, B A, ...), so that drift in the machine's speed falls on all sides alike. Rounds go on past `repeats`
    while a side's timed total is under `min_seconds` (cheap runs get more samples), up to `max_repeats`.

    `prepare[name]()`, when given, runs untimed before each call and its result is passed to `runs[name]`.
    """
    prepare = prepare or {}
    names = list(runs)

    def call(name: str) -> float:
        args = (prepare[name](),) if name in prepare else ()
        return timed(runs[name], device, *args)[0]

    first_call: dict[str, float] = {}
    for index in range(warmup):
        for name in _rotated(names, index):
            seconds = call(name)
            first_call.setdefault(name, seconds)
    samples: dict[str, list[float]] = {name: [] for name in names}
    rounds = 0
    while rounds < repeats or (rounds < max_repeats and min(sum(s) for s in samples.values()) < min_seconds):
        for name in _rotated(names, rounds):
            samples[name].append(call(name))
        rounds += 1
    return Timings(samples, first_call)


# ----------------------------------------------------------------------------------------------------------------------
# Work and throughput


def _cpu_flash_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    # FlopCounterMode counts the CUDA attention kernels but not the CPU one; the same two batched matmuls.
    batch, heads, query_length, head_dim = query
    key_length, value_dim = key[-2], value[-1]
    return 2 * batch * heads * query_length * key_length * (head_dim + value_dim)


_EXTRA_FLOP_FORMULAS = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _EXTRA_FLOP_FORMULAS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_flash_attention_flops


@contextlib.contextmanager
def patched(owner: object, name: str, value: object) -> Iterator[None]:
    """`owner.name` set to `value` inside the block, restored after it."""
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def count_flops(fn: Callable[[], Any]) -> tuple[int, Any]:
    """Floating-point operations of the matmuls, convolutions and attention `fn()` runs (a multiply-add is 2), and
    its result.

    The oneDNN kernels fastvlm_hf runs on CPU (FastViTHD's fused convolution + activation and its ConvFFN layers run
    as linear ones, the packed linear layers of `pack_weights()`) bypass the dispatcher's Python modes, so
    FlopCounterMode cannot see them: `fn()` runs with them off, and their plain paths, which do the same arithmetic,
    are what gets counted. The stem runs on the whole map too: its bands recompute a few rows where they meet."""
    from fastvlm_hf.cpu import fast_routes_off

    with fast_routes_off(), FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS) as counter:
        result = fn()
    return counter.get_total_flops(), result


def matmul_flops_per_second(dtype: torch.dtype, device: str, size: int | None = None, repeats: int = 10) -> float:
    """The best rate of a square `torch.mm` in `dtype` on `device`: what this machine's GEMMs reach, the yardstick of
    the compute floor."""
    size = size or (8192 if device == "cuda" else 2048)
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, generator=generator, device=device).to(dtype)
    b = torch.randn(size, size, generator=generator, device=device).to(dtype)
    for _ in range(2):
        torch.mm(a, b)
    best = min(timed(torch.mm, device, a, b)[0] for _ in range(repeats))
    return 2 * size**3 / best


# ----------------------------------------------------------------------------------------------------------------------
# Memory


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Modules built inside get their parameters in `dtype` directly, as `from_pretrained(dtype=...)` loads them,
    never a float32 copy first."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def gib(num_bytes: int | None) -> str:
    return "n/a" if num_bytes is None else f"{num_bytes / 2**30:.2f}"


# Peak memory is measured in a child process per model (the resident set's high-water mark never goes down): the child
# calls `memory_baseline` before building its model and `report_memory` after running it; the parent runs it with
# `probe_memory`.
_MEMORY_LINE = "MEMORY "


def memory_baseline(device: str) -> int:
    reset_peak_memory(device)
    return peak_memory_bytes(device) if device == "cpu" else 0


def report_memory(device: str, baseline: int, model: torch.nn.Module) -> None:
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    report = {"peak_bytes": peak_memory_bytes(device), "baseline_bytes": baseline, "weights_bytes": weights}
    print(_MEMORY_LINE + json.dumps(report))


def probe_memory(arguments: list[str], label: str) -> dict[str, Any] | None:
    """Runs `python *arguments`, a child that ends with `report_memory`, and returns its report (None if it failed)."""
    result = subprocess.run([sys.executable, *arguments], capture_output=True, text=True, check=False)
    lines = [line for line in result.stdout.splitlines() if line.startswith(_MEMORY_LINE)]
    if result.returncode or not lines:
        log(f"  memory probe for {label} failed:\n{result.stderr[-2000:]}")
        return None
    return json.loads(lines[-1].removeprefix(_MEMORY_LINE))


def peak_cell(memory: dict[str, Any] | None) -> str:
    """'peak (+ growth over the process before the model was built)' in GiB."""
    if not memory or memory["peak_bytes"] is None:
        return "n/a"
    return f"{gib(memory['peak_bytes'])} (+{gib(memory['peak_bytes'] - memory['baseline_bytes'])})"


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.float(), expected.float()
    return ((actual - expected).abs().max() / expected.abs().max()).item()


# ----------------------------------------------------------------------------------------------------------------------
# The machine


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
        )
    except OSError:
        return None
    return result.stdout.strip() or None


def load_average() -> list[float] | None:
    """The system's 1-, 5- and 15-minute load averages (runnable processes): how much else the machine was doing."""
    return [round(load, 2) for load in os.getloadavg()] if hasattr(os, "getloadavg") else None


def describe_machine(device: str) -> dict[str, Any]:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_cores_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "load_average": load_average(),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _package_version("transformers"),
        "timm": _package_version("timm"),
        "fastvlm_hf": _package_version("fastvlm-hf"),
        "git_commit": _git_commit(),
    }


def machine_line(machine: dict[str, Any]) -> str:
    hardware = machine["gpu"] or f"{machine['cpu']}, {machine['torch_threads']} of {machine['cpu_cores_usable']} cores"
    versions = ", ".join(f"{name} {machine[name]}" for name in ("torch", "transformers", "timm") if machine[name])
    commit = f", fastvlm-hf @ {machine['git_commit']}" if machine["git_commit"] else ""
    load = machine.get("load_average")
    load = f" · load {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min)" if load else ""
    return f"{machine['date_utc']} UTC · {hardware}{load} · {versions}{commit}"


# ----------------------------------------------------------------------------------------------------------------------
# Output


def write_results(path: Path | None, results: dict[str, Any], markdown: str) -> None:
    """Prints the Markdown; with a `path`, writes the results there as JSON and the Markdown beside it (`.md`)."""
    print(markdown)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    path.with_suffix(".md").write_text(markdown + "\n", encoding="utf-8")
    print(f"\nwrote {path} and {path.with_suffix('.md')}", file=sys.stderr)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
