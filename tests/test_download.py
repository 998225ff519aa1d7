"""maml-train download: Omniglot's zips fetched from a local HTTP server (127.0.0.1, no internet), md5-checked,
renamed into place (a mismatch leaves nothing behind), and one error line when the server cannot be reached."""
import functools
import hashlib
import http.server
import io
import os
import socket
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from maml_export.data import load_omniglot
from maml_export.download import FILES, URL_ENV, download_omniglot, downloaded
from maml_export.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


def omniglot_zip(half: str, characters: int, first: int) -> bytes:
    """A tiny zip in the official layout (images_<half>/<Alphabet>/characterNN/XXXX_YY.png), 3 drawings each."""
    rng = np.random.default_rng(first)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for c in range(characters):
            for d in range(1, 4):
                image = Image.new("1", (105, 105), 1)
                ImageDraw.Draw(image).line([tuple(int(v) for v in rng.integers(10, 95, 2)) for _ in range(3)],
                                           fill=0, width=4)
                png = io.BytesIO()
                image.save(png, format="PNG")
                z.writestr(f"images_{half}/Alpha/character{c + 1:02d}/{first + c:04d}_{d:02d}.png", png.getvalue())
    return buffer.getvalue()


class Server:
    """http.server in a thread on 127.0.0.1, serving a folder; counts the requests per path."""

    def __init__(self, folder: Path):
        requests = self.requests = []

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                requests.append(self.path)
                super().do_GET()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                     functools.partial(Handler, directory=str(folder)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/python"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path):
    """Serves tmp_path/www/python/{images_background,images_evaluation}.zip: a tiny Omniglot."""
    folder = tmp_path / "www" / "python"
    folder.mkdir(parents=True)
    (folder / "images_background.zip").write_bytes(omniglot_zip("background", 3, 1))
    (folder / "images_evaluation.zip").write_bytes(omniglot_zip("evaluation", 2, 4))
    s = Server(tmp_path / "www")
    s.files = {name: hashlib.md5((folder / name).read_bytes()).hexdigest() for name in FILES}
    yield s
    s.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_download_writes_checked_files_that_load_and_is_not_repeated(server, tmp_path):
    dest = tmp_path / "cache" / "omniglot"
    assert downloaded(dest, server.files) is None
    assert download_omniglot(dest, server.url, progress=False, files=server.files) == dest
    assert sorted(p.name for p in dest.iterdir()) == sorted(FILES)  # no temporary file left
    assert downloaded(dest, server.files) == str(dest)
    assert downloaded(dest) is None  # not Omniglot's published md5s: not taken for the real files
    images = load_omniglot(dest, cache_dir=tmp_path / "pixels")  # the zips data.py reads
    assert images.shape == (5, 3, 28, 28) and images.max() == 1.0
    assert sorted(server.requests) == sorted(f"/python/{name}" for name in FILES)
    download_omniglot(dest, server.url, progress=False, files=server.files)  # already there, md5 right
    assert len(server.requests) == 2


def test_a_checksum_mismatch_is_refused_and_leaves_nothing_in_the_cache(server, tmp_path):
    dest = tmp_path / "cache" / "omniglot"
    wrong = {**server.files, "images_background.zip": "0" * 32}
    with pytest.raises(DataError) as error:
        download_omniglot(dest, server.url, progress=False, files=wrong)
    message = str(error.value)
    assert "\n" not in message and f"md5 {server.files['images_background.zip']}" in message
    assert "0" * 32 in message and "refused" in message
    assert list(dest.iterdir()) == []  # nothing half-written, and the second file never started
    assert downloaded(dest, wrong) is None


def test_offline_is_one_line_naming_where_to_get_the_files_and_the_option_and_variable(tmp_path):
    with pytest.raises(DataError) as error:
        download_omniglot(tmp_path / "o", f"http://127.0.0.1:{free_port()}/python", progress=False, timeout=5)
    message = str(error.value)
    assert "\n" not in message and "offline?" in message
    for what in ("https://github.com/brendenlake/omniglot", "--data", "OMNIGLOT_DIR", "--base-url", URL_ENV):
        assert what in message, what
    assert list((tmp_path / "o").iterdir()) == []


def test_a_missing_file_on_the_server_is_an_http_error_line(server, tmp_path):
    with pytest.raises(DataError, match=r"HTTP 404"):
        download_omniglot(tmp_path / "o", server.url + "/nowhere", progress=False, files=server.files)


def test_cli_takes_the_base_url_from_the_environment_and_refuses_the_wrong_md5_in_one_line(server, tmp_path):
    """`maml-train download` checks Omniglot's published md5s: the tiny zips served here are refused."""
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(ROOT), URL_ENV: server.url, "MAML_EXPORT_CACHE": str(cache)}
    done = subprocess.run([sys.executable, "-m", "train", "download"], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()  # the progress bar's, then the error
    assert lines[-1].startswith("error: ") and "not the published" in lines[-1], lines
    assert sum("error" in line for line in lines) == 1, lines
    assert server.requests == ["/python/images_background.zip"]  # the environment's URL, and stopped at once
    assert list((cache / "omniglot").iterdir()) == []
    # without network, data and download, training says how to get data, in one line
    offline = {**env, URL_ENV: f"http://127.0.0.1:{free_port()}"}
    offline.pop("OMNIGLOT_DIR", None)
    done = subprocess.run([sys.executable, "-m", "train", "--out", str(tmp_path / "run")], capture_output=True,
                          text=True, env=offline, cwd=ROOT, timeout=300)
    assert done.returncode == 1 and "maml-train download" in done.stderr and "--data" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_training_without_data_fetches_omniglot_into_the_cache_first_and_then_reads_it(server, tmp_path, monkeypatch):
    """No --data, no OMNIGLOT_DIR, nothing in the cache: `trainer.data_dir` (what `python -m train` and `train
    evaluate` resolve their data with) downloads the zips from the mirror and goes on with them; the second time
    it finds them there. The served zips are tiny, so their md5s stand in for the published ones."""
    from maml_export import download
    from maml_export.trainer import data_dir
    monkeypatch.setattr(download, "FILES", server.files)
    monkeypatch.setenv(URL_ENV, server.url)
    monkeypatch.setenv("MAML_EXPORT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("OMNIGLOT_DIR", raising=False)
    folder = data_dir(None)
    assert Path(folder) == tmp_path / "cache" / "omniglot" and len(server.requests) == 2
    assert load_omniglot(folder).shape == (5, 3, 28, 28)
    assert data_dir(None) == folder and len(server.requests) == 2  # found, not fetched again
