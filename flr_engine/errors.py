"""The project's own errors: one base class, :class:`FLRError`.

The command line prints an ``FLRError`` as ``flr CMD: error: file:line: field: what is
wrong`` and exits with code 2; any other exception is a bug and shows its traceback.
Each subclass also derives from the built-in exception it refines (``ValueError``, ...), so
``except ValueError`` in user code keeps working.
"""

from __future__ import annotations


class FLRError(Exception):
    """Base class of every error flr-engine raises on purpose (bad input, bad settings)."""


class InputError(FLRError, ValueError):
    """Bad conversation / reply input; ``field`` names the offending field."""

    def __init__(self, message: str, field: str | None = None):
        self.message, self.field = message, field
        super().__init__(f"field '{field}': {message}" if field else message)

    def __reduce__(self):  # picklable with its field (for worker processes)
        return type(self), (self.message, self.field)


class ConfigError(FLRError, ValueError):
    """A setting (a config field, a command-line option) that cannot be used."""


class MissingFileError(FLRError, FileNotFoundError):
    """An input file or folder that does not exist."""


class DependencyError(FLRError, RuntimeError):
    """An optional dependency a feature needs is not installed; the message says what to install."""
