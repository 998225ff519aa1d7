"""`maml-train examples`: support and query folders to try maml-predict with, from Omniglot's evaluation set.

    OUT/support/<class>/<n>.png   `shots` drawings of each of `ways` characters: the classes to learn
    OUT/query/<class>-<n>.png     `query` other drawings of each, all in one flat folder; the names tell the answer

The characters are drawn (seeded) from those of images_evaluation in the protocol's test split, so no shipped
model was meta-trained on them. The PNGs are the original drawings (105 x 105, black ink on white paper, as
the official files are); maml-predict prepares them as training did. Omniglot's images are never shipped: they
are written from the data `--data` (or $OMNIGLOT_DIR, or the official zips, fetched once) holds.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from .data import _dir_pngs, _group_drawings, drawings, find_source, split_characters
from .errors import DataError, OutputError

DRAWINGS = 20  # per character in Omniglot


def _characters(kind: str, path: Path) -> int:
    """How many characters one half holds, without decoding its drawings."""
    if kind == "npz":
        with zipfile.ZipFile(path) as archive, archive.open("images.npy") as f:
            major, _ = np.lib.format.read_magic(f)
            header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            return header(f)[0][0]
    if kind == "zip":
        with zipfile.ZipFile(path) as archive:
            return len(_group_drawings(archive.namelist(), path))
    return len(_group_drawings(_dir_pngs(path), path))


def write_examples(data: str | os.PathLike, out: str | os.PathLike, ways: int = 5, shots: int = 1, query: int = 3,
                   seed: int = 0) -> dict:
    """Write OUT/support/<class>/ and the flat OUT/query/ (see the module docstring) from the Omniglot folder
    `data`; returns {"support": path, "query": path, "classes": [names]}. Refuses an OUT whose support/ or
    query/ already holds files (mixing two sets of classes would teach the wrong ones)."""
    if shots + query > DRAWINGS:
        raise DataError(f"--shots {shots} + --query {query} = {shots + query} is above the {DRAWINGS} drawings "
                        "per character")
    root, out = Path(data).expanduser(), Path(out)
    for sub in ("support", "query"):
        if (out / sub).is_dir() and any((out / sub).iterdir()):
            raise OutputError(f"--out {out}: {out / sub} already holds files; pass another folder")
    sources = {half: find_source(root, half) for half in ("background", "evaluation")}
    if not root.is_dir() or None in sources.values():
        raise DataError(f"--data {root} holds no Omniglot (images_background and images_evaluation: .npz, .zip or "
                        "folders); `maml-train download` fetches the official zips")
    try:
        first = _characters(*sources["background"])  # the evaluation characters follow in the protocol's numbering
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(f"--data {root}: cannot read {sources['background'][1]} ({e})") from None
    test = sorted(int(c) for c in split_characters()["test"] if c >= first)
    if len(test) < ways:
        raise DataError(f"--ways {ways} is more than the {len(test)} test characters of images_evaluation")
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(test, ways, replace=False).tolist())
    picks = {c: rng.permutation(DRAWINGS)[:shots + query] for c in chosen}
    found = {}
    for c, char in enumerate(drawings(*sources["evaluation"]), start=first):
        if c in picks:
            found[c] = [char[d] for d in picks[c]]
        if len(found) == len(picks):
            break
    names = [f"char{c}" for c in chosen]  # the protocol's character number
    for name, c in zip(names, chosen):
        (out / "support" / name).mkdir(parents=True, exist_ok=True)
        (out / "query").mkdir(parents=True, exist_ok=True)
        for n, paper in enumerate(found[c], start=1):  # True = paper: white, ink black, as the official PNGs
            where = out / "support" / name / f"{n}.png" if n <= shots else out / "query" / f"{name}-{n - shots}.png"
            Image.fromarray(np.where(paper, 255, 0).astype(np.uint8), mode="L").save(where)
    return {"support": str(out / "support"), "query": str(out / "query"), "classes": names}
