"""What the kernels ask of their environment: is Triton installed, is it interpreting, log a thing once.

Imports neither triton nor diffusers, so any layer may ask before choosing a path.
"""
from __future__ import annotations

import logging
import os

_TRUE = ("1", "true", "on", "yes")      # the values Triton itself reads as true (knobs.env_bool)
_LOGGED: set = set()


def triton_available() -> bool:
    """Whether ``import triton`` works."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter: ``TRITON_INTERPRET`` set to a value Triton
    reads as true (``1``, ``true``, ``on``, ``yes``, any case; CI sets ``1``)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


def log_once(logger: logging.Logger, key, msg: str, *args) -> None:
    """``logger.info(msg, *args)`` the first time ``key`` is seen in this process."""
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.info(msg, *args)
