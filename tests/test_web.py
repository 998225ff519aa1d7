"""maml-web and its page: the protocol's pixels in JavaScript (Node) against Pillow, the server, and the page in
headless Chromium on a real Omniglot test task against Python onnxruntime.

The browser test drives Debian's `chromium` with `chromedriver` (selenium, the `test` extra) and needs
onnxruntime-web installed by `npm ci --prefix maml_export/web`; without Chromium, its driver, Node or
onnxruntime-web these tests FAIL, saying what to install (.ci/run installs them): a browser test that skipped
would let CI pass without ever opening the page. Its screenshot and the page's timings are written to
.cache/browser/ (git-ignored).
"""
from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from conftest import DATA, sigint_default
from export.web import ORT_FILES, WEB, ort_dist, pinned_ort_version
from maml_export import data
from maml_export.contract import RTOL

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / ".cache" / "browser"
def max_rel(got: np.ndarray, ref: np.ndarray) -> float:
    """max|got - ref| / max|ref|: how exports are compared (docs/deploy.md#parity-tolerance), against RTOL."""
    return float(np.abs(got - ref).max() / np.abs(ref).max())


INSTALL = "apt-get install -y chromium chromium-driver && npm ci --prefix maml_export/web (as .ci/run does)"


def need(program: str) -> str:
    """The program's path, or fail (never skip) saying how to install it."""
    path = shutil.which(program)
    if path is None:
        pytest.fail(f"{program} is not installed: {INSTALL}", pytrace=False)
    return path


def run_node(script: str, payload) -> object:
    """Run an ES module script with Node in maml_export/web (it imports ./pixels.mjs); JSON in, JSON out."""
    result = subprocess.run([need("node"), "--input-type=module", "-e", script], cwd=WEB, input=json.dumps(payload),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


NODE_PIXELS = """
import { resizeLanczos, inkToPixels, grayOf, drawingInk } from "./pixels.mjs";
let text = "";
process.stdin.on("data", (d) => (text += d));
process.stdin.on("end", () => {
  const { resize, drawings, rgba } = JSON.parse(text);
  process.stdout.write(JSON.stringify({
    resize: resize.map((c) => Array.from(resizeLanczos(Uint8Array.from(c.pixels), c.w, c.h, c.outW, c.outH))),
    drawings: drawings.map((d) => Array.from(inkToPixels(drawingInk(Uint8Array.from(d)), 105, 105, 28))),
    gray: Array.from(grayOf(Uint8Array.from(rgba))),
  }));
});
"""


def stroke_drawing(rng) -> np.ndarray:
    """Strokes 5 px wide on a 105 x 105 canvas, RGBA [105, 105, 4]: ink one gray below 128, paper one at or
    above it (a canvas's anti-aliased edge has both)."""
    image = Image.new("L", (105, 105), 255)
    pen = ImageDraw.Draw(image)
    for _ in range(rng.integers(1, 4)):
        pen.line([tuple(p) for p in rng.uniform(5, 100, (rng.integers(2, 5), 2))], fill=0, width=5)
    gray = np.where(np.asarray(image) == 0, rng.integers(0, 128), rng.integers(128, 256)).astype(np.uint8)
    return np.dstack([gray, gray, gray, np.full_like(gray, 255)])


def test_pixels_in_javascript_are_pillows():
    """pixels.mjs gives Pillow's bytes: LANCZOS resizing at assorted sizes (down, up, one axis), the protocol's
    drawing -> pixels (data.drawing_pixels), and RGB -> L."""
    rng = np.random.default_rng(0)
    sizes = [(105, 105, 28, 28), (80, 50, 28, 28), (9, 7, 28, 28), (200, 300, 28, 28), (28, 28, 28, 28),
             (105, 105, 33, 20), (64, 64, 10, 64), (1, 1, 28, 28)]
    images = [rng.integers(0, 256, (h, w), dtype=np.uint8) for w, h, _, _ in sizes]
    drawings = [stroke_drawing(rng) for _ in range(6)]
    rgba = rng.integers(0, 256, (500, 4), dtype=np.uint8)
    got = run_node(NODE_PIXELS, {
        "resize": [{"pixels": a.ravel().tolist(), "w": w, "h": h, "outW": ow, "outH": oh}
                   for a, (w, h, ow, oh) in zip(images, sizes)],
        "drawings": [d.ravel().tolist() for d in drawings], "rgba": rgba.ravel().tolist()})
    for a, (w, h, ow, oh), js in zip(images, sizes, got["resize"]):
        pillow = np.asarray(Image.fromarray(a, "L").resize((ow, oh), Image.Resampling.LANCZOS))
        np.testing.assert_array_equal(np.array(js, np.uint8).reshape(oh, ow), pillow, err_msg=f"{w}x{h} -> {ow}x{oh}")
    for d, js in zip(drawings, got["drawings"]):
        paper = np.asarray(Image.fromarray(d).convert("L")) >= 128  # as data.drawings reads a drawing
        assert (~paper).any() and paper.any()
        np.testing.assert_array_equal(np.array(js, np.float32), data.drawing_pixels(paper).ravel().astype(np.float32) / 255)
    pillow_gray = np.asarray(Image.fromarray(rgba[None, :, :3], "RGB").convert("L"))[0]
    np.testing.assert_array_equal(np.array(got["gray"], np.uint8), pillow_gray)


# -- the server ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """The bundled 5-way weights as `maml-export --steps 5` exports them (parity on 2 tasks, to be quick)."""
    from maml_export.checkpoint import default_checkpoint
    from maml_export.export import export_model
    out = tmp_path_factory.mktemp("export")
    export_model(default_checkpoint(), out, steps=5, tasks=2, data=DATA)
    return out


def maml_web(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "export.web", *args], capture_output=True, text=True, timeout=120)


