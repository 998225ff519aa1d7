"""Issue 33 item 5: does an ink-box normalisation (crop the ink's bounding box, centre it in a square of side
max(h, w) / FRACTION, then LANCZOS to 28) help the shipped 5-way model on the suite's VALIDATION conditions?
0 steps, each query alone, the suite's seeds; paired on the same tasks (one TaskSampler seed)."""
import json, os, sys, time
import numpy as np
from PIL import Image
import maml_export.suite as suite
from maml_export.checkpoint import as_deployed, load_checkpoint
from maml_export.process import set_threads
from maml_export.protocol import TEST_SEED, mean_ci95
from maml_export.data import TaskSampler
from maml_export.trainer import _deployed_maml, query_logits, QUERY

FRACTIONS = [float(f) for f in sys.argv[1].split(",")] if len(sys.argv) > 1 else [0.55, 0.64, 0.75]
TASKS = int(os.environ.get("TASKS", 100))


def ink_box(a: np.ndarray, fraction: float) -> np.ndarray:
    """uint8 ink [H, W] (255 ink): the box of ink >= 128 centred in a square of paper of side max(h,w)/fraction."""
    ys, xs = np.nonzero(a >= 128)
    if len(ys) == 0:
        return a
    top, left = ys.min(), xs.min()
    h, w = ys.max() - top + 1, xs.max() - left + 1
    side = max(h, w, int(round(max(h, w) / fraction)))
    out = np.zeros((side, side), np.uint8)
    oy, ox = (side - h) // 2, (side - w) // 2
    out[oy:oy + h, ox:ox + w] = a[top:top + h, left:left + w]
    return out


def lanczos(a):
    return np.asarray(Image.fromarray(a, mode="L").resize((28, 28), Image.Resampling.LANCZOS), np.uint8)


class Capture:
    """Stands in for suite.OMNIGLOT_PIXELS: returns the protocol's pixels, and records every variant's."""
    def __init__(self):
        self.variants = []

    def uint8(self, image):
        a = 255 - np.asarray(image.convert("L"), np.uint8)
        plain = lanczos(a)
        self.variants.append([plain] + [lanczos(ink_box(a, f)) for f in FRACTIONS])
        return plain[None]


def main():
    set_threads(1)
    ckpt = as_deployed(load_checkpoint("maml_export/pretrained/omniglot-5w1s.npz"))
    maml = _deployed_maml(ckpt, 0)
    characters = suite.split_drawings(os.environ["OMNIGLOT_DIR"], "val")
    C, D = len(characters), len(characters[0])
    rows = []
    for condition in os.environ.get("CONDITIONS", ",".join(suite.CONDITIONS)).split(","):
        capture, original = Capture(), suite.OMNIGLOT_PIXELS
        suite.OMNIGLOT_PIXELS = capture
        try:
            plain = suite.suite_images(characters, condition)
        finally:
            suite.OMNIGLOT_PIXELS = original
        # check: variant 0 is what the suite gives (the capture saw every drawing, in order)
        v = np.asarray(capture.variants, np.float32).reshape(C, D, 1 + len(FRACTIONS), 28, 28) / np.float32(255)
        assert np.array_equal(v[:, :, 0], plain)
        for k in (1, 5):
            hits = []
            for i in range(1 + len(FRACTIONS)):
                sampler = TaskSampler(np.ascontiguousarray(v[:, :, i]), np.arange(C), ckpt.config.ways, k, QUERY, TEST_SEED)
                logits, labels = query_logits(maml, sampler, TASKS, steps=0)
                hits.append((logits.argmax(-1) == labels).mean(axis=1))
            base, base_ci = mean_ci95(hits[0])
            row = {"condition": condition, "shots": k, "without": base, "without_ci": base_ci, "with": {}}
            for f, h in zip(FRACTIONS, hits[1:]):
                acc, ci = mean_ci95(h)
                d, dci = mean_ci95(h - hits[0])
                row["with"][f] = {"acc": acc, "ci": ci, "diff": d, "diff_ci": dci}
            rows.append(row)
            print(f"{condition:>9} {k}-shot  none {100*base:6.2f}  " + "  ".join(
                f"F={f}: {100*r['acc']:6.2f} ({100*r['diff']:+.2f} ± {100*r['diff_ci']:.2f})"
                for f, r in row["with"].items()), flush=True)
    json.dump({"fractions": FRACTIONS, "tasks": TASKS, "seed": TEST_SEED, "suite_seed": suite.SUITE_SEED,
               "split": "val", "steps": 0, "rows": rows}, open(os.environ.get("OUT", "runs/norm_eval.json"), "w"), indent=1)


if __name__ == "__main__":
    t = time.time(); main(); print(f"{time.time() - t:.0f} s")
