"""Where the tilted cell's errors are: 5-way 1-shot accuracy on the suite's tilted validation characters, binned by
the tilt between each query and its own class's support image (docs/experiments.md#tilt-weighted-redrawings).

    python bench/experiments/tilt_error_by_angle.py CHECKPOINT OUT.json

The suite draws each drawing's tilt (10-30 degrees, either way) from its seeded stream; this replays that stream
with a recorder to know every drawing's angle (and checks the replay redraws the suite's images exactly), then
runs the suite's own tasks (`evaluate_suite`'s sampler and seed), 0 steps, 100 tasks, each query alone.
"""
import json, sys

import numpy as np

BINS = ((0, 10), (10, 20), (20, 30), (30, 40), (40, 50), (50, 61))


class RecordingRng:
    """A numpy Generator that remembers what `uniform` and `choice` returned (the tilt's size and its sign)."""

    def __init__(self, rng):
        self.rng, self.uniforms, self.choices = rng, [], []

    def uniform(self, *args, **kwargs):
        self.uniforms.append(self.rng.uniform(*args, **kwargs))
        return self.uniforms[-1]

    def choice(self, *args, **kwargs):
        self.choices.append(self.rng.choice(*args, **kwargs))
        return self.choices[-1]

    def __getattr__(self, name):
        return getattr(self.rng, name)


def tilted_images_and_angles(characters):
    """The suite's tilted images [C, D, 28, 28] and each drawing's tilt in degrees [C, D]."""
    from maml_export import suite
    rng = RecordingRng(np.random.default_rng([suite.SUITE_SEED, suite.CONDITIONS.index("tilted")]))
    images, angles = [], []
    for drawings in characters:
        for paper in drawings:
            before = len(rng.uniforms)
            images.append(suite.redraw(paper, "tilted", rng))
            angles.append(rng.uniforms[before] * rng.choices[-1])  # _warp draws the size, then the sign
    shape = (len(characters), len(characters[0]))
    return np.array(images, np.float32).reshape(shape + (28, 28)), np.array(angles).reshape(shape)


def main(checkpoint: str, out: str) -> None:
    from maml_export.checkpoint import as_deployed, load_checkpoint
    from maml_export.data import TaskSampler
    from maml_export.suite import split_drawings, suite_images
    from maml_export.trainer import QUERY, TEST_SEED, _deployed_maml, data_dir, query_logits, set_threads
    set_threads(1)
    characters = split_drawings(data_dir("../shared/omniglot"), "val")
    images, angles = tilted_images_and_angles(characters)
    assert np.array_equal(images, suite_images(characters, "tilted")), "the replay does not redraw the suite's images"
    maml = _deployed_maml(as_deployed(load_checkpoint(checkpoint), ways=5), steps=0)
    sampler = TaskSampler(images, np.arange(len(images)), 5, 1, QUERY, TEST_SEED)
    draws, draw = [], sampler.draw
    sampler.draw = lambda n: draws.append(draw(n)) or draws[-1]  # keep each batch's characters and drawings
    logits, labels = query_logits(maml, sampler, 100)
    chars = np.concatenate([d[0] for d in draws])     # [T, N]
    drawings = np.concatenate([d[2] for d in draws])  # [T, N, 1 + Q]: the support's, then the queries'
    relative = np.abs(angles[chars[..., None], drawings[..., 1:]] - angles[chars, drawings[..., 0]][..., None])
    relative = relative.reshape(len(chars), -1)       # [T, N * Q], in the queries' order (class-major)
    right = logits.argmax(-1) == labels
    rows = [{"degrees": [lo, hi], "share": float(((relative >= lo) & (relative < hi)).mean()),
             "accuracy": float(right[(relative >= lo) & (relative < hi)].mean())} for lo, hi in BINS]
    for r in rows:
        print(f"tilt to its support {r['degrees'][0]:2d}-{r['degrees'][1]:2d} degrees: {100 * r['share']:4.1f} % of "
              f"queries, {100 * r['accuracy']:.2f} % right")
    json.dump({"checkpoint": checkpoint, "split": "val", "ways": 5, "shots": 1, "tasks": 100, "steps": 0,
               "accuracy": float(right.mean()), "bins": rows}, open(out, "w"), indent=1)


if __name__ == "__main__":
    from maml_export.process import configure
    configure()
    main(sys.argv[1], sys.argv[2])