class Server:
    """`maml-web --model EXPORT --port 0` in a child process: its URL, and Ctrl-C to stop it."""

    def __init__(self, export: Path):
        self.process = subprocess.Popen([sys.executable, "-m", "export.web", "--model", str(export), "--port", "0"],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        preexec_fn=sigint_default)
        ready, _, _ = select.select([self.process.stdout], [], [], 120)
        line = self.process.stdout.readline() if ready else ""
        if " at http://" not in line:
            self.process.kill()
            pytest.fail(f"maml-web did not start: {line}{self.process.stderr.read()}")
        self.line = line
        self.url = line.split(" at ")[1].split()[0]

    def stop(self) -> tuple[int, str]:
        """Ctrl-C; the exit code and what it printed after the URL."""
        self.process.send_signal(signal.SIGINT)
        out, err = self.process.communicate(timeout=30)
        return self.process.returncode, out + err


@pytest.fixture
def server(exported):
    need_ort()
    s = Server(exported)
    yield s
    if s.process.poll() is None:
        s.stop()


@pytest.fixture(scope="module")
def page_url(exported):
    """The page's URL, served by one maml-web for the module's browser tests."""
    need_ort()
    s = Server(exported)
    yield s.url
    s.stop()


def need_ort() -> Path:
    try:
        return ort_dist()
    except ValueError as e:
        pytest.fail(str(e), pytrace=False)


def get(url: str) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), b""


def test_web_serves_the_page_the_export_and_onnxruntime_web_locally(server, exported):
    status, headers, body = get(server.url)
    assert status == 200 and b'"onnxruntime-web/wasm": "/ort/ort.wasm.min.mjs"' in body
    for name in ("index.html", "page.mjs", "maml.mjs", "pixels.mjs", "style.css"):  # nothing from the network
        assert not re.search(rb"(https?:)?//[\w.-]+\.\w", get(server.url + name)[2]), name
    # cross-origin isolated (WASM threads), and a JavaScript module served as one
    assert headers["Cross-Origin-Opener-Policy"] == "same-origin"
    assert headers["Cross-Origin-Embedder-Policy"] == "require-corp"
    assert get(server.url + "maml.mjs")[1]["Content-Type"].startswith("text/javascript")
    status, headers, body = get(server.url + "ort/" + ORT_FILES[-1])
    assert status == 200 and headers["Content-Type"] == "application/wasm" and body[:4] == b"\0asm"
    assert get(server.url + "model/adapt.onnx")[2] == (exported / "adapt.onnx").read_bytes()
    # only what the page needs: not the export's other files, nothing outside the folders
    for path in ("model/export.json", "model/model.onnx", "ort/../package.json", "ort/%2e%2e/package.json",
                 "../pyproject.toml", "web.py", "ort/"):
        assert get(server.url + path)[0] == 404, path
    code, out = server.stop()
    assert code == 0 and out.strip() == "stopped", out  # Ctrl-C is how a server stops: no error


