"""Errors a user can act on.

Every message raised through these classes is shown verbatim to the person who uploaded the model (the API
puts it in the job's ``error`` field), so it must say what is wrong and how to fix it, and never echo file
system paths of the server.
"""


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
