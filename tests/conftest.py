"""Where the tests find Omniglot, and what a test that needs it does without it: one place for both.

DATA is `$OMNIGLOT_DIR`, else `../shared/omniglot` beside the checkout, if that folder exists; else None.
Tests that need it are marked `@needs_omniglot` (or call `require_omniglot()`, e.g. in a fixture): without
the data they skip, all with the one reason NO_DATA; with MAML_EXPORT_REQUIRE_DATA=1 (CI, which has the
data, sets it) they fail instead, so that CI never passes by skipping. The environment of the code under
test agrees: OMNIGLOT_DIR is set to DATA when there is one and unset when there is none, so that an
unmarked test that needs the data fails on a machine without it instead of passing on this one.

    python -m pytest -q --no-omniglot     # as on a fresh machine: the data ignored wherever it is

Tests that take ten seconds or more are marked `slow` (by hand, or by using a fixture of SLOW_FIXTURES):
`python -m pytest -q -m "not slow"` is the fast loop; CI runs them all.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from maml_export.process import configure

# the settings every console script runs under (MKL path, allocator, quiet Paddle), before any test imports
# Paddle: tests that call a CLI's function in-process get what the CLI gets
configure()

FALLBACK = Path(__file__).resolve().parents[2] / "shared" / "omniglot"
NO_DATA = ("needs the Omniglot dataset: set OMNIGLOT_DIR to a folder holding images_background and "
           "images_evaluation (.npz, .zip or folders)")
REQUIRE = "MAML_EXPORT_REQUIRE_DATA"
DATA: str | None = None  # set by pytest_configure, before any test module is imported
needs_omniglot = pytest.mark.needs_omniglot


def find_omniglot(without: bool = False) -> str | None:
    """$OMNIGLOT_DIR, else the shared folder beside the checkout, if it is a folder; None with `without`."""
    if without:
        return None
    path = os.environ.get("OMNIGLOT_DIR") or str(FALLBACK)
    return path if os.path.isdir(path) else None


def sigint_default() -> None:
    """`preexec_fn` of a child a test stops with SIGINT (Ctrl-C): a shell without job control starts background
    commands with SIGINT ignored, children inherit that, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def require_omniglot() -> str:
    """DATA, or skip the calling test (fail it under MAML_EXPORT_REQUIRE_DATA=1) with the one reason."""
    if DATA is None:
        if os.environ.get(REQUIRE) == "1":
            pytest.fail(f"{NO_DATA} ({REQUIRE}=1: a missing dataset fails the tests that need it)", pytrace=False)
        pytest.skip(NO_DATA)
    return DATA


def pytest_addoption(parser):
    parser.addoption("--no-omniglot", action="store_true",
                     help="run as on a machine without Omniglot: ignore $OMNIGLOT_DIR and ../shared/omniglot")


def pytest_configure(config):
    global DATA
    config.addinivalue_line("markers", "needs_omniglot: the test reads the Omniglot dataset (skips without it)")
    DATA = find_omniglot(config.getoption("--no-omniglot"))
    if DATA is None:
        os.environ.pop("OMNIGLOT_DIR", None)
    else:
        os.environ["OMNIGLOT_DIR"] = DATA
    # No test reaches the internet: where no data is given, the trainer fetches Omniglot (trainer.data_dir); the
    # tests that fetch serve their own files on 127.0.0.1, and any other attempt meets a closed port at once.
    os.environ.setdefault("MAML_EXPORT_OMNIGLOT_URL", "http://127.0.0.1:9/python")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if item.get_closest_marker("needs_omniglot"):
        require_omniglot()


@pytest.fixture(scope="session")
def omniglot_dir() -> str:
    """The Omniglot folder; a test using this fixture (directly or through another) needs the data."""
    return require_omniglot()


# Module fixtures that export a model or train one (half a minute or more on 2 cores): the tests on them are slow
SLOW_FIXTURES = {"exported", "exported_batch", "exported_support", "shapes_run"}


def pytest_collection_modifyitems(items):
    for item in items:  # fixturenames: the whole closure, so a fixture built on omniglot_dir marks its users
        if "omniglot_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(needs_omniglot)
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder in which no file can be created: a chmod 555 one, or /sys/fs for root (who ignores the
    permission bits); skips if there is neither."""
    import tempfile
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        for candidate in (folder, Path("/sys/fs")):
            try:
                fd, probe = tempfile.mkstemp(dir=candidate)
            except OSError:
                yield candidate
                return
            os.close(fd)
            os.unlink(probe)
        pytest.skip("no read-only folder here")
    finally:
        folder.chmod(0o755)