def test_web_logs_a_dropped_connection_in_one_line(tmp_path, capfd):
    """A browser that disconnects mid-download (tab closed, reload) gets one line in the server's log, not a
    BrokenPipeError or ConnectionResetError traceback; the server goes on serving."""
    import http.server
    import threading

    from export.web import handler
    export, dist = tmp_path / "export", tmp_path / "dist"
    export.mkdir()
    dist.mkdir()
    (export / "adapt.onnx").write_bytes(bytes(64 << 20))  # far more than the sockets' buffers hold
    (export / "predict.onnx").write_bytes(b"small")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler(export, dist))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        host, port = server.server_address
        with socket.create_connection((host, port), timeout=30) as browser:
            browser.sendall(b"GET /model/adapt.onnx HTTP/1.1\r\nHost: localhost\r\n\r\n")
            browser.recv(4096)  # the download has started
            browser.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # close = reset
        err, deadline = "", time.monotonic() + 30
        while time.monotonic() < deadline and "closed the connection" not in err and "Traceback" not in err:
            time.sleep(0.1)
            err += capfd.readouterr().err
        assert get(f"http://{host}:{port}/model/predict.onnx")[2] == b"small"  # still serving
    finally:
        server.shutdown()
        server.server_close()
    err += capfd.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and "closed the connection during /model/adapt.onnx" in err, err


