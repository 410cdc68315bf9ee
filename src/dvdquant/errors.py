"""Exceptions raised on bad input.

Every user-facing failure raises a subclass of :class:`DVDQuantError` with a one-line
message naming the problem; the CLI prints that line instead of a traceback.
"""


class DVDQuantError(ValueError):
    """Base class: bad input or state detected by dvdquant (message is one line)."""


class ConfigError(DVDQuantError):
    """A configuration value is out of range or inconsistent."""


class NonFiniteError(DVDQuantError):
    """A tensor that must be quantized holds NaN or Inf."""


class CheckpointError(DVDQuantError):
    """A checkpoint is corrupted, truncated, of another model, or of an unknown version."""
