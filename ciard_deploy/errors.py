"""One tree of user-facing errors; the CLI maps each to an exit code (see EXIT_CODES).

Internal bugs stay ordinary exceptions and keep their traceback.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_ENVIRONMENT = 3


class CiardError(Exception):
    """A problem the user can fix; printed as one line, never a traceback."""

    exit_code = EXIT_BAD_INPUT


class UsageError(CiardError):
    """Bad argument or option value (malformed eps, unknown name, ...)."""


class RecipeError(CiardError):
    """A recipe file that does not validate."""


class ArtifactError(CiardError):
    """A checkpoint, export or pack that is missing, corrupt or does not match."""


class DataError(CiardError):
    """Dataset files absent or unreadable."""


class EnvironmentMissing(CiardError):
    """Hardware or software the command needs is not present (no GPU, no TensorRT)."""

    exit_code = EXIT_ENVIRONMENT


class BackendUnavailable(EnvironmentMissing):
    """A runtime backend cannot be imported or started here."""


class GateFailed(CiardError):
    """A verification gate did not pass."""

    exit_code = EXIT_GATE_FAILED
