"""What the command says on stderr: status lines, and errors a user can fix as one line each."""

from __future__ import annotations

import os
import sys


class CLIError(Exception):
    """An error with a message meant for the user: printed on one line, exit code 1."""


def status(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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
    return f"cannot load model {model_id!r}: {first_line(error)}"


def _causes(error: BaseException) -> list[BaseException]:
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
