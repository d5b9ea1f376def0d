"""``fastvlm-hf bench``: time the phases of generation over several runs; print a Markdown table."""

from __future__ import annotations

import argparse

from .loading import load, load_image
from .messages import status
from .options import add_command, add_model_options, positive_int

BENCH_QUESTIONS = ("Describe the image.", "What colours are in it?")


def add_parser(commands) -> None:
    parser = add_command(
        commands, "bench", run, help="time the phases of generation",
        description="Time preprocessing, vision encoder, prefill, time to first token (TTFT), decode, and the TTFT "
                    "of a follow-up chat turn about the same image, over several runs after a warm-up; print a "
                    "Markdown table of medians, minima and maxima.")  # fmt: skip
    parser.add_argument("--image", metavar="PATH_OR_URL", help="image to describe (default: a 1024x768 test picture)")
    parser.add_argument("--repeats", type=positive_int, default=5, metavar="N", help="timed runs (default: 5)")
    add_model_options(parser)
    generation = parser.add_argument_group("generation options")
    generation.add_argument("--max-new-tokens", type=positive_int, default=32, metavar="N",
                            help="tokens generated per turn, exactly (default: 32)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    image = load_image(args.image) if args.image else _bench_image()
    processor, model = load(args)
    kwargs = {"max_new_tokens": args.max_new_tokens, "min_new_tokens": args.max_new_tokens, "do_sample": False}
    status("Warming up ...")
    _bench_round(model, processor, image, kwargs)
    rounds = []
    for index in range(args.repeats):
        status(f"Run {index + 1}/{args.repeats} ...")
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
    print(summary_table(rows))
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
    from ..chat import ChatSession
    from ..stats import GenerationTimer

    session = ChatSession(model, processor, [image], kwargs)
    timings = []
    for question in BENCH_QUESTIONS:
        timer = GenerationTimer(model)
        with timer:
            session.ask(question, timer=timer)
        timings.append(timer.timings(prompt_tokens=session.prompt_tokens))
    return tuple(timings)


def summary_table(rows: list[tuple[str, list[float | None]]]) -> str:
    """A Markdown table of the median, minimum and maximum of each row's measured values."""
    from ..stats import markdown_table, summarize

    cells = []
    for name, values in rows:
        summary = summarize(values)
        cells.append([name, *(["n/a"] * 3 if summary is None else [f"{value:.1f}" for value in summary])])
    return markdown_table(["phase", "median", "min", "max"], cells, right_aligned={1, 2, 3})
