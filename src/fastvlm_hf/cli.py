"""The ``fastvlm-hf`` command.

Subcommands:

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
    package's layout or transformers' native one, with a model card; optionally verify and push it to the
    Hub (see ``fastvlm_hf.conversion``).

Only answers, JSON and tables go to stdout; status lines, statistics, warnings and errors go to stderr, so the output
can be piped. Errors a user can fix (a missing or unreadable image, a model that cannot be found, a device that is
not there, a prompt too long for the model) print one line and exit with code 1; ``--debug`` shows the full
traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib import metadata

DEFAULT_MODEL = "apple/FastVLM-0.5B"
BENCH_QUESTIONS = ("Describe the image.", "What colours are in it?")


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
# Device, dtype, quantization


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


def quantization_config(args: argparse.Namespace, device: str):
    """A `BitsAndBytesConfig` for --load-in-4bit / --load-in-8bit, or None."""
    if not (args.load_in_4bit or args.load_in_8bit):
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        flag = "--load-in-4bit" if args.load_in_4bit else "--load-in-8bit"
        raise CLIError(f"{flag} needs bitsandbytes: pip install 'fastvlm-hf[bnb]'") from error
    import torch
    from transformers import BitsAndBytesConfig

    if args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute_dtype = torch.bfloat16 if device == "cuda" else resolve_dtype(args.dtype, device)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)


# --------------------------------------------------------------------------------------------------
# Images


def load_image(path: str):
    """Open and decode an image file or URL; the processor converts it to RGB."""
    if path.startswith(("http://", "https://")):
        return _download_image(path)
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


def _download_image(url: str):
    from transformers.image_utils import load_image as load_image_url

    try:
        return load_image_url(url)
    except Exception as error:  # the HTTP client's errors, or a body that is not an image
        raise CLIError(f"cannot read image {url}: {_first_line(error)}") from error


# --------------------------------------------------------------------------------------------------
# Model


def _looks_like_path(model_id: str) -> bool:
    """Hub ids are 'name' or 'owner/name'; anything else is meant as a local folder."""
    return os.path.isabs(model_id) or model_id.startswith((".", "~")) or model_id.count("/") > 1


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def describe_load_error(model_id: str, error: BaseException) -> str:
    """One line that says why `model_id` did not load and what to do, from the Hub errors behind `error`."""
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    local_hint = "or pass a local folder with --model PATH"
    causes = _causes(error)
    if any(isinstance(cause, GatedRepoError) for cause in causes):
        return f"model {model_id!r} is gated: accept its terms on huggingface.co and log in with `hf auth login`"
    if any(isinstance(cause, RepositoryNotFoundError) for cause in causes):
        return f"model {model_id!r} is neither a local folder nor a repo on the Hugging Face Hub: check the name, {local_hint}"
    if any(isinstance(cause, (OfflineModeIsEnabled, LocalEntryNotFoundError)) for cause in causes):
        if _hub_offline():
            return (f"model {model_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids "
                    f"downloading it: run once without HF_HUB_OFFLINE to download it, {local_hint}")  # fmt: skip
        return (f"cannot download model {model_id!r} (no connection to the Hugging Face Hub?) and it is not in the "
                f"local cache: connect once to download it, {local_hint} (HF_HUB_OFFLINE=1 then uses the cache only)")  # fmt: skip
    return f"cannot load model {model_id!r}: {_first_line(error)}"


def _causes(error: BaseException) -> list[BaseException]:
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def load_processor(model_id: str, resolution: int | None = None, image_mode: str | None = None):
    """The checkpoint's processor, with the image size and mode the command line asks for."""
    from transformers import AutoProcessor

    import fastvlm_hf  # noqa: F401  (registers the FastVLM classes with the Auto classes)

    try:
        processor = AutoProcessor.from_pretrained(model_id)
    except (OSError, ValueError) as error:
        raise CLIError(describe_load_error(model_id, error)) from error
    image_processor = processor.image_processor
    if resolution is not None:
        patch_size = getattr(image_processor, "patch_size", 64)
        if resolution % patch_size:
            nearest = max(patch_size, round(resolution / patch_size) * patch_size)
            raise CLIError(f"--resolution {resolution} is not a multiple of {patch_size}, the vision encoder's stride; "
                           f"try --resolution {nearest}")  # fmt: skip
        image_processor.size = {"height": resolution, "width": resolution}
    if image_mode is not None:
        image_processor.image_mode = image_mode
    return processor


