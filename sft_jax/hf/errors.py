"""The two ways a model directory can be refused: a feature we do not implement, or a file
that is not usable. Kept apart so every config reader (config.py, families.py) raises the same
classes without importing each other."""

from __future__ import annotations


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or one of its features is not implemented by our decoder."""


class ModelFileError(ValueError):
    """A file of the model directory is unreadable, incomplete or inconsistent (config.json that
    is not JSON or lacks a field, a truncated safetensors file, a missing tensor): bad input,
    reported in one line naming the file, like bad data."""
