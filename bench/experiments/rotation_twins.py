"""How many of the suite's errors are a quarter-turn of the query's own character (classes are (character,
rotation) pairs, so a task may hold a character twice, a quarter-turn apart): per condition, 5-way 1-shot
validation, 0 steps, 100 tasks, the suite's own tasks (docs/experiments.md#tilt-weighted-redrawings).

    python bench/experiments/rotation_twins.py CHECKPOINT OUT.json [CONDITIONS]     (default as-drawn,tilted,small,all)
"""
import json, sys

import numpy as np


def main(checkpoint: str, out: str, conditions: list) -> None:
    from maml_export.checkpoint import as_deployed, load_checkpoint
    from maml_export.data import TaskSampler
    from maml_export.suite import split_drawings, suite_images
    from maml_export.trainer import QUERY, TEST_SEED, _deployed_maml, data_dir, query_logits, set_threads
    set_threads(1)
    maml = _deployed_maml(as_deployed(load_checkpoint(checkpoint), ways=5), steps=0)
    characters = split_drawings(data_dir("../shared/omniglot"), "val")
    result = {}
    for condition in conditions:
        images = suite_images(characters, condition)
        sampler = TaskSampler(images, np.arange(len(images)), 5, 1, QUERY, TEST_SEED)
        draws, draw = [], sampler.draw
        sampler.draw = lambda n: draws.append(draw(n)) or draws[-1]  # keep each batch's characters
        logits, labels = query_logits(maml, sampler, 100)
        chars = np.concatenate([d[0] for d in draws])  # [T, N]: the character of each class
        answer, rows = logits.argmax(-1), np.arange(len(chars))[:, None]
        wrong = answer != labels
        twin = chars[rows, answer] == chars[rows, labels]  # the answer is the query's character, another turn
        result[condition] = {"accuracy": float(1 - wrong.mean()), "errors": float(wrong.mean()),
                             "errors_on_a_quarter_turn": float((wrong & twin).mean())}
        print(condition, {k: round(100 * v, 2) for k, v in result[condition].items()}, flush=True)
    json.dump({"checkpoint": checkpoint, "split": "val", "ways": 5, "shots": 1, "tasks": 100, "steps": 0,
               "conditions": result}, open(out, "w"), indent=1)


if __name__ == "__main__":
    from maml_export.process import configure
    configure()
    main(sys.argv[1], sys.argv[2], (sys.argv[3] if len(sys.argv) > 3 else "as-drawn,tilted,small,all").split(","))
