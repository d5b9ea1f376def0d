"""The memory of this process: its resident set and the set's high-water mark on CPU, tensor allocations on CUDA.

Imports torch only, so that a process can read its memory before it imports transformers (`memory.py`'s worker).
"""

from __future__ import annotations

import sys

import torch


def reset_peak_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def process_status_bytes(field: str) -> int | None:
    """A memory figure of this process from Linux's /proc/self/status ("VmRSS", "VmHWM"), or None elsewhere."""
    try:
        with open("/proc/self/status", encoding="utf-8") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_in_use_bytes(device: str) -> int | None:
    """CUDA: the tensor memory allocated now. CPU: the process's resident set now (Linux), or None elsewhere."""
    return torch.cuda.memory_allocated() if device == "cuda" else process_status_bytes("VmRSS")


def peak_memory_bytes(device: str) -> int | None:
    """CUDA: the peak of allocated tensor memory since the last reset. CPU: the process's resident set high-water mark
    (it never goes down, so measure one model per process)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    peak = process_status_bytes("VmHWM")  # getrusage's ru_maxrss would start from the parent's peak in a child process
    if peak is not None:
        return peak
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere
