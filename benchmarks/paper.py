"""The FastVLM paper's headline comparison, measured with the implementations users run in transformers: FastVLM-0.5B
(fastvlm_hf, bf16, packed weights as the CLI runs it) at 1024 px and 1152 px against transformers' own
`LlavaOnevisionForConditionalGeneration` with LLaVA-OneVision-0.5B's configuration on the same 1152 x 1152 image, in
one process, runs interleaved. The paper (Apple M1): 85x faster time to first token than LLaVA-OneVision-0.5B at
1152 px, and a vision encoder 3.4x smaller (FastViTHD 125 M against SigLIP-so400m 430 M parameters).

    python benchmarks/paper.py --output results/paper.json
    python benchmarks/paper.py --layers 1 --image-size 384 --resolutions 256 --repeats 1 --no-memory   # smoke

Random weights at the real shapes (the architecture decides the cost, not the values). LLaVA-OneVision-0.5B
(llava-hf/llava-onevision-qwen2-0.5b-ov-hf): SigLIP-so400m-patch14-384 without its last layer and pooling head,
2-layer GELU projector, Qwen2-0.5B; its processor tiles the image on its anyres grid (a 1152 x 1152 image: 3 x 3 tiles
of 384 px plus the whole image at 384 px, 729 tokens each, the grid's tokens with a newline token per row: 7371 image
tokens). Both language models keep Qwen2's vocabulary size (151936 rows); the prompt ("Describe the image in detail."
in ChatML with the default system prompt) and the tokenizer (ttft.py's) are the same on both sides.

- TTFT: the processor on the image and chat, then `generate(max_new_tokens=1)`.
- Encoder: the vision encoder and projector on the processed image (`get_image_features`), timed on its own; the
  preprocessing is timed on its own too. What is left of the TTFT is mostly the language model's prefill.
- Image tokens: those the processor writes into the prompt; checked against the features the encoder returns.
- FLOPs (FlopCounterMode): the encoder and projector on the processed image (all of LLaVA-OneVision's tiles), and one
  whole TTFT run.
- Peak memory: one child process per model (CPU: resident-set high-water mark; CUDA: peak allocated).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import _torchvision_shim  # noqa: F401  (first: before anything imports torchvision)
import torch
import transformers
from common import (
    REPO,
    Stats,
    add_common_arguments,
    configure_torch,
    count_flops,
    default_dtype,
    describe_machine,
    interleave,
    load_average,
    log,
    machine_line,
    markdown_table,
    matmul_flops_per_second,
    memory_baseline,
    parse_list,
    peak_cell,
    probe_memory,
    report_memory,
    write_results,
)
from PIL import Image, ImageOps
from models import (
    DEFAULT_IMAGE,
    QWEN2_COMMON,
    QWEN2_SIZES,
    Side,
    build_ours,
    build_tokenizer,
    fastvlm_config,
    generation_kwargs,
    rgb_image,
)

from fastvlm_hf import FastVLMImageProcessor, FastVLMProcessor
from fastvlm_hf.processing_fastvlm import DEFAULT_CHAT_TEMPLATE

DTYPE = torch.bfloat16
# google/siglip-so400m-patch14-384 as LLaVA-OneVision runs it: 26 of its 27 layers, no pooling head.
SIGLIP_SO400M = {
    "model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 26,
    "num_attention_heads": 16, "patch_size": 14, "image_size": 384, "vision_use_head": False,
}  # fmt: skip
SIGLIP_MEAN_STD = [0.5, 0.5, 0.5]  # SigLIP's image processor normalises to [-1, 1]
PAPER = {"ttft": 85.0, "encoder_params": 3.4}


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--resolutions", default="1024,1152", help="FastVLM's input sizes, comma-separated (default: 1024,1152)"
    )
    parser.add_argument(
        "--image-size", type=int, default=1152, help="side of the square image both sides get (default: 1152)"
    )
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="cropped to a square (default: house.png)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side (default: 3)")
    parser.add_argument(
        "--layers", type=int, help="override every transformer's number of layers, both sides (smoke runs)"
    )
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True, help="measure peak memory")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)  # the child process of --memory: a contender's key
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    args.resolutions = [int(side) for side in parse_list(args.resolutions)]
    return args


# ----------------------------------------------------------------------------------------------------------------------
# The contenders


@dataclasses.dataclass
class Contender:
    key: str
    model_name: str
    resolution: int  # the encoder's input side (LLaVA-OneVision: the image's, which it tiles)
    side: Side
    encode: Callable[[dict[str, torch.Tensor]], Any]  # processed inputs -> projected image features
    encoder: torch.nn.Module
    projector: torch.nn.Module


def fastvlm_key(resolution: int) -> str:
    return f"fastvlm@{resolution}"


def llava_key(args: argparse.Namespace) -> str:
    return f"llava-onevision@{args.image_size}"


def square_image(args: argparse.Namespace) -> Image.Image:
    return ImageOps.fit(rgb_image(args.image), (args.image_size, args.image_size), Image.Resampling.BICUBIC)


def build_fastvlm(args: argparse.Namespace, tokenizer) -> torch.nn.Module:
    """FastVLM-0.5B as the CLI runs it: bf16, eval, the language model's weights packed on CPU. The encoder is
    resolution-free, so one model serves every input size."""
    config = fastvlm_config("0.5b", args.layers, 1024, tokenizer)
    model = build_ours(config, DTYPE, args.device, args.seed).eval()
    if args.device == "cpu":
        model.pack_weights()
    return model


def fastvlm_contender(model, resolution: int, args, tokenizer, image) -> Contender:
    processor = FastVLMProcessor(image_processor=FastVLMImageProcessor(size=resolution), tokenizer=tokenizer)

    def encode(inputs):
        return model.model.get_image_features(inputs["pixel_values"]).pooler_output

    side = Side(model, processor, image, args.device, generation_kwargs(tokenizer))
    return Contender(
        fastvlm_key(resolution), "FastVLM-0.5B", resolution, side, encode, model.model.vision_tower,
        model.model.multi_modal_projector,
    )  # fmt: skip


def llava_onevision_config(args: argparse.Namespace, tokenizer) -> transformers.LlavaOnevisionConfig:
    text_config = {**QWEN2_COMMON, **QWEN2_SIZES["0.5b"]}
    vision_config = dict(SIGLIP_SO400M)
    if args.layers:
        text_config["num_hidden_layers"] = vision_config["num_hidden_layers"] = args.layers
    return transformers.LlavaOnevisionConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=text_config["tie_word_embeddings"],
    )


def llava_onevision_processor(config, tokenizer) -> transformers.LlavaOnevisionProcessor:
    # The PIL image processor where transformers has one (5.x), the NumPy one before: neither needs torchvision.
    image_processor_class = getattr(transformers, "LlavaOnevisionImageProcessorPil", None)
    image_processor_class = image_processor_class or transformers.LlavaOnevisionImageProcessor
    vision = config.vision_config
    return transformers.LlavaOnevisionProcessor(
        image_processor=image_processor_class(
            size={"height": vision.image_size, "width": vision.image_size},
            image_grid_pinpoints=config.image_grid_pinpoints,
            image_mean=SIGLIP_MEAN_STD,
            image_std=SIGLIP_MEAN_STD,
        ),
        tokenizer=tokenizer,
        video_processor=transformers.LlavaOnevisionVideoProcessor(),
        num_image_tokens=(vision.image_size // vision.patch_size) ** 2,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        vision_aspect_ratio=config.vision_aspect_ratio,
        chat_template=DEFAULT_CHAT_TEMPLATE,
    )


def build_llava_onevision(args: argparse.Namespace, tokenizer) -> torch.nn.Module:
    """transformers' LLaVA-OneVision with random weights, built directly in bf16 as `from_pretrained` loads it."""
    torch.manual_seed(args.seed)
    with torch.device(args.device), default_dtype(DTYPE):
        return transformers.LlavaOnevisionForConditionalGeneration(llava_onevision_config(args, tokenizer)).eval()


