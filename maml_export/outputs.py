"""Checks that an output path can be written, made before the long work that would write it.

A run that trains for an hour, an export that traces for a minute or a benchmark that times for ten
must not fail at the end because `--out` is read-only, names a file, or lies under a file: each check
tries what the command will do (create a file there) and raises one `OutputError` line naming the
option, the path and the reason. Nothing is left behind: a folder that does not exist yet is tried in
its nearest existing parent, and not created.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import OutputError


def _check_folder(folder: Path, option: str, named: Path) -> None:
    """Files can be created in `folder` (or, if it does not exist yet, in its nearest existing parent);
    errors name `named`, the path the user gave."""
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file, not a folder" if existing == named.absolute() else f"lies under the file {existing}"
        raise OutputError(f"{option} {named} {what}")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".maml-export-write-check.")
    except OSError as e:
        where = "" if existing == named.absolute() else f" (in {existing})"
        raise OutputError(f"{option} {named}: cannot write there{where}: {e.strerror or e}") from None
    os.close(fd)
    os.unlink(probe)


def check_writable_dir(path: str | os.PathLike, option: str) -> None:
    """Raise OutputError unless files can be created in folder `path` (made later if it does not exist)."""
    _check_folder(Path(path), option, Path(path))


def check_writable_file(path: str | os.PathLike, option: str) -> None:
    """Raise OutputError unless file `path` can be written (in a folder that exists)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{option} {path} is a folder, not a file")
    if path.exists():  # replaced later: opening it for appending changes nothing
        try:
            with open(path, "ab"):
                pass
        except OSError as e:
            raise OutputError(f"{option} {path}: cannot write it: {e.strerror or e}") from None
        return
    if not path.parent.is_dir():  # the commands write such a file where it is, making no folders
        _check_folder(path.parent, option, path)  # a file in the way is said as such
        raise OutputError(f"{option} {path}: the folder {path.parent} does not exist")
    _check_folder(path.parent, option, path)
