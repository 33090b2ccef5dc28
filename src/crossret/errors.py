"""Error types. Every error a user can cause is a :class:`CrossretError` with a message that says
what is wrong *and* what to do about it; the CLI prints it to stderr and exits non-zero."""

from __future__ import annotations


class CrossretError(Exception):
    """Base class of all user-facing crossret errors."""


class DataError(CrossretError, ValueError):
    """A data file or array is unusable (missing keys, bad shapes, NaN, a single class, ...)."""


class ConfigError(CrossretError, ValueError):
    """A configuration value or command-line option is invalid."""


class CodeError(CrossretError, ValueError):
    """Hash codes are malformed (values other than ±1/{0,1}, mismatched code lengths, ...)."""


class FileFormatError(CrossretError):
    """A saved crossret file (index, checkpoint, run directory) is corrupt, truncated or foreign."""


class NumericalError(CrossretError, FloatingPointError):
    """A computation produced NaN or inf from finite inputs: training diverged (a learning rate too large
    for the data) or values overflowed float32. Also a :class:`FloatingPointError`, so code that catches
    the built-in (e.g. around a training loop) still does."""


class MissingExtraError(CrossretError, ImportError):
    """A feature needs an optional dependency group (an *extra*) that is not installed. The message names the
    ``pip install 'crossret[EXTRA]'`` command to run; :attr:`extra` is the extra's name. Also an
    :class:`ImportError`, so code that catches the built-in around an optional feature still does."""

    def __init__(self, message: str, *, extra: str, name: str | None = None) -> None:
        super().__init__(message)
        self.extra = extra
        self.name = name
