"""``fastvlm-hf export``: write a checkpoint of any FastVLM layout as ONNX graphs in the layout transformers.js and
onnxruntime read; optionally verify them with onnxruntime (see ``fastvlm_hf.export``)."""

from __future__ import annotations

import argparse

from .loading import locate
from .messages import CLIError, first_line, status
from .options import add_command, add_output_options, positive_int

# The names of `fastvlm_hf.export.DTYPES`, here so that parsing does not import the package.
DTYPES = ("fp32", "fp16", "q8", "q4")


def add_parser(commands) -> None:
    parser = add_command(
        commands,
        "export",
        run,
        help="export a checkpoint to ONNX for transformers.js and onnxruntime",
        description="Export a FastVLM checkpoint (Apple's, this package's or transformers' native layout) to ONNX: "
        "the vision encoder, the token embedding and the decoder with its cache, in the folder layout "
        "transformers.js and onnxruntime read, with a model card (README.md). Needs the onnx extra: "
        'pip install "fastvlm-hf[onnx]".',
    )
    parser.add_argument("source", help="Hub repo id or local folder, in any FastVLM layout")
    parser.add_argument("output", help="folder to write; it appears once complete (and verified, with --verify)")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="run the float32 graphs with onnxruntime and fail unless their greedy tokens equal PyTorch's",
    )
    output = add_output_options(parser)
    output.add_argument("--dtype", type=dtype_list, default=["fp32"], metavar="LIST",
                        help=f"comma-separated graph dtypes, of {', '.join(DTYPES)}; the first is transformers.js's "
                             "default (default: fp32)")  # fmt: skip
    output.add_argument("--resolution", type=positive_int, metavar="PIXELS",
                        help="side of the square images the vision graph takes, a multiple of 64 "
                             "(default: the checkpoint's, 1024 for Apple's)")  # fmt: skip
    output.add_argument("--overwrite", action="store_true",
                        help="replace OUTPUT if it exists, once the new one is complete")  # fmt: skip


def dtype_list(text: str) -> list[str]:
    dtypes = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [dtype for dtype in dtypes if dtype not in DTYPES]
    if unknown or not dtypes:
        raise argparse.ArgumentTypeError(f"unknown dtype {', '.join(unknown) or '(none given)'}; choose from "
                                         f"{', '.join(DTYPES)}")  # fmt: skip
    return dtypes


def run(args: argparse.Namespace) -> int:
    try:
        from .. import export
    except ImportError as error:  # the onnx extra is not installed
        raise CLIError(f'export needs the onnx extra ({first_line(error)}): pip install "fastvlm-hf[onnx]"') from error

    try:
        source, cache_only = locate(args.source, "source folder not found", local_hint="or export a local folder")
        result = export.export(source, args.output, dtypes=args.dtype, resolution=args.resolution, verify=args.verify,
                               overwrite=args.overwrite, local_files_only=cache_only)  # fmt: skip
    except export.ExportError as error:
        raise CLIError(str(error)) from error
    except (OSError, ValueError) as error:  # a source that cannot be found or does not fit FastVLM
        raise CLIError(f"cannot export {args.source!r}: {first_line(error)}") from error
    if result is not None:
        status(f"Verified: onnxruntime's {len(result.tokens)} greedy tokens equal PyTorch's; first-step logits agree "
               f"to {result.logits_difference:.3g} of the largest.")  # fmt: skip
    status(f"Wrote {args.output} (ONNX: {', '.join(args.dtype)}).")
    return 0
