"""Notices one dependency prints about another, which a user of the command reads as failures of the command.

The command owns its terminal, so it drops them by their message, and nothing else: a library's own warnings about
the user's input or setup still show. The Python API leaves other libraries' warnings alone.
"""

from __future__ import annotations

import logging
import sys
import warnings

# Logged (Python logging) when the model loads with bitsandbytes 0.50+ and the `kernels` package installed (a
# dependency of transformers from 5.25 on), on a CPU with AVX512-BF16: bitsandbytes asks `kernels` for its CPU 4-bit
# kernel, which offline skips the Hub's publisher check and then fails; bitsandbytes computes on without it.
LOGGED = (
    "Failed to load CPU gemm_4bit_forward from kernels-community",
    "Skipping publisher trust check for 'kernels-community/",
)

# Warned (FutureWarning) when TRL reads the attribute transformers 5.25 renamed to `is_activation_checkpointing`.
WARNED = (r"`is_gradient_checkpointing` is deprecated",)


class _DropDependencyNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(LOGGED)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record comes, as logging's last resort does."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def hide_dependency_notices() -> None:
    """Drops the notices above for the rest of the process. Records of loggers without a handler of their own end at
    a root handler that prints what logging's last resort would (WARNING and above, the message alone), less these."""
    root = logging.getLogger()
    if not any(isinstance(handler, _StderrHandler) for handler in root.handlers):
        handler = _StderrHandler()
        handler.setLevel(logging.WARNING)
        handler.addFilter(_DropDependencyNotices())
        root.addHandler(handler)
    for message in WARNED:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
