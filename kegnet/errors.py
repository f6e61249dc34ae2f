"""Errors a user can act on, and the interrupts no optional step may swallow.

Every message raised through the ``KegnetError`` classes is shown verbatim to the person who uploaded the model
(the API puts it in the job's ``error`` field), so it must say what is wrong and how to fix it, and never echo
file system paths of the server.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar


class KegnetError(ValueError):
    """Base class for errors caused by the user's input (bad checkpoint, spec or config)."""


class CheckpointError(KegnetError):
    """The uploaded weights cannot be read safely, or are not a state dict."""


class SpecError(KegnetError):
    """The model spec does not describe the uploaded weights (architecture, shapes, keys)."""


class CompressionError(KegnetError):
    """The requested compression cannot be applied (unknown layer, impossible ranks...)."""


class NothingToFactorize(CompressionError):  # noqa: N818 - a CompressionError, named for its case
    """The layers named exist, but none can be factorized or gets smaller at the ranks chosen (with
    ``compression.quantize: int8`` the job then quantizes the teacher itself)."""


class Cancelled(Exception):  # noqa: N818 - reads better at the raise site than CancelledError
    """Raised inside the pipeline when the caller's cancel check returns True."""


# Exceptions the caller raises into a running job from outside it (the worker: Celery's soft time limit, which
# derives from Exception). Steps that make an optional file catch Exception so that a failure there keeps the job;
# they must let these through, or a job past its time limit would go on as if its int8 file had failed.
_INTERRUPTS: ContextVar[tuple[type[BaseException], ...]] = ContextVar("kegnet_interrupts", default=())


@contextlib.contextmanager
def interrupting(kinds: tuple[type[BaseException], ...]) -> Iterator[None]:
    """Within this block, ``reraise_interrupts`` re-raises ``kinds`` (and ``Cancelled``) wherever it is called."""
    token = _INTERRUPTS.set(tuple(kinds))
    try:
        yield
    finally:
        _INTERRUPTS.reset(token)


def reraise_interrupts(exc: BaseException) -> None:
    """Re-raise ``exc`` if it is a cancel or one of the interrupts of the enclosing ``interrupting`` block; call it
    first in every ``except Exception`` that lets the job go on."""
    if isinstance(exc, (Cancelled, *_INTERRUPTS.get())):
        raise exc
