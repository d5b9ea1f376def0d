"""The options subcommands share, in the groups `--help` lists them in: model, generation and output options."""

from __future__ import annotations

import argparse
import re

from .messages import status

DEFAULT_MODEL = "apple/FastVLM-0.5B"


def add_command(commands, name: str, handler, **kwargs) -> argparse.ArgumentParser:
    """The subcommand `name` of `commands`, run by `handler(args)`, with the --debug option every command takes;
    `kwargs` go to `add_parser` (help, description)."""
    parser = commands.add_parser(name, **kwargs)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.set_defaults(handler=handler)
    return parser


def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model options")
    group.add_argument("--model", default=DEFAULT_MODEL,
                       help=f"Hub repo id or local folder, in any FastVLM layout (default: {DEFAULT_MODEL})")
    group.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                       help="auto: cuda if available, else mps, else cpu (default: auto)")
    group.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                       help="auto: bfloat16 on cuda and on cpus that compute it natively, else float32; float16 on mps "
                            "(default: auto)")
    bits = group.add_mutually_exclusive_group()
    bits.add_argument("--load-in-4bit", action="store_true",
                      help="quantize the weights to 4 bits with bitsandbytes (NF4; bf16 compute on CUDA)")
    bits.add_argument("--load-in-8bit", action="store_true", help="quantize the weights to 8 bits with bitsandbytes")
    group.add_argument("--resolution", type=positive_int, metavar="PIXELS",
                       help="side of the square the images are resized to, a multiple of 64 "
                            "(default: the checkpoint's, 1024 for Apple's)")
    group.add_argument("--image-mode", choices=["pad", "crop"],
                       help="pad: pad to a square like Apple's predict.py; crop: centre crop like transformers' "
                            "fast_vlm (default: the checkpoint's, pad for Apple's)")  # fmt: skip


def add_generation_options(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The generation options group, with the options of `generation_kwargs`; a command may add its own to it."""
    group = parser.add_argument_group("generation options")
    group.add_argument("--max-new-tokens", type=positive_int, default=256, metavar="N",
                       help="maximum number of generated tokens (default: 256)")
    group.add_argument("--temperature", type=non_negative_float, default=0.0, metavar="T",
                       help="0: greedy decoding; above 0: sampling at this temperature (default: 0)")
    group.add_argument("--top-p", type=probability, metavar="P", help="nucleus sampling threshold, with --temperature")
    group.add_argument("--system-prompt", metavar="TEXT",
                       help='system message (default: the chat template\'s, "You are a helpful assistant.")')
    return group  # fmt: skip


def add_output_options(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    return parser.add_argument_group("output options")


def generation_kwargs(args: argparse.Namespace) -> dict:
    """`generate` arguments: greedy at temperature 0, sampling above it."""
    kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": args.temperature > 0}
    if args.temperature > 0:
        kwargs["temperature"] = args.temperature
        if args.top_p is not None:
            kwargs["top_p"] = args.top_p
    elif args.top_p is not None:
        status("Note: --top-p applies only when sampling (--temperature above 0); decoding greedily.")
    if getattr(args, "num_beams", 1) > 1:
        kwargs["num_beams"] = args.num_beams
    return kwargs


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def byte_size(text: str) -> int:
    """A number of bytes, or of kilo-, mega-, giga- or terabytes (powers of 1000, as huggingface_hub counts them)."""
    match = re.fullmatch(r"\s*(\d+\.?\d*|\.\d+)\s*([KMGT]B)?\s*", text, re.IGNORECASE)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}; write bytes, or e.g. 500MB or 5GB")
    number, unit = match.groups()
    value = int(float(number) * 1000 ** ("KMGT".index(unit[0].upper()) + 1 if unit else 0))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text!r}")
    return value
