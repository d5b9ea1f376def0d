"""The ``fastvlm-hf`` command. Its subcommands, one module each:

``predict``
    Answer a prompt about one or more images: load a FastVLM checkpoint through transformers' Auto classes, run one
    chat turn and stream the answer to stdout (``--json``: one JSON object instead; ``--stats``: timings on stderr).

``chat``
    A conversation about one image in the terminal, one question per line (or piped in); the image is encoded once
    and each turn reuses the KV cache of the conversation so far (see ``fastvlm_hf.chat``).

``bench``
    Time the phases of generation (preprocessing, vision encoder, prefill, time to first token, decode, and the
    time to first token of a follow-up chat turn) over several runs; print a Markdown table.

``convert``
    Rewrite a checkpoint of any FastVLM layout (Apple's, this package's, transformers' native) into this
    package's layout, transformers' native one or Apple's, with a model card; optionally verify and push it to the
    Hub (see ``fastvlm_hf.conversion``).

``export``
    Export a checkpoint of any layout to ONNX in the folder layout transformers.js and onnxruntime read (three graphs,
    in float32, float16, 8-bit or 4-bit); optionally verify the graphs' greedy tokens against PyTorch's with
    onnxruntime (see ``fastvlm_hf.export``).

``finetune``
    Fine-tune with LoRA adapters (QLoRA on a 4-bit model) on a JSONL file of rows, through TRL's SFTTrainer, after a
    check of every row; save the adapter and, with ``--merge``, the merged model (see ``fastvlm_hf.training``).

What they share: ``options`` (the model, generation and output options), ``loading`` (model, processor and images)
and ``messages`` (status lines and errors).

The installed ``fastvlm-hf`` command starts in ``fastvlm_hf_cli``, which parses the arguments before importing torch
and transformers, so that ``--help``, ``--version`` and mistyped options answer at once.

Only answers, JSON and tables go to stdout; status lines, statistics, warnings and errors go to stderr, so the output
can be piped. Errors a user can fix (a missing or unreadable image, a model that cannot be found, a device that is
not there, a prompt too long for the model) print one line and exit with code 1; ``--debug`` shows the full
traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata

from . import bench, chat, convert, export, finetune, predict
from .messages import CLIError
from .notices import hide_dependency_notices


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastvlm-hf", description="Apple's FastVLM through Hugging Face transformers.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_package_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in (predict, chat, bench, convert, export, finetune):
        command.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Runs the command that `build_parser` parsed into `args`: one line and exit code 1 for the user's mistakes."""
    hide_dependency_notices()
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


def _package_version() -> str:
    try:
        return metadata.version("fastvlm-hf")
    except metadata.PackageNotFoundError:
        return "unknown"
