"""Typed errors. Every error a user can hit says what went wrong and what to do next.

All inherit from :class:`SlimcError`, so callers can catch one type; the CLI prints the
message (no traceback) and exits with status 2 for user errors, 1 for internal failures.
"""

from __future__ import annotations


class SlimcError(Exception):
    """Base class of every error slimc raises on purpose."""


class ModelLoadError(SlimcError):
    """The model could not be read: missing, truncated, not a model, or missing external data."""


class UnsafeModelError(ModelLoadError):
    """The model format can execute arbitrary code when loaded (pickled ``.pt``)."""


class NoKVCacheError(ModelLoadError):
    """Generation was asked of a graph without ``past_key_values.*`` inputs (no KV cache): each token would
    recompute the whole prefix. The message says how to export the model with the cache."""


class ExportError(SlimcError):
    """A PyTorch / Hugging Face model could not be exported to ONNX."""


class PassConfigError(SlimcError):
    """A ``--passes`` string or a pass option is invalid (unknown name, bad value)."""


class PassFailedError(SlimcError):
    """A pass raised, or its result failed verification. Names the pass and what ran before."""


class VerificationError(SlimcError):
    """A model failed the ONNX checker, did not load in ONNX Runtime, or changed its outputs."""


class DataError(SlimcError):
    """Calibration or evaluation data is missing, empty, or does not match the model's inputs."""


class OutputPathError(SlimcError):
    """The output path is the input, or its folder cannot be written."""


class LatencyGuardError(SlimcError):
    """A compressed model measured slower than its input; the pass refused it (``force=true`` keeps it)."""


class OptionError(SlimcError):
    """An argument of `compile()` or a command-line option has an invalid value (``threads=-3``,
    ``seq_len=0``, a malformed ``max_loss``)."""


class FidelityGuardError(SlimcError):
    """The result's measured fidelity fails the ``max_loss`` bound the caller set: it is refused, nothing is written."""


class BackendError(SlimcError):
    """The backend could not build or run the model."""


class TargetError(SlimcError):
    """The model cannot be exported to the ``--target`` (an op it cannot represent, a failed conversion)."""


class MissingExtraError(TargetError):
    """The target's converter or runtime is not installed; the message says which command installs it."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-blank line of an exception's message (its type name if none), cut at ``limit``.

    Library errors (ORT, torch, onnx) often carry pages of context; a user needs the first line.
    """
    line = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
    return line if len(line) <= limit else line[:limit] + "..."


class NothingToDoError(SlimcError):
    """A pass was asked for something it cannot do at all on this model (nothing of the requested
    kind exists, or everything is blocked); the message gives the reasons. Options such as
    ``allow_noop=true`` accept the unchanged model instead."""


class BudgetError(OptionError):
    """A ``slimc search`` budget is malformed (``speedup>=x``), names an unknown measure, or no
    candidate in the search space can meet it; the message says what to write or relax."""
