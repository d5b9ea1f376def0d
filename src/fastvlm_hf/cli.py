"""The ``fastvlm-hf`` command.

Subcommands:

``predict``
    Describe one image: load a FastVLM checkpoint through transformers' Auto classes, run one chat
    turn and stream the answer to stdout.

``convert``
    Rewrite a checkpoint of any FastVLM layout (Apple's, this package's, transformers' native) into this
    package's layout or transformers' native one, with a model card; optionally verify and push it to the
    Hub (see ``fastvlm_hf.conversion``).

Only generated text goes to stdout; status lines, warnings and errors go to stderr, so the output
can be piped. Errors a user can fix (a missing or unreadable image, a model that cannot be found)
print one line and exit with code 1; ``--debug`` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib import metadata

DEFAULT_MODEL = "apple/FastVLM-0.5B"


class CLIError(Exception):
    """An error with a message meant for the user: printed on one line, exit code 1."""


def _status(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _package_version() -> str:
    try:
        return metadata.version("fastvlm-hf")
    except metadata.PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------------------------------
# Device and dtype


def resolve_device(name: str) -> str:
    """'auto' picks cuda, then mps, then cpu; an explicit device must be available."""
    import torch

    cuda = torch.cuda.is_available()
    mps = hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    if name == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if name == "cuda" and not cuda:
        raise CLIError("--device cuda was requested but no CUDA device is available; try --device cpu")
    if name == "mps" and not mps:
        raise CLIError("--device mps was requested but MPS is not available; try --device cpu")
    return name


def resolve_dtype(name: str, device: str):
    """'auto' is bfloat16 on cuda and cpu, float16 on mps."""
    import torch

    if name == "auto":
        return torch.float16 if device == "mps" else torch.bfloat16
    return getattr(torch, name)


# --------------------------------------------------------------------------------------------------
# predict


def load_image(path: str):
    """Open and decode an image file; the processor converts it to RGB."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()  # decode now, so a truncated file fails here and not inside the processor
    except FileNotFoundError as error:
        raise CLIError(f"image not found: {path}") from error
    except IsADirectoryError as error:
        raise CLIError(f"expected an image file, got a directory: {path}") from error
    except UnidentifiedImageError as error:
        raise CLIError(f"not an image file Pillow can read: {path}") from error
    except OSError as error:
        raise CLIError(f"cannot read image {path}: {_first_line(error)}") from error
    return image


def _looks_like_path(model_id: str) -> bool:
    """Hub ids are 'name' or 'owner/name'; anything else is meant as a local folder."""
    return os.path.isabs(model_id) or model_id.startswith((".", "~")) or model_id.count("/") > 1


def load_model(model_id: str, device: str, dtype):
    """Load processor and model through the Auto classes that ``import fastvlm_hf`` registers."""
    import fastvlm_hf  # noqa: F401  (registers the FastVLM classes with the Auto classes)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if _looks_like_path(model_id):
        model_id = os.path.expanduser(model_id)
        if not os.path.isdir(model_id):
            raise CLIError(f"model folder not found: {model_id}")
    try:
        processor = AutoProcessor.from_pretrained(model_id)
        model = AutoModelForImageTextToText.from_pretrained(model_id, dtype=dtype, device_map=device)
    except (OSError, ValueError) as error:
        raise CLIError(f"cannot load model {model_id!r}: {_first_line(error)}") from error
    model.eval()
    return processor, model


def run_predict(args: argparse.Namespace) -> int:
    image = load_image(args.image)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)

    import torch
    from transformers import TextStreamer

    _status(f"Loading {args.model} on {device} ({str(dtype).removeprefix('torch.')}) ...")
    processor, model = load_model(args.model, device, dtype)

    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": image},
                {"type": "text", "text": args.prompt},
            ],
        }
    ]
    inputs = processor.apply_chat_template(
        messages,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    inputs = inputs.to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)

    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, streamer=streamer)
    return 0


# --------------------------------------------------------------------------------------------------
# convert


def run_convert(args: argparse.Namespace) -> int:
    """Convert, then verify, then push: each step only once the one before it succeeded."""
    from . import conversion

    try:
        conversion.convert(args.source, args.output, to=args.to, dtype=args.dtype,
                           max_shard_size=args.max_shard_size, repo_id=args.push_to_hub)  # fmt: skip
        _status(f"Wrote {args.output} ({args.to} layout).")
        if args.verify:
            _status(f"Verified: float32 logits agree to {conversion.verify(args.source, args.output):.3g}.")
    except conversion.ConversionError as error:
        raise CLIError(str(error)) from error
    except (OSError, ValueError) as error:  # a source that cannot be found or does not fit FastVLM
        raise CLIError(f"cannot convert {args.source!r}: {_first_line(error)}") from error
    if args.push_to_hub:
        try:
            _status(f"Pushed to {conversion.push_to_hub(args.output, args.push_to_hub)}.")
        except OSError as error:  # the Hub's HTTP errors, a missing token
            raise CLIError(f"cannot push {args.output} to {args.push_to_hub!r}: {_first_line(error)}") from error
    return 0


# --------------------------------------------------------------------------------------------------
# Argument parsing and entry point


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastvlm-hf",
        description="Apple's FastVLM through Hugging Face transformers.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_package_version()}")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show full tracebacks on errors")

    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    predict = commands.add_parser(
        "predict",
        parents=[common],
        help="answer a prompt about one image",
        description="Answer a prompt about one image; the answer streams to stdout.",
    )
    predict.add_argument("--image", required=True, metavar="PATH", help="image file (any format Pillow reads)")
    predict.add_argument("--prompt", required=True, metavar="TEXT", help='e.g. "Describe the image."')
    predict.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"Hub repo id or local folder (default: {DEFAULT_MODEL})",
    )
    predict.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        default=256,
        metavar="N",
        help="maximum number of generated tokens (default: 256)",
    )
    predict.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda", "mps"],
        default="auto",
        help="auto: cuda if available, else mps, else cpu (default: auto)",
    )
    predict.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float16", "float32"],
        default="auto",
        help="auto: bfloat16 on cuda and cpu, float16 on mps (default: auto)",
    )
    predict.set_defaults(handler=run_predict)

    convert = commands.add_parser(
        "convert",
        parents=[common],
        help="convert a checkpoint between FastVLM layouts",
        description="Rewrite a FastVLM checkpoint (Apple's, this package's or transformers' native layout) into "
        "this package's layout or transformers' native one, with sharded safetensors and a model card (README.md).",
    )
    convert.add_argument("source", help="Hub repo id or local folder, in any FastVLM layout")
    convert.add_argument("output", help="folder to write")
    convert.add_argument(
        "--to",
        choices=["fastvlm", "transformers"],
        default="fastvlm",
        help="fastvlm: this package's layout; transformers: transformers' native fast_vlm (needs transformers 5) "
        "(default: fastvlm)",
    )
    convert.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float16", "float32"],
        default="auto",
        help="dtype of the written weights; auto keeps the source's (default: auto)",
    )
    convert.add_argument("--max-shard-size", default="5GB", metavar="SIZE", help="largest weights file (default: 5GB)")
    convert.add_argument(
        "--verify",
        action="store_true",
        help="reload the result and fail unless its float32 logits match the source's",
    )
    convert.add_argument(
        "--push-to-hub",
        metavar="REPO",
        help="upload the result to this Hub model repo, created if missing (needs a write token)",
    )
    convert.set_defaults(handler=run_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except CLIError as error:
        if args.debug:
            raise
        print(f"fastvlm-hf: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
