"""`maml-web`: serve a page that learns new classes in the browser, from an export of maml-export.

    maml-web --model exported [--port 8000]

The page (maml_export/web/: index.html, page.mjs, the ES module maml.mjs, pixels.mjs) runs adapt.onnx and
predict.onnx with onnxruntime-web (WASM) in the browser: nothing is computed here. The server only hands
out files, all local: the page, the export's two graphs, and onnxruntime-web's JavaScript and WASM from
the npm package pinned in maml_export/web/package.json (`npm ci --prefix <that folder>` installs it once).
It sends the cross-origin isolation headers (COOP/COEP) that WASM threads need.
"""
from __future__ import annotations

import errno
import http.server
import json
from pathlib import Path
from urllib.parse import unquote, urlsplit

import click

import maml_export
from maml_export.cli import run

WEB = Path(maml_export.__file__).resolve().parent / "web"  # package data: the page's files
PAGE_FILES = ("index.html", "page.mjs", "maml.mjs", "pixels.mjs", "style.css")
MODEL_FILES = ("adapt.onnx", "predict.onnx")
ORT_PACKAGE = "onnxruntime-web"
# what index.html's import map and onnxruntime-web's WASM backend load
ORT_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
TYPES = {".html": "text/html; charset=utf-8", ".mjs": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".wasm": "application/wasm", ".onnx": "application/octet-stream",
         ".map": "application/json"}


def pinned_ort_version(web: Path | None = None) -> str:
    """The onnxruntime-web version package.json (in `web`, default WEB) pins."""
    return json.loads(((web or WEB) / "package.json").read_text())["dependencies"][ORT_PACKAGE]


def ort_dist(web: Path | None = None) -> Path:
    """onnxruntime-web's dist/ folder, npm-installed beside package.json (in `web`, default WEB) at the pinned
    version; else a one-line ValueError with the command that installs it."""
    web = web or WEB
    package = web / "node_modules" / ORT_PACKAGE
    want = pinned_ort_version(web)
    fix = f"run `npm ci --prefix {web}` (once, with network; it installs the pinned {ORT_PACKAGE} {want})"
    try:
        have = json.loads((package / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        raise ValueError(f"{ORT_PACKAGE} is not installed in {web / 'node_modules'}: {fix}") from None
    absent = [f for f in ORT_FILES if not (package / "dist" / f).is_file()]
    if have != want or absent:
        what = f"is {have}, not the pinned {want}" if have != want else f"lacks {', '.join(absent)}"
        raise ValueError(f"{ORT_PACKAGE} in {package} {what}: {fix}")
    return package / "dist"


def check_export(model: str) -> tuple[Path, str]:
    """The export folder and a one-line description, or a one-line ValueError: the page runs adapt.onnx and
    predict.onnx (so no --task-batch export) on one-channel drawings, ink 1.0 on paper 0.0."""
    from maml_export.adapter import Adapter

    adapter = Adapter(model)
    adapter.halves()  # both halves beside model.onnx, from its weights
    if adapter.channels != 1 or "ink 1.0, paper 0.0" not in adapter.input_range:
        raise ValueError(f"--model {model} takes {adapter.channels}-channel images ({adapter.input_range or 'no input_range'}); "
                         "the page draws one-channel ink 1.0 on paper 0.0, as Omniglot's models take")
    name = f"{adapter.config_name}, " if adapter.config_name else ""
    calibrated = "" if adapter.calibrated else ", probabilities not calibrated"  # the page says it too
    return Path(adapter.path).parent, f"{name}{adapter.ways}-way, {adapter.steps} steps{calibrated}"


def handler(export: Path, dist: Path) -> type[http.server.BaseHTTPRequestHandler]:
    """GET/HEAD of the page, /model/{adapt,predict}.onnx and /ort/<onnxruntime-web file>; nothing else."""

    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = "maml-web"

        def route(self) -> Path | None:
            path = unquote(urlsplit(self.path).path)
            if path == "/":
                path = "/index.html"
            folder, _, name = path[1:].rpartition("/")
            if not folder and name in PAGE_FILES:
                return WEB / name
            if folder == "model" and name in MODEL_FILES:
                return export / name
            if folder == "ort" and name and not name.startswith(".") and (dist / name).is_file():
                return dist / name  # a plain name read from the listing: no way out of dist/
            return None

        def do_GET(self, body: bool = True) -> None:
            file = self.route()
            if file is None:
                self.send_error(404)
                return
            try:
                data = file.read_bytes()
            except OSError:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", TYPES.get(file.suffix, "application/octet-stream"))
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-cache")  # a new export in the same folder is seen on reload
            # cross-origin isolation: SharedArrayBuffer, hence onnxruntime-web's WASM threads
            self.send_header("Cross-Origin-Opener-Policy", "same-origin")
            self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
            self.end_headers()
            if body:
                self.wfile.write(data)

        def do_HEAD(self) -> None:
            self.do_GET(body=False)

        def handle(self) -> None:
            # A browser that closes the tab or reloads mid-download is no server error: one line, not
            # socketserver's traceback of the BrokenPipeError or ConnectionResetError.
            try:
                super().handle()
            except ConnectionError as e:
                self.close_connection = True
                what = getattr(self, "path", None) or "a request"
                click.echo(f"maml-web: {self.client_address[0]} closed the connection during {what} "
                           f"({type(e).__name__})", err=True)

        def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
            pass  # one line per file would bury the URL; errors reach the browser's console

    return Handler


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--model", "model", type=str, required=True,
              help="The folder maml-export wrote (adapt.onnx and predict.onnx are served from it).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port to serve on; 0 picks a free one.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on: 0.0.0.0 lets a phone or tablet on the network draw with touch (WASM "
                   "threads need localhost or HTTPS; elsewhere the page runs on one thread).")
def cli(model: str, port: int, host: str) -> None:
    """Serve a page that learns new classes in the browser from an export of maml-export.

    In the page you draw (mouse, touch or pen) or drop image files, a few examples per class (as many
    classes as the model's ways), press Learn, then draw or drop new images and see their class and its
    probability as you draw, with how long learning and each prediction took. The adaptation runs in the
    browser with onnxruntime-web (WASM); this command only serves files, all local: the page, the export's
    adapt.onnx and predict.onnx, and onnxruntime-web, installed once with `npm ci --prefix
    maml_export/web` (pinned in its package.json). Prints the URL, then serves until Ctrl-C.

    The page's JavaScript module maml.mjs (load, learn, predict) also works without this page: see
    docs/deploy.md#in-a-browser.
    """
    export, description = check_export(model)
    dist = ort_dist()
    try:
        server = http.server.ThreadingHTTPServer((host, port), handler(export, dist))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ValueError(f"--port {port} is in use: pass another, or --port 0 for a free one") from None
        raise ValueError(f"cannot listen on {host}:{port} ({e.strerror})") from None
    shown = "127.0.0.1" if host == "0.0.0.0" else host
    click.echo(f"serving {export} ({description}) at http://{shown}:{server.server_address[1]}/ "
               f"with {ORT_PACKAGE} {pinned_ort_version()}; Ctrl-C stops")
    try:
        server.serve_forever()
    except KeyboardInterrupt:  # the way to stop a server: not an error
        click.echo("stopped")
    finally:
        server.server_close()


def main(args: list[str] | None = None) -> None:
    run(cli, args, "maml-web")


if __name__ == "__main__":
    main()