def test_web_refuses_bad_input_in_one_line(tmp_path, exported):
    for args, says in [(["--model", str(tmp_path / "nothing")], "does not exist (write one with maml-export)"),
                       (["--model", str(exported), "--port", "70000"], "70000 is not in the range")]:
        r = maml_web(*args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode in (1, 2) and len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], r.stderr
    # onnxruntime-web absent, or another version: the one line says the command that installs the pinned one
    web = tmp_path / "web"
    (web / "node_modules" / "onnxruntime-web").mkdir(parents=True)
    shutil.copy(WEB / "package.json", web)
    r = subprocess.run([sys.executable, "-c", "import sys, pathlib, export.web as w; w.WEB = pathlib.Path(sys.argv[1]); "
                        "w.main(sys.argv[2:])", str(web), "--model", str(exported)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"error: onnxruntime-web is not installed in {web / 'node_modules'}: run `npm ci --prefix "
                               f"{web}`"), r.stderr
    (web / "node_modules" / "onnxruntime-web" / "package.json").write_text('{"version": "1.19.0"}')
    with pytest.raises(ValueError, match=r"is 1\.19\.0, not the pinned 1\.30\.0: run `npm ci --prefix "):
        ort_dist(web)
    need_ort()
    with socket.socket() as taken:  # a port in use
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        r = maml_web("--model", str(exported), "--port", str(taken.getsockname()[1]))
    assert r.returncode == 1 and r.stderr.startswith("error: --port") and "--port 0 for a free one" in r.stderr, r.stderr


def test_web_help_explains():
    r = maml_web("--help")
    assert r.returncode == 0
    for words in ("--model", "--port", "Ctrl-C", "npm ci --prefix", "maml.mjs", "onnxruntime-web"):
        assert words in r.stdout, words


def test_web_ships_the_page_and_pins_onnxruntime_web():
    project = (ROOT / "pyproject.toml").read_text()
    assert 'maml-web = "export.web:main"' in project
    listed = re.search(r"^maml_export = \[(.*?)\]", project, re.M | re.S).group(1)
    shipped = [p.strip().strip('"') for p in listed.split(",")]
    for name in ("index.html", "page.mjs", "maml.mjs", "pixels.mjs", "style.css", "package.json", "package-lock.json"):
        assert (WEB / name).is_file() and any(Path("web", name).match(p) for p in shipped), name
    lock = json.loads((WEB / "package-lock.json").read_text())
    assert lock["packages"]["node_modules/onnxruntime-web"]["version"] == pinned_ort_version() == "1.30.0"


# -- the page in Chromium --------------------------------------------------------------------------------------

def drawings_of(root: str, wanted) -> dict:
    """{(character, drawing): bool paper mask [105, 105]} in the protocol's numbering, from any source form
    load_omniglot reads (.npz, official zip, folder): the drawings before the protocol resizes them."""
    found, first = {}, 0
    for half in data.HALVES:
        for c, char in enumerate(data.drawings(*data.find_source(Path(root), half)), start=first):
            found.update({(c, d): char[d] for cw, d in wanted if cw == c})
        first = c + 1
    return found


def protocol_task(root: str, ways=5, shots=1, query=15):
    """The protocol's first 5-way 1-shot test task (seed protocol.TEST_SEED, as `maml-train evaluate`), as the
    105 x 105 drawings it is made of, each rotated as its class is: (support, query) lists of bool paper masks,
    the task's own pixels, and which images are unrotated."""
    from maml_export.protocol import TEST_SEED
    images = data.load_omniglot(root)
    test = data.split_characters(len(images))["test"]
    task = data.TaskSampler(images, test, ways, shots, query, TEST_SEED).sample(1)
    # The same draws on images that name themselves: pixel [0, 0] holds 1 + the (character, drawing) index;
    # where it lands says the rotation.
    drawings = images.shape[1]
    ids = np.zeros_like(images)
    ids[:, :, 0, 0] = 1 + np.arange(images.shape[0] * drawings).reshape(images.shape[:2])
    named = data.TaskSampler(ids, test, ways, shots, query, TEST_SEED).sample(1)
    corner = {np.unravel_index(np.rot90(np.eye(1, 784, 0).reshape(28, 28), r).argmax(), (28, 28)): r for r in range(4)}
    picks = []
    for x in (named.x_spt[0, :, 0], named.x_qry[0, :, 0]):
        where = [np.unravel_index(i.argmax(), i.shape) for i in x]
        picks.append([(divmod(int(i[w]) - 1, drawings), corner[w]) for i, w in zip(x, where)])
    masks = drawings_of(root, [cd for p in picks for cd, _ in p])
    support, queries = ([np.rot90(masks[cd], r) for cd, r in p] for p in picks)
    unrotated = [r == 0 for p in picks for _, r in p]
    return support, queries, task, unrotated


def write_png(paper: np.ndarray, path: Path) -> Path:
    """A drawing as the official dataset stores it: a 1-bit PNG, white paper."""
    Image.fromarray(np.ascontiguousarray(paper)).save(path)
    return path


def wait_for(driver, script: str, what: str, timeout: float = 180):
    end = time.monotonic() + timeout
    while True:
        value = driver.execute_script(script)
        if value:
            return value
        error = driver.execute_script("return window.mamlPage && mamlPage.error")
        if error:
            pytest.fail(f"the page says: {error}", pytrace=False)
        if time.monotonic() > end:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}", pytrace=False)
        time.sleep(0.05)


