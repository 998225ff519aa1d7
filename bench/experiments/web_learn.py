"""Browser learn time (maml.mjs in headless Chromium, onnxruntime-web WASM) of an export on 1 and 2 WASM threads, made-up
5-way 1-shot drawings (docs/benchmarks.md, every step ahead of PyTorch). From the repository root, nothing else running:
python bench/experiments/web_learn.py EXPORT_DIR [EXPORT_DIR ...]  (needs chromium, chromedriver, selenium)"""
import json, select, shutil, subprocess, sys
import numpy as np
sys.path.insert(0, ".")
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from maml_export import data

def serve(export):
    p = subprocess.Popen([sys.executable, "-m", "export.web", "--model", export, "--port", "0"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    select.select([p.stdout], [], [], 120)
    return p, p.stdout.readline().split(" at ")[1].split()[0]

options = webdriver.ChromeOptions(); options.binary_location = shutil.which("chromium")
for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
    options.add_argument(a)
tasks = data.synthetic_tasks(1, ways=5, shots=1, query=1, seed=7)
x_spt, y_spt = tasks.x_spt[0], tasks.y_spt[0]
out = {}
for export in sys.argv[1:]:
    proc, url = serve(export)
    for threads in (1, 2):
        b = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options); b.set_script_timeout(300)
        b.get(url)
        got = b.execute_async_script("""
            const [support, labels, threads, done] = arguments;
            import("/maml.mjs").then(async ({ load }) => {
              const model = await load("/model/", { threads });
              const ms = [];
              for (let i = 0; i < 12; i++) { const t = performance.now(); await model.learn(support, labels); ms.push(performance.now() - t); }
              done({ ms, threads: model.threads, isolated: crossOriginIsolated });
            }).catch((e) => done({ error: String(e) }));""", x_spt.reshape(5, -1).tolist(), y_spt.tolist(), threads)
        b.quit()
        ms = got.get("ms", [])
        print(export, threads, "threads:", got.get("threads"), "isolated", got.get("isolated"), "learn p50 %.1f ms" % np.median(ms[2:]) if ms else got, flush=True)
        out[f"{export} {threads}"] = got
    proc.terminate()
print(json.dumps(out))
