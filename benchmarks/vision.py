"""FastViTHD latency: fastvlm_hf's `FastViTHDModel` against the vision tower transformers' own `fast_vlm` runs (timm's
`fastvit_mci3` in a `TimmWrapperModel`), on the same random weights, in one process, runs interleaved.

    python benchmarks/vision.py --output results/vision.json
    python benchmarks/vision.py --resolutions 256 --dtypes fp32,bf16 --repeats 1 --batch4-resolution 256   # smoke

Each row is one (resolution, dtype, batch): median (min–max) latency of each side, the speed-up (peer / ours) and the
GFLOP/s each reached, with the FLOPs counted once on our model.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings
from typing import Any

import _torchvision_shim  # noqa: F401  (first: before anything imports torchvision)
import torch
import transformers
from common import (
    DTYPES,
    Stats,
    Timings,
    add_common_arguments,
    configure_torch,
    count_flops,
    describe_machine,
    interleave,
    log,
    machine_line,
    markdown_table,
    parse_dtypes,
    parse_list,
    relative_error,
    write_results,
)
from models import give_fastvithd_working_weights

from fastvlm_hf import FastViTHDConfig, FastViTHDModel, FastVLMConfig, checkpoints

CHECK_TOLERANCE = 1e-3  # float32, relative to the largest feature: both sides must compute the same thing
_OURS_PREFIX = "model.vision_tower."  # where the vision tower sits in a FastVLM checkpoint


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--resolutions", default="256,512,768,1024,1536", help="square sides in pixels, comma-separated"
    )
    parser.add_argument(
        "--dtypes", type=parse_dtypes, default=["fp32", "bf16"], help="fp32, bf16, fp16 (default: fp32,bf16)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side per row, at least (default: 3)")
    parser.add_argument(
        "--min-seconds",
        type=float,
        default=1.0,
        help="keep timing a row until each side has run this long in total, up to 20 runs (default: 1.0)",
    )
    parser.add_argument("--batch4", action=argparse.BooleanOptionalAction, default=True, help="also time a batch of 4")
    parser.add_argument(
        "--batch4-resolution", type=int, default=1024, help="resolution of the batch of 4 (default: 1024)"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile both sides (ours with fullgraph=True); the first call's time is reported apart",
    )
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    args.resolutions = [int(side) for side in parse_list(args.resolutions)]
    if args.compile and args.warmup < 1:
        parser.error("--compile needs --warmup 1 or more: the first call compiles")
    return args


# ----------------------------------------------------------------------------------------------------------------------
# The two models


def build_ours(config: FastViTHDConfig, seed: int) -> FastViTHDModel:
    """Ours with random working weights, as constructed (not yet in eval mode)."""
    torch.manual_seed(seed)
    model = FastViTHDModel(config)
    give_fastvithd_working_weights(model, seed)
    return model


def timm_wrapper_config(config: FastViTHDConfig) -> transformers.TimmWrapperConfig:
    """The vision config transformers' `FastVlmConfig` makes of our vision config (on 4.57, which has no
    `FastVlmConfig`, the same `TimmWrapperConfig` built directly)."""
    native_kwargs = checkpoints.transformers_config_kwargs(FastVLMConfig(vision_config=config))
    if hasattr(transformers, "FastVlmConfig"):
        native_kwargs.pop("text_config")
        return transformers.FastVlmConfig(**native_kwargs).vision_config
    return transformers.TimmWrapperConfig(**native_kwargs["vision_config"], do_pooling=True)


def timm_state_dict(ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our vision-tower weights under the names of timm's model inside `TimmWrapperModel`."""
    in_checkpoint = {_OURS_PREFIX + key: tensor for key, tensor in ours.items()}
    native = checkpoints.from_fastvlm_state_dict(in_checkpoint, checkpoints.TRANSFORMERS)
    return {key.removeprefix(_OURS_PREFIX): tensor for key, tensor in native.items()}


def build_peer(config: FastViTHDConfig, ours: FastViTHDModel) -> torch.nn.Module:
    peer = transformers.AutoModel.from_config(timm_wrapper_config(config))
    peer.load_state_dict(timm_state_dict(ours.state_dict()), strict=True)
    return peer