@pytest.fixture(scope="module")
def chromium():
    """Headless Chromium driven by chromedriver; fails (never skips) when either is missing."""
    binary, driver = need("chromium"), need("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: pip install -e '.[test]'", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = binary  # with the driver's path given, selenium looks nothing up online
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1500"):
        options.add_argument(arg)  # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
    browser = webdriver.Chrome(service=Service(driver), options=options)
    browser.set_script_timeout(120)
    yield browser
    browser.quit()


def test_browser_module_learns_as_python_does(exported, page_url, chromium):
    """maml.mjs on its own (not the page's model): load, learn a 2-shot task, predict each query; the logits are
    Python onnxruntime's within contract.RTOL, every class the same. Made-up characters: runs without Omniglot.
    It runs while the page loads and warms up its own model: onnxruntime-web fails when two runs interleave
    ("Can't access output tensor data"), so maml.mjs queues them, and this is where they would meet."""
    from maml_export.adapter import Adapter
    tasks = data.synthetic_tasks(1, ways=5, shots=2, query=4, seed=7)
    x_spt, y_spt, x_qry = tasks.x_spt[0], tasks.y_spt[0], tasks.x_qry[0]
    python = Adapter(exported).adapt(x_spt, y_spt).predict(x_qry)
    chromium.get(page_url)
    got = chromium.execute_async_script("""
        const [support, labels, queries, done] = arguments;
        import("/maml.mjs").then(async ({ load }) => {
          const model = await load("/model/", { warmup: false });
          await model.learn(support, labels);
          const logits = [];
          for (const q of queries) logits.push(Array.from((await model.predict(q)).logits));
          done({ logits, ways: model.ways, imageSize: model.imageSize });
        }).catch((e) => done({ error: String(e) }));""",
        x_spt.reshape(len(x_spt), -1).tolist(), y_spt.tolist(), x_qry.reshape(len(x_qry), -1).tolist())
    assert "error" not in got, got["error"]
    assert (got["ways"], got["imageSize"]) == (5, 28)
    logits = np.array(got["logits"], np.float32)
    assert max_rel(logits, python) <= RTOL
    np.testing.assert_array_equal(logits.argmax(1), python.argmax(1))


def test_browser_learns_an_omniglot_task_as_python_does(omniglot_dir, exported, page_url, chromium, tmp_path):
    """The page, driven as a person drives it: a real Omniglot test task's drawings uploaded as files (1-bit
    PNGs, as the dataset ships them), Learn, the 75 queries uploaded; then a drawing with the mouse. Its
    pixels are Python's (export.predict.load_image, data.drawing_pixels) exactly, its logits Python onnxruntime's
    within contract.RTOL with the same class for every query."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    from export.predict import load_image
    from maml_export.images import Preprocessing
    from maml_export.adapter import Adapter

    support, queries, task, unrotated = protocol_task(omniglot_dir)
    files = [write_png(p, tmp_path / f"support-{i}.png") for i, p in enumerate(support)]
    files += [write_png(p, tmp_path / f"query-{i:02d}.png") for i, p in enumerate(queries)]
    pixels = np.stack([load_image(f, Preprocessing()) for f in files])  # [80, 1, 28, 28], as maml-predict reads files
    protocol = np.stack([data.drawing_pixels(p) for p in support + queries])[:, None].astype(np.float32) / 255
    np.testing.assert_array_equal(pixels, protocol)  # a file of a drawing: the protocol's pixels
    own = np.concatenate([task.x_spt[0], task.x_qry[0]])
    np.testing.assert_array_equal(pixels[unrotated], own[unrotated])  # ...and the task's own, where unrotated
    x_spt, x_qry, y_spt = pixels[:len(support)], pixels[len(support):], task.y_spt[0]
    python = Adapter(exported).adapt(x_spt, y_spt).predict(x_qry)

    chromium.get(page_url)
    wait_for(chromium, "return window.mamlPage && mamlPage.ready", "the model to load")
    assert chromium.execute_script("return crossOriginIsolated")
    for c, f in enumerate(files[:len(support)]):  # 1-shot, labels in class order: file c is class c
        chromium.find_element(By.CSS_SELECTOR, f'input[type=file][data-class="{c}"]').send_keys(str(f))
        wait_for(chromium, f"return mamlPage.examples[{c}].length === 1", f"class {c}'s example")
    learn = chromium.find_element(By.ID, "learn")
    for n in range(1, 6):  # learning five times: the page's learn times, for the figures
        learn.click()
        wait_for(chromium, f"return mamlPage.timings.learn.length === {n}", "learning")
    chromium.find_element(By.ID, "query-files").send_keys("\n".join(map(str, files[len(support):])))
    wait_for(chromium, f"return mamlPage.results.length === {len(queries)}", "the queries' classes")
    page = chromium.execute_script("return {examples: mamlPage.examples, results: mamlPage.results, "
                                   "timings: mamlPage.timings, status: document.getElementById('status').textContent}")

    browser_support = np.array([e[0] for e in page["examples"]], np.float32).reshape(x_spt.shape)
    np.testing.assert_array_equal(browser_support, x_spt)
    results = sorted(page["results"], key=lambda r: r["name"])
    assert [r["name"] for r in results] == [f.name for f in files[len(support):]]
    np.testing.assert_array_equal(np.array([r["pixels"] for r in results], np.float32).reshape(x_qry.shape), x_qry)
    logits = np.array([r["logits"] for r in results], np.float32)
    rel = max_rel(logits, python)
    assert rel <= RTOL, rel
    np.testing.assert_array_equal(logits.argmax(1), python.argmax(1))  # every query's class, not only most
    assert [r["label"] for r in results] == python.argmax(1).tolist()
    accuracy = float((python.argmax(1) == task.y_qry[0]).mean())

    # Draw with the mouse on the query pad: the page predicts as it is drawn, from the protocol's pixels of
    # the drawing (the binary 105 x 105 canvas, LANCZOS -- the same bytes data.drawing_pixels makes of it).
    pad = chromium.find_element(By.ID, "query")
    ActionChains(chromium).move_to_element_with_offset(pad, -70, -60).click_and_hold().move_by_offset(50, 90) \
        .move_by_offset(60, -100).move_by_offset(-20, 60).release().perform()
    wait_for(chromium, "return mamlPage.drawing && !mamlPage.pending", "the drawing's class")
    drawn = chromium.execute_async_script("""
        const done = arguments[arguments.length - 1];
        import("/pixels.mjs").then((p) => {
          const pad = document.getElementById("query");
          const ink = p.drawingInk(pad.getContext("2d").getImageData(0, 0, pad.width, pad.height).data);
          done({ink: Array.from(ink), drawing: mamlPage.drawing});
        });""")
    paper = np.array(drawn["ink"]).reshape(105, 105) == 0
    assert 0.01 < (~paper).mean() < 0.3  # strokes, not nothing or everything
    seen = np.array(drawn["drawing"]["pixels"], np.float32).reshape(1, 1, 28, 28)
    np.testing.assert_array_equal(seen[0, 0], data.drawing_pixels(paper).astype(np.float32) / 255)
    drawn_python = Adapter(exported).adapt(x_spt, y_spt).predict(seen)
    assert max_rel(np.array([drawn["drawing"]["logits"]], np.float32), drawn_python) <= RTOL
    assert drawn["drawing"]["label"] == int(drawn_python.argmax())

    # the module refuses what the model cannot classify, in words
    refused = chromium.execute_async_script("""
        const done = arguments[arguments.length - 1];
        mamlPage.model.predict(new Float32Array(784)).then(() => done("no error"), (e) => done(e.message));""")
    assert "blank" in refused, refused

    OUT.mkdir(parents=True, exist_ok=True)
    chromium.save_screenshot(str(OUT / "maml-web.png"))
    learn_ms, predict_ms = page["timings"]["learn"], [r["ms"] for r in results]
    figures = {"learn_ms": learn_ms, "learn_ms_median": float(np.median(learn_ms)),
               "predict_ms_median": float(np.median(predict_ms)), "predict_ms_p90": float(np.percentile(predict_ms, 90)),
               "load_ms": page["timings"]["load"], "status": page["status"], "max_rel": rel,
               "accuracy": accuracy, "load_average": os.getloadavg(), "cpus": os.cpu_count()}
    (OUT / "timings.json").write_text(json.dumps(figures, indent=1) + "\n")
    print(f"\nbrowser: learn {figures['learn_ms_median']:.0f} ms (median of 5), predict "
          f"{figures['predict_ms_median']:.1f} ms (median of {len(predict_ms)}), logits within {rel:.1e} "
          f"of Python, accuracy {accuracy:.3f}; load average {os.getloadavg()[0]:.1f}; {OUT / 'maml-web.png'}")
