"""``fastvlm-hf predict``: answer a prompt about one or more images."""

from __future__ import annotations

import argparse
import json

from .loading import load, load_image
from .messages import CLIError, status
from .options import (
    add_command,
    add_generation_options,
    add_model_options,
    add_output_options,
    generation_kwargs,
    positive_int,
)


def add_parser(commands) -> None:
    parser = add_command(
        commands, "predict", run, help="answer a prompt about images",
        description="Answer a prompt about one or more images; the answer streams to stdout, status lines and "
                    "--stats go to stderr.")  # fmt: skip
    parser.add_argument("--image", required=True, action="append", metavar="PATH_OR_URL",
                        help="image file (any format Pillow reads) or http(s) URL; repeat for several images")
    parser.add_argument("--prompt", required=True, metavar="TEXT", help='e.g. "Describe the image."')
    add_model_options(parser)
    generation = add_generation_options(parser)
    generation.add_argument("--num-beams", type=positive_int, default=1, metavar="N",
                            help="beam search with N beams (no streaming) (default: 1)")
    output = add_output_options(parser)
    output.add_argument("--stats", action="store_true",
                        help="after the answer, print preprocessing, vision, prefill, TTFT and decode times on stderr")
    output.add_argument("--json", action="store_true",
                        help="print one JSON object (text, model, settings, timings) instead of streaming")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    from ..chat import conversation_start

    images = [load_image(path) for path in args.image]
    processor, model = load(args)
    streams = args.num_beams == 1 and not args.json  # transformers streams greedy and sampled decoding, not beams
    text_streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True) if streams else None
    messages = conversation_start(images, args.prompt, args.system_prompt)
    status(f"Encoding {_plural(len(images), 'image')} and generating ...")
    text, timings = answer_timed(model, processor, messages, generation_kwargs(args), text_streamer)

    if args.json:
        report = {"text": text, "model": args.model, "settings": _settings(args, processor, model),
                  "timings": timings.as_dict()}  # fmt: skip
        print(json.dumps(report, ensure_ascii=False))
    elif not streams:
        print(text)
    if args.stats:
        status("\n".join(["--- stats ---", *timings.report_lines()]))
    return 0


def answer_timed(model, processor, messages, kwargs: dict, text_streamer=None):
    """The answer to `messages` and the timings of its phases; tokens go to `text_streamer` as they come."""
    import torch

    from ..chat import ContextLengthError, fit_new_tokens, move_inputs
    from ..stats import GenerationTimer

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


def _plural(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"
