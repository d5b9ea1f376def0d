"""What the command says on stderr: status lines, and errors a user can fix as one line each."""

from __future__ import annotations

import os
import sys


LOCAL_HINT = "or pass a local folder with --model PATH"


class CLIError(Exception):
    """An error with a message meant for the user: printed on one line, exit code 1."""


def status(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def refuse_image_placeholders(text: str, image_token: str, what: str) -> None:
    """The command places each image's placeholder itself, before the text: one typed in the text would be an image
    token with no image behind it."""
    count = text.count(image_token)
    if count:
        raise CLIError(f"{count} `{image_token}` in the {what}: the images (--image) go before the text by "
                       f"themselves, one `{image_token}` each; leave `{image_token}` out of the {what}")  # fmt: skip


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def describe_load_error(model_id: str, error: BaseException) -> str:
    """One line that says why `model_id` did not load and what to do, from the Hub errors behind `error`."""
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    causes = _causes(error)
    if any(isinstance(cause, GatedRepoError) for cause in causes):
        return f"model {model_id!r} is gated: accept its terms on huggingface.co and log in with `hf auth login`"
    if any(isinstance(cause, RepositoryNotFoundError) for cause in causes):
        return f"model {model_id!r} is neither a local folder nor a repo on the Hugging Face Hub: check the name, {LOCAL_HINT}"
    if any(isinstance(cause, (OfflineModeIsEnabled, LocalEntryNotFoundError)) for cause in causes):
        if _hub_offline():
            return (f"model {model_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids "
                    f"downloading it (nor is it a local folder): run once without HF_HUB_OFFLINE to download it, "
                    f"{LOCAL_HINT}")  # fmt: skip
        return no_connection(model_id)
    return f"cannot load model {model_id!r}: {first_line(error)}"


def no_connection(model_id: str, local_hint: str = LOCAL_HINT) -> str:
    return (f"cannot download model {model_id!r} (no connection to the Hugging Face Hub?): it is neither in the local "
            f"cache nor a local folder; connect once to download it, {local_hint} (HF_HUB_OFFLINE=1 then uses the "
            f"cache only)")  # fmt: skip


def _causes(error: BaseException) -> list[BaseException]:
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