def llava_onevision_contender(model, args, tokenizer, image) -> Contender:
    config = model.config
    processor = llava_onevision_processor(config, tokenizer)

    def encode(inputs):
        return model.model.get_image_features(
            inputs["pixel_values"].to(model.dtype),
            inputs["image_sizes"],
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            vision_aspect_ratio=config.vision_aspect_ratio,
            batch_num_images=inputs["batch_num_images"],
        ).pooler_output

    side = Side(model, processor, image, args.device, generation_kwargs(tokenizer))
    return Contender(
        llava_key(args), "LLaVA-OneVision-0.5B", args.image_size, side, encode, model.model.vision_tower,
        model.model.multi_modal_projector,
    )  # fmt: skip


def offline_tokenizer():
    """ttft.py's tokenizer, plus the `<video>` token LLaVA-OneVision's processor asks for (the prompt has none)."""
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<video>"]})
    return tokenizer


# ----------------------------------------------------------------------------------------------------------------------
# Measurements


def parameters(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def feature_rows(features) -> int:
    """Rows of projected image features: one per image token the language model receives."""
    return sum(feature.reshape(-1, feature.shape[-1]).shape[0] for feature in features)


def describe(contender: Contender) -> dict[str, Any]:
    """Tokens, parameters and FLOPs of one contender; checks that its processor writes as many image tokens as its
    encoder returns features."""
    inputs = contender.side.inputs()
    input_ids = inputs["input_ids"]
    image_tokens = int((input_ids == contender.side.model.config.image_token_id).sum())
    with torch.inference_mode():
        encoder_flops, features = count_flops(partial(contender.encode, inputs))
    if feature_rows(features) != image_tokens:
        sys.exit(f"{contender.key}: {image_tokens} image tokens in the prompt, {feature_rows(features)} features")
    ttft_flops = count_flops(partial(contender.side.generate, 1))[0]  # fails if the model rejects the tokens
    return {
        "model": contender.model_name,
        "resolution": contender.resolution,
        "pixel_values_shape": list(inputs["pixel_values"].shape),
        "image_tokens": image_tokens,
        "prompt_tokens": input_ids.shape[1],
        "encoder_params": parameters(contender.encoder),
        "projector_params": parameters(contender.projector),
        "encoder_flops": encoder_flops,
        "ttft_flops": ttft_flops,
    }


def encode_runs(contenders: dict[str, Contender]) -> tuple[dict[str, Callable], dict[str, Callable]]:
    """The encoder of each contender on its processed inputs (prepared once per call, untimed)."""

    def run(contender, inputs):
        with torch.inference_mode():
            return contender.encode(inputs)

    runs = {key: partial(run, contender) for key, contender in contenders.items()}
    prepare = {key: contender.side.inputs for key, contender in contenders.items()}
    return runs, prepare


def measure(contenders: dict[str, Contender], args: argparse.Namespace) -> dict[str, Any]:
    log("tokens, parameters, FLOPs")
    described = {}
    for key, contender in contenders.items():
        described[key] = describe(contender)
        log(f"  {key}: {described[key]}")
    text_tokens = {key: row["prompt_tokens"] - row["image_tokens"] for key, row in described.items()}
    if len(set(text_tokens.values())) != 1:
        sys.exit(f"the processors build different text around the image: {text_tokens}")
    device = args.device
    log("preprocessing")
    preprocess_runs = {key: contender.side.inputs for key, contender in contenders.items()}
    preprocess = interleave(preprocess_runs, device, warmup=1, repeats=max(args.repeats, 5))
    log("encoder")
    runs, prepare = encode_runs(contenders)
    encoder = interleave(runs, device, warmup=args.warmup, repeats=args.repeats, prepare=prepare)
    log("TTFT")
    ttft_runs = {key: partial(contender.side.generate, 1) for key, contender in contenders.items()}
    ttft = interleave(ttft_runs, device, warmup=args.warmup, repeats=args.repeats)
    log(f"load average after the timed runs: {load_average()}")
    return {
        key: {
            **described[key],
            "preprocess_s": preprocess.samples[key],
            "encoder_s": encoder.samples[key],
            "ttft_s": ttft.samples[key],
        }
        for key in contenders
    }


# ----------------------------------------------------------------------------------------------------------------------
# Peak memory, one child process per contender


def memory_probe(args: argparse.Namespace) -> None:
    """Child process: builds one contender's model as the parent does, runs one TTFT, prints its memory."""
    tokenizer = offline_tokenizer()
    image = square_image(args)
    baseline = memory_baseline(args.device)
    if args.memory_probe == llava_key(args):
        contender = llava_onevision_contender(build_llava_onevision(args, tokenizer), args, tokenizer, image)
    else:
        (resolution,) = [side for side in args.resolutions if fastvlm_key(side) == args.memory_probe]
        contender = fastvlm_contender(build_fastvlm(args, tokenizer), resolution, args, tokenizer, image)
    contender.side.generate(1)
    report_memory(args.device, baseline, contender.side.model)


def measure_memory(key: str, args: argparse.Namespace) -> dict[str, Any] | None:
    command = [
        str(Path(__file__).resolve()), "--memory-probe", key, "--resolutions", ",".join(map(str, args.resolutions)),
        "--image-size", str(args.image_size), "--image", str(args.image), "--device", args.device,
        "--threads", str(args.threads), "--seed", str(args.seed),
    ]  # fmt: skip
    if args.layers:
        command += ["--layers", str(args.layers)]
    return probe_memory(command, key)


# ----------------------------------------------------------------------------------------------------------------------
# Report


def summarize(rows: dict[str, dict[str, Any]], peer: str) -> list[dict[str, Any]]:
    """The ratios LLaVA-OneVision / FastVLM at each of FastVLM's resolutions (medians for times)."""
    ratios = []
    for key, row in rows.items():
        if key == peer:
            continue
        ratio = {name: rows[peer][name] / row[name] for name in ("image_tokens", "encoder_params", "encoder_flops")}
        ratio["ttft_flops"] = rows[peer]["ttft_flops"] / row["ttft_flops"]
        for name in ("encoder_s", "ttft_s"):
            ratio[name] = Stats.of(rows[peer][name]).median / Stats.of(row[name]).median
        ratios.append({"fastvlm": key, "peer": peer, **ratio})
    return ratios


MODEL_HEADERS = [
    "model", "px", "image tokens", "prompt tokens", "encoder params (M)", "projector params (M)",
    "encoder + projector GFLOP", "TTFT GFLOP", "preprocess ms", "encoder + projector ms", "TTFT ms",
    "rest of TTFT ms", "peak GiB (+model)",
]  # fmt: skip
RATIO_HEADERS = [
    "LLaVA-OneVision-0.5B @{px} px over", "TTFT", "image tokens", "encoder params", "encoder GFLOP", "TTFT GFLOP",
    "encoder time",
]  # fmt: skip


def model_cells(row: dict[str, Any], memory: dict[str, Any] | None) -> list[Any]:
    preprocess, encoder, ttft = (Stats.of(row[name]) for name in ("preprocess_s", "encoder_s", "ttft_s"))
    rest = ttft.median - preprocess.median - encoder.median
    return [
        row["model"], row["resolution"], row["image_tokens"], row["prompt_tokens"],
        f"{row['encoder_params'] / 1e6:.1f}", f"{row['projector_params'] / 1e6:.1f}",
        f"{row['encoder_flops'] / 1e9:.0f}", f"{row['ttft_flops'] / 1e9:.0f}",
        f"{preprocess.median * 1e3:.0f}", encoder.ms(0), ttft.ms(0), f"{rest * 1e3:.0f}", peak_cell(memory),
    ]  # fmt: skip


def ratio_cells(ratio: dict[str, Any], rows: dict[str, dict[str, Any]]) -> list[Any]:
    fastvlm = rows[ratio["fastvlm"]]
    return [
        f"{fastvlm['model']} @{fastvlm['resolution']} px", f"{ratio['ttft_s']:.1f}×", f"{ratio['image_tokens']:.1f}×",
        f"{ratio['encoder_params']:.2f}×", f"{ratio['encoder_flops']:.1f}×", f"{ratio['ttft_flops']:.1f}×",
        f"{ratio['encoder_s']:.1f}×",
    ]  # fmt: skip


def markdown(results: dict[str, Any]) -> str:
    settings, rows = results["settings"], results["rows"]
    memory = results.get("memory") or {}
    peer = rows[results["peer"]]
    samples = ", ".join(f"{key} {len(row['ttft_s'])}" for key, row in rows.items())
    rates = " and ".join(f"{rate / 1e9:.0f}" for rate in results["matmul_rate_flops_per_s"])
    paper_row = ["paper (Apple M1; FastVLM at 1024 px)", f"{PAPER['ttft']:.0f}×", "", f"{PAPER['encoder_params']}×"]
    paper_row += [""] * (len(RATIO_HEADERS) - len(paper_row))
    headers = [RATIO_HEADERS[0].format(px=peer["resolution"]), *RATIO_HEADERS[1:]]
    footnote = (
        f"bf16, {settings['device']}, batch 1, random weights. Milliseconds: median (min–max) of interleaved runs "
        f"(TTFT samples: {samples}). TTFT = the processor on the {settings['image_size']} × "
        f"{settings['image_size']} image and the chat, then `generate(max_new_tokens=1)`; encoder + projector = "
        "`get_image_features` on the processed image, timed on its own; rest of TTFT = TTFT − preprocess − encoder "
        "(mostly the language model's prefill). FastVLM runs with its language model's weights packed "
        "(`pack_weights()`, as the CLI does on CPU). FLOPs: FlopCounterMode (a multiply-add is 2), LLaVA-OneVision's "
        f"encoder over all {peer['pixel_values_shape'][1]} of its tiles. Load average (1 min) at the start "
        f"{results['machine']['load_average'][0]:.1f}, after the timed runs {results['load_average_end'][0]:.1f}; "
        f"bf16 matmul rate before and after: {rates} GFLOP/s. Peak memory: "
        + ("peak CUDA memory allocated" if settings["device"] == "cuda" else "resident-set high-water mark")
        + " of a process that builds one model and runs one TTFT; in brackets, its growth from before the model."
    )
    return "\n\n".join(
        [
            f"### FastVLM vs LLaVA-OneVision, measured here ({settings['device']})",
            f"Machine: {machine_line(results['machine'])}",
            markdown_table(MODEL_HEADERS, [model_cells(row, memory.get(key)) for key, row in rows.items()]),
            markdown_table(headers, [*(ratio_cells(r, rows) for r in results["ratios"]), paper_row]),
            footnote,
        ]
    )


# ----------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    configure_torch(args)
    transformers.logging.set_verbosity_error()
    if args.memory_probe:
        return memory_probe(args)
    results: dict[str, Any] = {
        "benchmark": "paper",
        "machine": describe_machine(args.device),
        "settings": {
            **{key: value for key, value in vars(args).items() if key not in ("output", "memory_probe")},
            "image": os.path.relpath(args.image, REPO),  # results carry no machine paths
            "dtype": "bf16",
        },
    }
    rates = [matmul_flops_per_second(DTYPE, args.device)]
    tokenizer = offline_tokenizer()
    image = square_image(args)
    log("building both models")
    fastvlm = build_fastvlm(args, tokenizer)
    contenders = {
        fastvlm_key(side): fastvlm_contender(fastvlm, side, args, tokenizer, image) for side in args.resolutions
    }
    peer = llava_key(args)
    contenders[peer] = llava_onevision_contender(build_llava_onevision(args, tokenizer), args, tokenizer, image)
    rows = measure(contenders, args)
    results["load_average_end"] = load_average()
    del contenders, fastvlm
    rates.append(matmul_flops_per_second(DTYPE, args.device))
    results.update(peer=peer, rows=rows, ratios=summarize(rows, peer), matmul_rate_flops_per_s=rates)
    if args.memory:
        log("peak memory, one process per model")
        results["memory"] = {key: measure_memory(key, args) for key in rows}
    write_results(args.output, results, markdown(results))


if __name__ == "__main__":
    main()
