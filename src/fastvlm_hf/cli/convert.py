"""``fastvlm-hf convert``: rewrite a checkpoint of any FastVLM layout into this package's, transformers' native or
Apple's, with a model card; optionally verify it and push it to the Hub (see ``fastvlm_hf.conversion``)."""

from __future__ import annotations

import argparse

from .loading import locate
from .messages import CLIError, first_line, status
from .options import add_command, add_output_options, byte_size


def add_parser(commands) -> None:
    parser = add_command(
        commands,
        "convert",
        run,
        help="convert a checkpoint between FastVLM layouts",
        description="Rewrite a FastVLM checkpoint (Apple's, this package's or transformers' native layout) into "
        "this package's layout, transformers' native one or Apple's, with sharded safetensors and a model card "
        "(README.md).",
    )
    parser.add_argument("source", help="Hub repo id or local folder, in any FastVLM layout")
    parser.add_argument("output", help="folder to write; it appears once complete (and verified, with --verify)")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="reload the result and fail unless its float32 logits match the source's",
    )
    output = add_output_options(parser)
    output.add_argument(
        "--to",
        choices=["fastvlm", "transformers", "apple"],
        default="fastvlm",
        help="fastvlm: this package's layout; transformers: transformers' native fast_vlm (needs transformers 5); "
        "apple: Apple's own llava_qwen2 layout, which Apple's export scripts take (default: fastvlm)",
    )
    output.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float16", "float32"],
        default="auto",
        help="dtype of the written weights; auto keeps the source's (default: auto)",
    )
    output.add_argument("--max-shard-size", type=byte_size, default="5GB", metavar="SIZE",
                        help="largest weights file, in bytes or e.g. 500MB (default: 5GB)")  # fmt: skip
    output.add_argument("--overwrite", action="store_true",
                        help="replace OUTPUT if it exists, once the new one is complete")  # fmt: skip
    output.add_argument(
        "--push-to-hub",
        metavar="REPO",
        help="upload the result to this Hub model repo, created if missing (needs a write token)",
    )


def run(args: argparse.Namespace) -> int:
    """Convert and verify, then push: the push only once the output is complete (and verified)."""
    from .. import conversion

    try:
        source, cache_only = locate(args.source, "source folder not found", local_hint="or convert a local folder")
        difference = conversion.convert(source, args.output, to=args.to, dtype=args.dtype,
                                        max_shard_size=args.max_shard_size, repo_id=args.push_to_hub,
                                        verify=args.verify, overwrite=args.overwrite, local_files_only=cache_only)  # fmt: skip
    except conversion.ConversionError as error:
        raise CLIError(str(error)) from error
    except (OSError, ValueError) as error:  # a source that cannot be found or does not fit FastVLM
        raise CLIError(f"cannot convert {args.source!r}: {first_line(error)}") from error
    if args.verify:
        status(f"Verified: float32 logits agree to {difference:.3g} of the largest.")
    status(f"Wrote {args.output} ({args.to} layout).")
    if args.push_to_hub:
        try:
            status(f"Pushed to {conversion.push_to_hub(args.output, args.push_to_hub)}.")
        except Exception as error:  # the Hub's answers, no connection, no token: the client's errors vary by release
            kept = "complete and verified" if args.verify else "complete"
            raise CLIError(f"cannot push {args.output} to {args.push_to_hub!r}: {first_line(error).rstrip('.')}. "
                           f"{args.output} is {kept}: push it later with `hf upload {args.push_to_hub} "
                           f"{args.output}`") from error  # fmt: skip
    return 0
