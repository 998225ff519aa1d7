"""Typed errors: every failure a user can cause is one of these, reported by the CLIs as one line.

The CLIs catch `MamlError` and print `error: <message>` with a non-zero exit; messages name the
option that fixes the problem.
"""


class MamlError(Exception):
    """Base of every error this project raises on purpose (bad input, missing data, ...)."""


class DataError(MamlError):
    """Omniglot is missing, unreadable or cannot give the requested tasks."""


class CheckpointError(MamlError):
    """A checkpoint is missing, corrupt, or does not match the model asked for."""


class ConfigError(MamlError, ValueError):
    """Options that contradict each other or are out of range."""


class ExportError(MamlError):
    """The static graph or ONNX conversion failed, or the export does not match eager Paddle."""
