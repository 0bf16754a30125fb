"""The project's own errors: what the command line reports in one line.

Only these (and file-system errors) become ``error: ...`` with exit status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class RsaMlxError(Exception):
    """Base of the errors rsa_mlx raises for the user to act on."""


class InputError(RsaMlxError, ValueError):
    """Bad input (a file, a flag, a model or adapter folder), in one line."""


class ConfigError(InputError):
    """A bad configuration value, in one line naming the key."""


class DataError(InputError):
    """A problem with the user's data, stated in one line with its location."""


class TrainingError(RsaMlxError, RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message says why."""


class Stopped(RsaMlxError):
    """Work stopped by a signal after saving what it had; the message says how
    to continue. The command line exits with ``128 + signum``."""

    signum: int


def quote(path) -> str:
    """A path as messages show it: quoted, so spaces and odd names are plain."""
    return repr(str(path))
