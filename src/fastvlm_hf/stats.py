"""Timing of one generation, phase by phase, for any transformers vision-language model, and the statistics and
Markdown tables that report timings.

[`GenerationTimer`] measures:

- **preprocessing**: the processor call (image resizing and tokenization), timed by [`GenerationTimer.preprocessing`];
- **vision**: the vision encoder and the projector, from forward hooks on the model's vision tower and projector;
- **prefill**: the first forward pass of the whole model minus the vision part inside it;
- **TTFT** (time to first token): from entering the timer to the first generated token;
- **decode**: from the first generated token to the last, per token, and as tokens per second.

Tokens are timestamped by a streamer ([`GenerationTimer.streamer`]) passed to `generate`; it can forward to another
streamer, such as transformers' `TextStreamer`. On CUDA and MPS the device is synchronized at each measured boundary,
so a phase's time includes the kernels it launched.

Example:

```python
>>> timer = GenerationTimer(model, streamer=TextStreamer(processor.tokenizer, skip_prompt=True))
>>> with timer:
...     with timer.preprocessing():
...         inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
...                                                return_dict=True, return_tensors="pt")
...     model.generate(**inputs, streamer=timer.streamer, max_new_tokens=64)
>>> print(timer.timings().as_dict())
```
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.generation import BaseStreamer

# Attribute names of the vision encoder and of the projector in transformers' vision-language models (Llava and its
# descendants, FastVLM among them) and in Apple's LLaVA code.
VISION_MODULE_NAMES = ("vision_tower", "vision_model", "visual", "image_encoder")
PROJECTOR_MODULE_NAMES = ("multi_modal_projector", "mm_projector", "projector")


@dataclass
class GenerationTimings:
    """Seconds spent in each phase of one generation; `None` where a phase was not measured."""

    preprocess_s: float | None
    vision_s: float | None
    prefill_s: float | None
    ttft_s: float | None
    decode_s: float | None
    prompt_tokens: int | None
    new_tokens: int

    @property
    def decode_ms_per_token(self) -> float | None:
        """Mean time between generated tokens after the first."""
        if self.decode_s is None or self.new_tokens < 2:
            return None
        return 1000 * self.decode_s / (self.new_tokens - 1)

    @property
    def tokens_per_s(self) -> float | None:
        ms_per_token = self.decode_ms_per_token
        return None if not ms_per_token else 1000 / ms_per_token

    def as_dict(self) -> dict[str, float | int | None]:
        """Milliseconds per phase and token counts, JSON-ready."""
        return {
            "preprocess_ms": _ms(self.preprocess_s),
            "vision_ms": _ms(self.vision_s),
            "prefill_ms": _ms(self.prefill_s),
            "ttft_ms": _ms(self.ttft_s),
            "decode_ms_per_token": _round(self.decode_ms_per_token),
            "tokens_per_s": _round(self.tokens_per_s),
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
        }

    def report_lines(self) -> list[str]:
        """Human-readable lines, one per phase."""
        decode = f"{_text(self.decode_ms_per_token)} ms/token, {_text(self.tokens_per_s)} tokens/s"
        return [
            f"preprocessing    {_text(_ms(self.preprocess_s))} ms",
            f"vision encoder   {_text(_ms(self.vision_s))} ms",
            f"prefill          {_text(_ms(self.prefill_s))} ms",
            f"TTFT             {_text(_ms(self.ttft_s))} ms",
            f"decode           {decode} ({self.new_tokens} new tokens, {self.prompt_tokens} prompt tokens)",
        ]


class TokenClock(BaseStreamer):
    """A streamer that records when each generated token arrives, then hands it to `inner` (if any).

    `generate` first puts the prompt ids, then each new token (or a batch of them, one per sequence).
    """

    def __init__(self, inner: BaseStreamer | None = None):
        self.inner = inner
        self.prompt_seen = False
        self.token_times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.token_times.append(time.perf_counter())
        self.prompt_seen = True
        if self.inner is not None:
            self.inner.put(value)

    def end(self) -> None:
        if self.inner is not None:
            self.inner.end()


class GenerationTimer:
    """Context manager that times the phases of one `generate` call on `model` (see the module docstring).

    Args:
        model: the model whose `generate` is timed; hooks go on it and on its vision tower and projector.
        streamer: an optional streamer that [`GenerationTimer.streamer`] forwards tokens to.
    """

    def __init__(self, model: nn.Module, streamer: BaseStreamer | None = None):
        self.model = model
        self.streamer = TokenClock(streamer)
        self._device = _device_of(model)
        self._start: float | None = None
        self._preprocess_s: float | None = None
        self._vision_started_at: float | None = None
        self._vision_intervals: list[tuple[float, float]] = []
        self._forward_started_at: float | None = None
        self._first_forward: tuple[float, float] | None = None
        self._handles: list = []

    def __enter__(self) -> GenerationTimer:
        self._install_hooks()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @contextlib.contextmanager
    def preprocessing(self):
        """Times the block inside it as the preprocessing phase."""
        start = time.perf_counter()
        yield
        self._preprocess_s = time.perf_counter() - start

    def timings(self, prompt_tokens: int | None = None) -> GenerationTimings:
        """The measured phases; `prompt_tokens` is reported as given."""
        token_times = self.streamer.token_times
        vision_s = sum(end - start for start, end in self._vision_intervals) if self._vision_intervals else None
        prefill_s = None
        if self._first_forward is not None:
            forward_start, forward_end = self._first_forward
            inside = sum(min(end, forward_end) - max(start, forward_start) for start, end in self._vision_intervals
                         if start < forward_end and end > forward_start)  # fmt: skip
            prefill_s = forward_end - forward_start - inside
        return GenerationTimings(
            preprocess_s=self._preprocess_s,
            vision_s=vision_s,
            prefill_s=prefill_s,
            ttft_s=token_times[0] - self._start if token_times and self._start is not None else None,
            decode_s=token_times[-1] - token_times[0] if token_times else None,
            prompt_tokens=prompt_tokens,
            new_tokens=len(token_times),
        )

    def _install_hooks(self) -> None:
        vision = _find_module(self.model, VISION_MODULE_NAMES)
        projector = _find_module(self.model, PROJECTOR_MODULE_NAMES)
        if vision is not None:
            self._handles.append(vision.register_forward_pre_hook(self._vision_started))
            last_vision_module = projector if projector is not None else vision
            self._handles.append(last_vision_module.register_forward_hook(self._vision_ended))
        self._handles.append(self.model.register_forward_pre_hook(self._forward_started))
        self._handles.append(self.model.register_forward_hook(self._forward_ended))

    def _now(self) -> float:
        synchronize(self._device)
        return time.perf_counter()

    def _vision_started(self, module, args) -> None:
        self._vision_started_at = self._now()

    def _vision_ended(self, module, args, output) -> None:
        if self._vision_started_at is not None:
            self._vision_intervals.append((self._vision_started_at, self._now()))
            self._vision_started_at = None

    def _forward_started(self, module, args) -> None:
        if self._forward_started_at is None:
            self._forward_started_at = self._now()

    def _forward_ended(self, module, args, output) -> None:
        if self._first_forward is None:
            self._first_forward = (self._forward_started_at, self._now())


def summarize(values: list[float | None]) -> tuple[float, float, float] | None:
    """(median, min, max) of the measured values, or `None` when none was measured."""
    measured = [value for value in values if value is not None]
    if not measured:
        return None
    return statistics.median(measured), min(measured), max(measured)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right_aligned: Collection[int] = ()) -> str:
    """A Markdown table of `rows` under `headers`, each cell as `str` writes it; the columns whose index is in
    `right_aligned` (numbers) are right-aligned."""
    rule = ["---:" if index in right_aligned else "---" for index in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def synchronize(device: torch.device | str) -> None:
    """Waits for the kernels queued on `device` (CUDA or MPS) to finish, so that a clock read next counts them;
    nothing to wait for on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _find_module(model: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    """The outermost submodule whose attribute name is one of `names`."""
    for path, module in model.named_modules():
        if path and path.rsplit(".", 1)[-1] in names:
            return module
    return None


def _device_of(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 3)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


__all__ = ["GenerationTimer", "GenerationTimings", "TokenClock", "markdown_table", "summarize", "synchronize"]