def ready(model: torch.nn.Module, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """A copy moved and cast as `from_pretrained(dtype=...)` would load it, then in eval mode, as users run it."""
    return copy.deepcopy(model).to(device=device, dtype=dtype).eval()


def features(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(pixel_values, return_dict=True).last_hidden_state


# ----------------------------------------------------------------------------------------------------------------------
# Measurements


def check_same_features(ours: torch.nn.Module, peer: torch.nn.Module, side: int, device: str) -> dict[str, Any]:
    """Both sides in float32 on one image: the comparison is only fair if they compute the same features."""
    pixel_values = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(1)).to(device)
    ours_features = features(ready(ours, torch.float32, device), pixel_values)
    peer_features = features(ready(peer, torch.float32, device), pixel_values)
    error = relative_error(ours_features, peer_features)
    check = {
        "resolution": side,
        "relative_error_fp32": error,
        "feature_std": ours_features.float().std().item(),
        "feature_shape": list(ours_features.shape),
    }
    log(f"check @{side}px fp32: relative error {error:.2e}, feature std {check['feature_std']:.3g}")
    if not error <= CHECK_TOLERANCE:
        sys.exit(f"ours and the peer disagree (relative error {error:.3g} > {CHECK_TOLERANCE}): not the same work")
    return check


def count_model_flops(ours: torch.nn.Module, shapes: list[tuple[int, int]], device: str) -> dict[tuple[int, int], int]:
    """FLOPs of one forward of our model in eval mode per (resolution, batch), counted on the meta device (no real
    work), or on a real forward where the model cannot run there."""
    meta_model = ready(ours, torch.float32, "cpu").to("meta")
    return {(side, batch): _forward_flops(meta_model, ours, side, batch, device) for side, batch in shapes}


def _forward_flops(meta_model, ours, side: int, batch: int, device: str) -> int:
    try:
        with torch.inference_mode():
            return count_flops(lambda: meta_model(torch.empty(batch, 3, side, side, device="meta")))[0]
    except (NotImplementedError, RuntimeError):  # a data-dependent step
        model = ready(ours, torch.float32, device)
        with torch.inference_mode():
            return count_flops(lambda: model(torch.rand(batch, 3, side, side, device=device)))[0]


def warm_up_compiler() -> None:
    """Pays the compiler's one-off start-up (imports, caches) on a toy function, so that it does not land on the first
    side to compile."""
    torch.compile(lambda x: x * 2 + 1, fullgraph=True)(torch.ones(8))


def maybe_compile(ours: torch.nn.Module, peer: torch.nn.Module, enabled: bool):
    if not enabled:
        return ours, peer
    import torch._inductor.config as inductor_config

    # Cold compiles, as on a first run: with the on-disk caches, compile time depends on what ran before.
    inductor_config.force_disable_caches = True
    warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")  # says just that, once
    warm_up_compiler()
    # One graph per input shape (dynamic=False): each resolution is compiled for itself, on both sides.
    return torch.compile(ours, fullgraph=True, dynamic=False), torch.compile(peer, dynamic=False)


def time_row(ours, peer, side: int, batch: int, dtype: torch.dtype, args: argparse.Namespace) -> Timings:
    generator = torch.Generator().manual_seed(args.seed + side)
    pixel_values = torch.rand(batch, 3, side, side, generator=generator).to(device=args.device, dtype=dtype)

    def run(model):
        with torch.inference_mode():
            return model(pixel_values)

    return interleave(
        {"ours": lambda: run(ours), "peer": lambda: run(peer)},
        device=args.device,
        warmup=args.warmup,
        repeats=args.repeats,
        min_seconds=args.min_seconds,
        max_repeats=max(args.repeats, 20),
    )


def row_result(side: int, batch: int, dtype_name: str, flops: int, timings: Timings, compiled: bool) -> dict[str, Any]:
    ours, peer = timings.stats("ours"), timings.stats("peer")
    result = {
        "resolution": side,
        "batch": batch,
        "dtype": dtype_name,
        "gflop": flops / 1e9,
        "ours_s": timings.samples["ours"],
        "peer_s": timings.samples["peer"],
        "ours_median_s": ours.median,
        "peer_median_s": peer.median,
        "speedup": peer.median / ours.median,
        "ours_gflops_per_s": flops / 1e9 / ours.median,
        "peer_gflops_per_s": flops / 1e9 / peer.median,
    }
    if compiled:
        result["ours_first_call_s"] = timings.first_call["ours"]
        result["peer_first_call_s"] = timings.first_call["peer"]
    return result


def rows_to_time(args: argparse.Namespace) -> list[tuple[int, int]]:
    rows = [(side, 1) for side in args.resolutions]
    if args.batch4:
        rows.append((args.batch4_resolution, 4))
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# Report


def markdown(results: dict[str, Any]) -> str:
    compiled = results["settings"]["compile"]
    headers = [
        "px",
        "dtype",
        "batch",
        "GFLOP",
        "ours ms",
        "peer ms",
        "speed-up (peer/ours)",
        "ours GFLOP/s",
        "peer GFLOP/s",
    ]
    if compiled:
        headers += ["ours first call s", "peer first call s"]
    rows = []
    for row in results["rows"]:
        ours, peer = Stats.of(row["ours_s"]), Stats.of(row["peer_s"])
        cells = [
            row["resolution"], row["dtype"], row["batch"], f"{row['gflop']:.1f}", ours.ms(), peer.ms(),
            f"{row['speedup']:.2f}×", f"{row['ours_gflops_per_s']:.0f}", f"{row['peer_gflops_per_s']:.0f}",
        ]  # fmt: skip
        if compiled:
            cells += [f"{row['ours_first_call_s']:.1f}", f"{row['peer_first_call_s']:.1f}"]
        rows.append(cells)
    check = results["check"]
    mode = "torch.compile" if compiled else "eager"
    footnote = (
        f"Milliseconds, median (min–max) of interleaved runs; same weights on both sides (float32 features agree to "
        f"{check['relative_error_fp32']:.1e} relative at {check['resolution']} px). FLOPs counted with "
        f"FlopCounterMode on our model."
    )
    return "\n\n".join(
        [
            f"### FastViTHD latency: fastvlm_hf vs transformers' TimmWrapperModel(fastvit_mci3) ({mode})",
            f"Machine: {machine_line(results['machine'])}",
            markdown_table(headers, rows),
            footnote,
        ]
    )


# ----------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    configure_torch(args)
    transformers.logging.set_verbosity_error()
    config = FastViTHDConfig()
    fused = os.environ.get("TIMM_FUSED_ATTN", "default")
    log(f"building FastViTHD (ours) and TimmWrapperModel(fastvit_mci3) (peer); TIMM_FUSED_ATTN={fused}")
    ours_master = build_ours(config, args.seed)
    peer_master = build_peer(config, ours_master)
    results: dict[str, Any] = {
        "benchmark": "vision",
        "machine": describe_machine(args.device),
        "settings": {key: value for key, value in vars(args).items() if key != "output"},
        "check": check_same_features(ours_master, peer_master, min(args.resolutions), args.device),
        "rows": [],
    }
    flops = count_model_flops(ours_master, rows_to_time(args), args.device)
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        ours, peer = maybe_compile(
            ready(ours_master, dtype, args.device), ready(peer_master, dtype, args.device), args.compile
        )
        for side, batch in rows_to_time(args):
            log(f"timing {side}px {dtype_name} batch {batch}")
            timings = time_row(ours, peer, side, batch, dtype, args)
            row = row_result(side, batch, dtype_name, flops[side, batch], timings, args.compile)
            ours_ms, peer_ms = Stats.of(row["ours_s"]).ms(), Stats.of(row["peer_s"]).ms()
            log(f"  ours {ours_ms} ms, peer {peer_ms} ms, speed-up {row['speedup']:.2f}×")
            results["rows"].append(row)
        del ours, peer
    write_results(args.output, results, markdown(results))


if __name__ == "__main__":
    main()
