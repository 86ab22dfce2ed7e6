"""Exception types. Every user-facing failure is a ``QuantpatchError`` so the CLI can turn it
into one line on stderr and exit code 2, while API users can catch the specific subtype."""

from __future__ import annotations


class QuantpatchError(Exception):
    """Base class for all errors caused by bad input or bad files (not by bugs)."""


class UnknownNameError(QuantpatchError, ValueError):
    """A dataset, model, attack, defence or analysis name that no registry knows."""


class InvalidSpecError(QuantpatchError, ValueError):
    """An impossible quantization spec, e.g. ``w0a0`` or ``w33a8``."""


class PatchTooLargeError(QuantpatchError, ValueError):
    """A patch that does not fit inside the image."""


class ShapeError(QuantpatchError, ValueError):
    """Tensors whose shapes do not fit together."""


class DataNotFoundError(QuantpatchError, FileNotFoundError):
    """A data root or file that is missing or does not have the expected layout."""


class CorruptFileError(QuantpatchError):
    """A checkpoint, patch or result file that cannot be read back (truncated, wrong format)."""


class ConfigError(QuantpatchError, ValueError):
    """A study config that fails validation."""


class OutputPathError(QuantpatchError, OSError):
    """An output file or folder that cannot be written (not a folder, a kernel pseudo-filesystem,
    no permission), refused before any work so no run dies at its last step."""


class MissingDependencyError(QuantpatchError, ImportError):
    """An optional package a requested feature needs is not installed (the message says which
    extra to install)."""