def load_model(model_id: str, device: str, dtype, quantization=None):
    """Load the model through the Auto classes that ``import fastvlm_hf`` registers."""
    from transformers import AutoModelForImageTextToText

    import fastvlm_hf  # noqa: F401

    kwargs = {"dtype": dtype, "device_map": device}
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    try:
        model = AutoModelForImageTextToText.from_pretrained(model_id, **kwargs)
    except (OSError, ValueError, ImportError) as error:
        raise CLIError(describe_load_error(model_id, error)) from error
    if device == "cpu" and hasattr(model, "pack_weights"):  # inference only: the faster CPU layout
        model.pack_weights()
    return model.eval()


def load(args: argparse.Namespace):
    """Processor and model as the command line's model options say; status lines on stderr."""
    model_id = args.model
    if _looks_like_path(model_id):
        model_id = os.path.expanduser(model_id)
        if not os.path.isdir(model_id):
            raise CLIError(f"model folder not found: {model_id}")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    quantization = quantization_config(args, device)
    processor = load_processor(model_id, args.resolution, args.image_mode)
    bits = " 4-bit" if args.load_in_4bit else " 8-bit" if args.load_in_8bit else ""
    _status(f"Loading model {model_id} on {device} ({str(dtype).removeprefix('torch.')}{bits}) ...")
    return processor, load_model(model_id, device, dtype, quantization)


# --------------------------------------------------------------------------------------------------
# Generation settings


def generation_kwargs(args: argparse.Namespace) -> dict:
    """`generate` arguments: greedy at temperature 0, sampling above it."""
    kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": args.temperature > 0}
    if args.temperature > 0:
        kwargs["temperature"] = args.temperature
        if args.top_p is not None:
            kwargs["top_p"] = args.top_p
    elif args.top_p is not None:
        _status("Note: --top-p applies only when sampling (--temperature above 0); decoding greedily.")
    if getattr(args, "num_beams", 1) > 1:
        kwargs["num_beams"] = args.num_beams
    return kwargs


def _settings(args: argparse.Namespace, processor, model) -> dict:
    image_processor = processor.image_processor
    quantization = "4bit" if args.load_in_4bit else "8bit" if args.load_in_8bit else None
    return {
        "images": list(args.image),
        "prompt": args.prompt,
        "system_prompt": args.system_prompt,
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "quantization": quantization,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "num_beams": args.num_beams,
        "resolution": image_processor.size["height"],
        "image_mode": image_processor.image_mode,
    }


# --------------------------------------------------------------------------------------------------
# predict


def run_predict(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    from .chat import conversation_start

    images = [load_image(path) for path in args.image]
    processor, model = load(args)
    streams = args.num_beams == 1 and not args.json  # transformers streams greedy and sampled decoding, not beams
    text_streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True) if streams else None
    messages = conversation_start(images, args.prompt, args.system_prompt)
    _status(f"Encoding {_plural(len(images), 'image')} and generating ...")
    text, timings = answer_timed(model, processor, messages, generation_kwargs(args), text_streamer)

    if args.json:
        report = {"text": text, "model": args.model, "settings": _settings(args, processor, model),
                  "timings": timings.as_dict()}  # fmt: skip
        print(json.dumps(report, ensure_ascii=False))
    elif not streams:
        print(text)
    if args.stats:
        _status("\n".join(["--- stats ---", *timings.report_lines()]))
    return 0


def answer_timed(model, processor, messages, kwargs: dict, text_streamer=None):
    """The answer to `messages` and the timings of its phases; tokens go to `text_streamer` as they come."""
    import torch

    from .chat import ContextLengthError, fit_new_tokens, move_inputs
    from .stats import GenerationTimer

    timed_tokens = kwargs.get("num_beams", 1) == 1  # a streamer (the token clock) works without beam search only
    timer = GenerationTimer(model, streamer=text_streamer)
    with timer:
        with timer.preprocessing():
            inputs = processor.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
            )
        inputs = move_inputs(inputs, model)
        prompt_tokens = inputs["input_ids"].shape[1]
        try:
            kwargs = {**kwargs, "max_new_tokens": fit_new_tokens(model, prompt_tokens, kwargs["max_new_tokens"])}
        except ContextLengthError as error:
            raise CLIError(f"{error}: shorten the prompt, or use fewer images or a lower --resolution") from error
        with torch.inference_mode():
            output = model.generate(**inputs, streamer=timer.streamer if timed_tokens else None, **kwargs)

    new_tokens = output[0, prompt_tokens:]
    timings = timer.timings(prompt_tokens=prompt_tokens)
    if not timed_tokens:
        timings.new_tokens = len(new_tokens)
    return processor.decode(new_tokens, skip_special_tokens=True), timings


