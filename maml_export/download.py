"""Downloading Omniglot's official zips into the cache (`maml-train download`), checked by md5.

The files are `images_background.zip` and `images_evaluation.zip` of the official repository
(https://github.com/brendenlake/omniglot, folder python/), the same bytes `data.load_omniglot` reads. Each is
written atomically: streamed to a temporary file beside its destination while its md5 is computed, renamed into
place only when the md5 is the published one; a mismatch or a broken connection leaves nothing behind. A file
already there with the right md5 is not downloaded again.

The base URL is `--base-url`, else $MAML_EXPORT_OMNIGLOT_URL, else the official one (a mirror serves the two
files under one folder URL). The default folder is `omniglot/` in the cache ($MAML_EXPORT_CACHE or
~/.cache/maml-export), which `trainer.data_dir` falls back to when neither --data nor $OMNIGLOT_DIR is given.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from .data import _default_cache_dir
from .errors import DataError

OFFICIAL_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
URL_ENV = "MAML_EXPORT_OMNIGLOT_URL"
# The published md5s of the official zips (the ones torchvision's Omniglot checks too).
FILES = {"images_background.zip": "68d2efa1b9178cc56df9314c21c6e718",
         "images_evaluation.zip": "6b91aef0f799c5bb55b94e3f2daec811"}
_CHUNK = 1 << 16


def default_dir() -> Path:
    """Where `maml-train download` puts the zips by default: omniglot/ in the cache."""
    return _default_cache_dir().expanduser() / "omniglot"


def md5(path: Path) -> str:
    """The md5 of a file, hex."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def downloaded(folder: str | os.PathLike | None = None, files: dict | None = None) -> str | None:
    """`folder` (default: `default_dir()`) if both zips are there with their published md5s (`files`: other
    names and md5s), else None."""
    folder = Path(folder) if folder is not None else default_dir()
    ok = all((folder / name).is_file() and md5(folder / name) == digest for name, digest in (files or FILES).items())
    return str(folder) if ok else None


def _offline(url: str, error: BaseException, dest: Path) -> DataError:
    why = getattr(error, "reason", None) or error
    return DataError(f"cannot download {url} ({type(error).__name__}: {why}); offline? get images_background.zip and "
                     f"images_evaluation.zip from https://github.com/brendenlake/omniglot/tree/master/python and pass "
                     f"their folder with --data (or OMNIGLOT_DIR), put them in {dest}, or point --base-url (or "
                     f"{URL_ENV}) at a mirror")


def _fetch(url: str, file: Path, expected: str, progress: bool, timeout: float) -> None:
    """Stream `url` to a temporary file beside `file`, then rename it into place if its md5 is `expected`."""
    tmp, writing = None, False  # writing: an OSError is the disk's, not the network's
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            h = hashlib.md5()
            writing = True
            with tempfile.NamedTemporaryFile(dir=file.parent, prefix=f".{file.name}.", suffix=".part",
                                             delete=False) as out, \
                    tqdm(total=total, desc=file.name, unit="B", unit_scale=True, disable=not progress,
                         leave=False) as bar:
                tmp = out.name
                while True:
                    writing = False
                    chunk = response.read(_CHUNK)
                    if not chunk:
                        break
                    writing = True
                    out.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
            writing = True
        if h.hexdigest() != expected:
            raise DataError(f"{url} has md5 {h.hexdigest()}, not the published {expected}: refused, nothing was "
                            f"kept in {file.parent} (a wrong or changed mirror? check --base-url / {URL_ENV})")
        os.replace(tmp, file)
        tmp = None
    except urllib.error.HTTPError as error:
        raise DataError(f"cannot download {url} (HTTP {error.code} {error.reason}); check --base-url / {URL_ENV}, "
                        "or get the files from https://github.com/brendenlake/omniglot/tree/master/python and pass "
                        "their folder with --data") from None
    except OSError as error:
        if writing:
            raise DataError(f"cannot write {file} ({error.strerror or error}): pass another folder") from None
        raise _offline(url, error, file.parent) from None
    except ValueError as error:  # a malformed URL ("unknown url type")
        raise DataError(f"cannot download {url} ({error}): check --base-url / {URL_ENV}") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def download_omniglot(dest: str | os.PathLike | None = None, base_url: str | None = None, progress: bool = True,
                      timeout: float = 60, files: dict | None = None) -> Path:
    """Download the official Omniglot zips into `dest` (default `default_dir()`) from `base_url` (default
    $MAML_EXPORT_OMNIGLOT_URL, else the official URL), each checked against its md5; returns `dest`, which
    `--data` then takes. Files already there with the right md5 are kept; a one-line DataError otherwise.
    `files` ({name: md5}, default FILES) is for other files than Omniglot's (the tests' own)."""
    dest = Path(dest).expanduser() if dest is not None else default_dir()
    base = (base_url or os.environ.get(URL_ENV) or OFFICIAL_URL).rstrip("/")
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create {dest} ({e.strerror}): pass another folder") from None
    for name, expected in (files or FILES).items():
        file = dest / name
        if file.is_file() and md5(file) == expected:
            continue
        _fetch(f"{base}/{name}", file, expected, progress, timeout)
    return dest
