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


class OutputError(MamlError):
    """An output path (--out, --json) cannot be written: read-only, a file where a folder is needed, ..."""


def reason(error: BaseException) -> str:
    """`Type: message` of a library's exception, for an error line. numpy's answer to a file that is not a
    .npz ("This file contains pickled (object) data. If you trust the file you can load it unsafely...") is
    said as what it means: advice to unpickle a file from who knows where is never repeated."""
    if "allow_pickle" in str(error):
        return "not a .npz of plain arrays: numpy could only read it as pickled Python objects"
    return f"{type(error).__name__}: {error}"