def _plural(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


# --------------------------------------------------------------------------------------------------
# chat

CHAT_HELP = "Type a question and press Enter. /image PATH: talk about another image; /reset: start over; /exit: quit."


def run_chat(args: argparse.Namespace) -> int:
    from .chat import ChatSession

    image = load_image(args.image)
    processor, model = load(args)
    session = ChatSession(model, processor, [image], generation_kwargs(args), system_prompt=args.system_prompt)
    interactive = sys.stdin.isatty()
    if interactive:
        _status(f"Chatting about {args.image}. {CHAT_HELP}")
    while (line := _read_line(interactive)) is not None:
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not _chat_command(session, line):
                break
            continue
        _chat_turn(session, processor, line)
    return 0


def _read_line(interactive: bool) -> str | None:
    """The next line of stdin, or None at the end; a "> " prompt on stderr when a person is typing."""
    if interactive:
        sys.stderr.write("> ")
        sys.stderr.flush()
    line = sys.stdin.readline()
    return line if line else None


def _chat_command(session, line: str) -> bool:
    """Runs a /command; False means the conversation ends."""
    command, _, argument = line.partition(" ")
    if command in ("/exit", "/quit"):
        return False
    if command == "/reset":
        session.reset()
        _status("New conversation about the same image.")
    elif command == "/image" and argument.strip():
        try:
            session.set_images([load_image(argument.strip())])
        except CLIError as error:
            _status(f"fastvlm-hf: error: {error}")
        else:
            _status(f"New conversation about {argument.strip()}.")
    else:
        _status(f"Unknown command {line!r}. {CHAT_HELP}")
    return True


def _chat_turn(session, processor, question: str) -> None:
    from transformers import TextStreamer

    from .chat import ContextLengthError

    if session.will_encode_images:
        _status("Encoding image ...")
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    try:
        session.ask(question, streamer=streamer)
    except ContextLengthError as error:
        _status(f"fastvlm-hf: error: {error}; /reset starts a new conversation")


# --------------------------------------------------------------------------------------------------
# bench


def run_bench(args: argparse.Namespace) -> int:
    image = load_image(args.image) if args.image else _bench_image()
    processor, model = load(args)
    kwargs = {"max_new_tokens": args.max_new_tokens, "min_new_tokens": args.max_new_tokens, "do_sample": False}
    _status("Warming up ...")
    _bench_round(model, processor, image, kwargs)
    rounds = []
    for index in range(args.repeats):
        _status(f"Run {index + 1}/{args.repeats} ...")
        rounds.append(_bench_round(model, processor, image, kwargs))

    firsts = [first.as_dict() for first, _ in rounds]
    follow_ups = [follow_up.as_dict() for _, follow_up in rounds]
    size = processor.image_processor.size
    print(f"{args.model} on {model.device} ({str(model.dtype).removeprefix('torch.')}), {size['height']}x{size['width']} "
          f"image, {firsts[0]['prompt_tokens']}-token prompt, {args.max_new_tokens} new tokens; {args.repeats} runs "
          f"after 1 warm-up\n")  # fmt: skip
    rows = [
        ("preprocessing (ms)", [first["preprocess_ms"] for first in firsts]),
        ("vision encoder (ms)", [first["vision_ms"] for first in firsts]),
        ("prefill (ms)", [first["prefill_ms"] for first in firsts]),
        ("TTFT (ms)", [first["ttft_ms"] for first in firsts]),
        ("decode (ms/token)", [first["decode_ms_per_token"] for first in firsts]),
        ("decode (tokens/s)", [first["tokens_per_s"] for first in firsts]),
        ("TTFT, follow-up chat turn (ms)", [follow_up["ttft_ms"] for follow_up in follow_ups]),
    ]
    print(markdown_table(rows))
    return 0


def _bench_image():
    """A 1024x768 test picture (a gradient with a few shapes), for runs without --image."""
    from PIL import Image, ImageDraw

    image = Image.linear_gradient("L").resize((1024, 768)).convert("RGB")
    draw = ImageDraw.Draw(image)
    draw.ellipse((120, 200, 420, 500), fill=(220, 40, 40))
    draw.rectangle((560, 240, 860, 540), fill=(40, 80, 220))
    return image


def _bench_round(model, processor, image, kwargs):
    """Timings of a first chat turn and of a follow-up turn about the same image."""
    from .chat import ChatSession
    from .stats import GenerationTimer

    session = ChatSession(model, processor, [image], kwargs)
    timings = []
    for question in BENCH_QUESTIONS:
        timer = GenerationTimer(model)
        with timer:
            session.ask(question, timer=timer)
        timings.append(timer.timings(prompt_tokens=session.prompt_tokens))
    return tuple(timings)


def markdown_table(rows: list[tuple[str, list[float | None]]]) -> str:
    """A Markdown table of the median, minimum and maximum of each row's measured values."""
    from .stats import summarize

    lines = ["| phase | median | min | max |", "|---|---:|---:|---:|"]
    for name, values in rows:
        summary = summarize(values)
        cells = ["n/a"] * 3 if summary is None else [f"{value:.1f}" for value in summary]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return "\n".join(lines)


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


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _model_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("model")
    group.add_argument("--model", default=DEFAULT_MODEL,
                       help=f"Hub repo id or local folder, in any FastVLM layout (default: {DEFAULT_MODEL})")
    group.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                       help="auto: cuda if available, else mps, else cpu (default: auto)")
    group.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                       help="auto: bfloat16 on cuda and cpu, float16 on mps (default: auto)")
    bits = group.add_mutually_exclusive_group()
    bits.add_argument("--load-in-4bit", action="store_true",
                      help="quantize the weights to 4 bits with bitsandbytes (NF4; bf16 compute on CUDA)")
    bits.add_argument("--load-in-8bit", action="store_true", help="quantize the weights to 8 bits with bitsandbytes")
    group.add_argument("--resolution", type=_positive_int, metavar="PIXELS",
                       help="side of the square the images are resized to, a multiple of 64 "
                            "(default: the checkpoint's, 1024 for Apple's)")
    group.add_argument("--image-mode", choices=["pad", "crop"],
                       help="pad: pad to a square like Apple's predict.py; crop: centre crop like transformers' "
                            "fast_vlm (default: the checkpoint's, pad for Apple's)")
    return options  # fmt: skip


