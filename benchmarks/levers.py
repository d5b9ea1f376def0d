"""What each speed lever of `FastViTHDModel` gives: the encoder as shipped against the same encoder with one lever
switched off at a time, and with all of them off (the blocks as the paper writes them: NCHW, the activation and the
BatchNorm each after their convolution, `x + gamma * f(x)`, the channel LayerNorm by its formula). One process, the
same weights, runs interleaved.

    python benchmarks/levers.py --output benchmarks/results/levers.json
    python benchmarks/levers.py --resolution 256 --repeats 1 --dtypes bf16        # smoke

Also times the language model's levers on Qwen2-0.5B in bf16: its linear weights packed for oneDNN's CPU kernels
(`pack_weights()`) against plain ones, for the prefill of a 282-token prompt and for one decoding step after it; and the
prefill's output head on the last position only (`logits_to_keep=1`, what `generate` asks for) against all positions.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
from collections.abc import Callable, Iterator

import _torchvision_shim  # noqa: F401  (first: before anything imports torchvision)
import torch
from common import (
    DTYPES,
    Stats,
    add_common_arguments,
    configure_torch,
    describe_machine,
    interleave,
    log,
    machine_line,
    markdown_table,
    parse_dtypes,
    patched,
    relative_error,
    write_results,
)
from models import QWEN2_COMMON, QWEN2_SIZES, give_fastvithd_working_weights

from transformers import DynamicCache

from fastvlm_hf import FastViTHDConfig, FastViTHDModel, FastVLMConfig, FastVLMForConditionalGeneration
from fastvlm_hf import modeling_fastvithd as fastvithd
from fastvlm_hf.compat import CACHE_NAME
from fastvlm_hf.cpu import settings as cpu_settings

PROMPT_TOKENS = 282  # 256 image tokens at 1024 px and predict.py's prompt in the chat template


def _unfolded_conv_norm(self, hidden_states):
    return self.bn(self.conv(hidden_states))


def _unfused_layer_scale(self, residual, branch):
    return residual + self.gamma * branch


def _activation_on_the_tensor(self, hidden_states):
    return self.fn(hidden_states)


def _layer_norm_by_formula(self, hidden_states):
    mean = hidden_states.mean(dim=1, keepdim=True)
    variance = (hidden_states - mean).pow(2).mean(dim=1, keepdim=True)
    hidden_states = (hidden_states - mean) * torch.rsqrt(variance + self.eps)
    return hidden_states * self.weight[:, None, None] + self.bias[:, None, None]


@contextlib.contextmanager
def _nchw_activations(model: FastViTHDModel) -> Iterator[None]:
    """The stem handed its input in NCHW instead of channels last: every activation after it stays NCHW (one more
    copy of the image than the encoder as shipped makes, next to nothing beside the encoder's work)."""
    handle = model.get_input_embeddings().register_forward_pre_hook(lambda module, args: (args[0].contiguous(),))
    try:
        yield
    finally:
        handle.remove()


# Each lever: how to switch it off in a given encoder.
LEVERS: dict[str, Callable[[FastViTHDModel], contextlib.AbstractContextManager]] = {
    "convolution + activation as one oneDNN kernel": lambda model: patched(
        cpu_settings, "onednn_fusion_min_pixels", math.inf
    ),
    "channels-last activations": _nchw_activations,
    "ConvFFN BatchNorm folded in eval": lambda model: patched(
        fastvithd.FastViTHDConvNorm, "forward", _unfolded_conv_norm
    ),
    "layer scale + residual in one op": lambda model: patched(
        fastvithd.FastViTHDLayerScale, "forward", _unfused_layer_scale
    ),
    "activations on the NHWC view": lambda model: patched(
        fastvithd.FastViTHDActivation, "forward", _activation_on_the_tensor
    ),
    "LayerNorm2d as F.layer_norm": lambda model: patched(
        fastvithd.FastViTHDLayerNorm2d, "forward", _layer_norm_by_formula
    ),
    "downsampling convolutions as depthwise ones": lambda model: patched(
        cpu_settings, "depthwise_duplicate_max_bytes", 0
    ),
    "ConvFFN pointwise layers in pixel chunks": lambda model: patched(
        cpu_settings, "convffn_chunking_min_bytes", math.inf
    ),
    "ConvFFN pointwise layers of small maps as linear layers": lambda model: patched(
        cpu_settings, "convffn_linear_max_pixels_per_channel", 0
    ),
    "stem in row bands": lambda model: patched(cpu_settings, "stem_banding_min_bytes", math.inf),
}


def all_levers_off(model: FastViTHDModel) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    for switch_off in LEVERS.values():
        stack.enter_context(switch_off(model))
    return stack


def vision_variants() -> dict[str, Callable[[FastViTHDModel], contextlib.AbstractContextManager]]:
    variants = {"as shipped": lambda model: contextlib.nullcontext()}
    variants.update({f"without {name}": switch_off for name, switch_off in LEVERS.items()})
    variants["without any lever"] = all_levers_off
    return variants


def time_vision(args: argparse.Namespace, dtype_name: str) -> list[list[str]]:
    model = FastViTHDModel(FastViTHDConfig())
    give_fastvithd_working_weights(model, args.seed)
    model = model.to(args.device, DTYPES[dtype_name]).eval()
    pixel_values = torch.rand(1, 3, args.resolution, args.resolution, device=args.device, dtype=DTYPES[dtype_name])
    variants = vision_variants()

    def run(context):
        def call():
            with context(model), torch.inference_mode():
                return model(pixel_values).last_hidden_state

        return call

    runs = {name: run(context) for name, context in variants.items()}
    reference = runs["without any lever"]().float()
    for name, call in runs.items():
        error = relative_error(call().float(), reference)
        log(f"{dtype_name} {name}: relative difference to the plain path {error:.1e}")
    log(f"timing {len(runs)} variants @{args.resolution}px {dtype_name}")
    timings = interleave(runs, args.device, args.warmup, args.repeats)
    shipped = timings.stats("as shipped").median
    rows = []
    for name in runs:
        stats = timings.stats(name)
        rows.append([dtype_name, name, stats.ms(), f"{stats.median / shipped:.2f}×"])
    return rows


def time_language_model(args: argparse.Namespace) -> list[list[str]]:
    """Qwen2-0.5B in bf16: the prefill of the prompt and one decoding step after it, with the language model's linear
    weights packed for oneDNN (`pack_weights()`) or plain, and the prefill's output head on the last position or all."""
    config = FastVLMConfig(text_config={**QWEN2_COMMON, **QWEN2_SIZES["0.5b"]})
    torch.manual_seed(args.seed)
    plain = FastVLMForConditionalGeneration(config).to(args.device, torch.bfloat16).eval()
    packed = copy.deepcopy(plain)
    packed.pack_weights()
    models = {"packed": packed, "plain": plain}
    input_ids = torch.randint(0, 151000, (1, PROMPT_TOKENS), device=args.device)
    next_token = input_ids[:, -1:]
    caches = {}
    with torch.inference_mode():
        for name, model in models.items():
            caches[name] = DynamicCache()
            model(input_ids=input_ids, logits_to_keep=1, **{CACHE_NAME: caches[name]})

    def prefill(model, logits_to_keep: int):
        def call():
            with torch.inference_mode():
                return model(input_ids=input_ids, logits_to_keep=logits_to_keep).logits

        return call

    def decode_step(name: str):
        def call():
            with torch.inference_mode():
                logits = models[name](input_ids=next_token, logits_to_keep=1, **{CACHE_NAME: caches[name]}).logits
            caches[name].crop(-1)  # drop the step's token again
            return logits

        return call

    runs = {
        "prefill, packed weights, head on the last position": prefill(packed, 1),
        "prefill, plain weights, head on the last position": prefill(plain, 1),
        "prefill, packed weights, head on all positions": prefill(packed, 0),
    }
    plain_logits = runs["prefill, plain weights, head on the last position"]()[:, -1].float()
    for name, call in runs.items():
        error = relative_error(call()[:, -1].float(), plain_logits)
        log(f"{name}: relative difference to plain weights {error:.1e}")
    log(f"timing Qwen2-0.5B prefill of {PROMPT_TOKENS} tokens (bf16)")
    prefill_timings = interleave(runs, args.device, args.warmup, args.repeats)
    steps = {"decode step, packed weights": decode_step("packed"), "decode step, plain weights": decode_step("plain")}
    log("timing Qwen2-0.5B decoding steps (bf16)")
    step_timings = interleave(steps, args.device, args.warmup, 10 * args.repeats)
    rows = []
    for timings, reference in ((prefill_timings, next(iter(runs))), (step_timings, next(iter(steps)))):
        shipped = timings.stats(reference).median
        for name, samples in timings.samples.items():
            stats = Stats.of(samples)
            rows.append(["bf16", f"Qwen2-0.5B {name}", stats.ms(), f"{stats.median / shipped:.2f}×"])
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--dtypes", type=parse_dtypes, default=["fp32", "bf16"], help="default: fp32,bf16")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each variant (default: 3)")
    parser.add_argument("--no-language-model", action="store_true", help="skip the language model's levers")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    configure_torch(args)

    rows = []
    for dtype_name in args.dtypes:
        rows += time_vision(args, dtype_name)
    if not args.no_language_model:
        rows += time_language_model(args)
    machine = describe_machine(args.device)
    headers = ["dtype", "variant", "median (min–max) ms", "time / as shipped"]
    markdown = "\n".join(
        [
            f"FastViTHD @{args.resolution}px, batch 1, {args.threads} threads: each lever switched off in turn",
            "",
            markdown_table(headers, rows),
            "",
            machine_line(machine),
        ]
    )
    settings = {key: value for key, value in vars(args).items() if key != "output"}
    write_results(args.output, {"machine": machine, "settings": settings, "rows": rows}, markdown)


if __name__ == "__main__":
    main()
