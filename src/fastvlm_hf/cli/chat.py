"""``fastvlm-hf chat``: a conversation about one image, one question per line on stdin."""

from __future__ import annotations

import argparse
import sys

from .loading import load, load_image
from .messages import CLIError, refuse_image_placeholders, status
from .options import add_command, add_generation_options, add_model_options, generation_kwargs

CHAT_HELP = "Type a question and press Enter. /image PATH: talk about another image; /reset: start over; /exit: quit."


def add_parser(commands) -> None:
    parser = add_command(
        commands, "chat", run, help="talk about an image, turn by turn",
        description=f"A conversation about one image, one question per line on stdin (typed or piped). The image is "
                    f"encoded once and every turn reuses the conversation's KV cache. {CHAT_HELP}")  # fmt: skip
    parser.add_argument("--image", required=True, metavar="PATH_OR_URL", help="image file or http(s) URL")
    add_model_options(parser)
    add_generation_options(parser)


def run(args: argparse.Namespace) -> int:
    from ..chat import ChatSession

    image = load_image(args.image)
    processor, model = load(args)
    session = ChatSession(model, processor, [image], generation_kwargs(args), system_prompt=args.system_prompt)
    interactive = sys.stdin.isatty()
    if interactive:
        status(f"Chatting about {args.image}. {CHAT_HELP}")
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
        status("New conversation about the same image.")
    elif command == "/image" and argument.strip():
        try:
            session.set_images([load_image(argument.strip())])
        except CLIError as error:
            status(f"fastvlm-hf: error: {error}")
        else:
            status(f"New conversation about {argument.strip()}.")
    else:
        status(f"Unknown command {line!r}. {CHAT_HELP}")
    return True


def _chat_turn(session, processor, question: str) -> None:
    from transformers import TextStreamer

    from ..chat import ContextLengthError, context_length

    if session.will_encode_images:
        status("Encoding image ...")
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    try:
        refuse_image_placeholders(question, processor.image_token, "question")
        session.ask(question, streamer=streamer)
        if session.context_is_full:
            status(f"fastvlm-hf: the conversation has filled the model's context ({context_length(session.model)} "
                   f"tokens), so the answer stops here; /reset starts a new conversation about the same image")
    except CLIError as error:
        status(f"fastvlm-hf: error: {error}")
    except ContextLengthError as error:
        status(f"fastvlm-hf: error: {error}; /reset starts a new conversation")