def _generation_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("generation")
    group.add_argument("--max-new-tokens", type=_positive_int, default=256, metavar="N",
                       help="maximum number of generated tokens (default: 256)")
    group.add_argument("--temperature", type=_non_negative_float, default=0.0, metavar="T",
                       help="0: greedy decoding; above 0: sampling at this temperature (default: 0)")
    group.add_argument("--top-p", type=_probability, metavar="P", help="nucleus sampling threshold, with --temperature")
    group.add_argument("--system-prompt", metavar="TEXT",
                       help='system message (default: the chat template\'s, "You are a helpful assistant.")')
    return options  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastvlm-hf", description="Apple's FastVLM through Hugging Face transformers.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_package_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    model_options, generation_options = _model_options(), _generation_options()

    predict = commands.add_parser(
        "predict", parents=[common, model_options, generation_options], help="answer a prompt about images",
        description="Answer a prompt about one or more images; the answer streams to stdout, status lines and "
                    "--stats go to stderr.")  # fmt: skip
    predict.add_argument("--image", required=True, action="append", metavar="PATH_OR_URL",
                         help="image file (any format Pillow reads) or http(s) URL; repeat for several images")
    predict.add_argument("--prompt", required=True, metavar="TEXT", help='e.g. "Describe the image."')
    predict.add_argument("--num-beams", type=_positive_int, default=1, metavar="N",
                         help="beam search with N beams (no streaming) (default: 1)")
    predict.add_argument("--stats", action="store_true",
                         help="after the answer, print preprocessing, vision, prefill, TTFT and decode times on stderr")
    predict.add_argument("--json", action="store_true",
                         help="print one JSON object (text, model, settings, timings) instead of streaming")
    predict.set_defaults(handler=run_predict)  # fmt: skip

    chat = commands.add_parser(
        "chat", parents=[common, model_options, generation_options], help="talk about an image, turn by turn",
        description=f"A conversation about one image, one question per line on stdin (typed or piped). The image is "
                    f"encoded once and every turn reuses the conversation's KV cache. {CHAT_HELP}")  # fmt: skip
    chat.add_argument("--image", required=True, metavar="PATH_OR_URL", help="image file or http(s) URL")
    chat.set_defaults(handler=run_chat)

    bench = commands.add_parser(
        "bench", parents=[common, model_options], help="time the phases of generation",
        description="Time preprocessing, vision encoder, prefill, time to first token (TTFT), decode, and the TTFT "
                    "of a follow-up chat turn about the same image, over several runs after a warm-up; print a "
                    "Markdown table of medians, minima and maxima.")  # fmt: skip
    bench.add_argument("--image", metavar="PATH_OR_URL", help="image to describe (default: a 1024x768 test picture)")
    bench.add_argument("--repeats", type=_positive_int, default=5, metavar="N", help="timed runs (default: 5)")
    bench.add_argument("--max-new-tokens", type=_positive_int, default=32, metavar="N",
                       help="tokens generated per turn, exactly (default: 32)")  # fmt: skip
    bench.set_defaults(handler=run_bench)

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
