"""`python -m bench.stream EXPORT_DIR`: one-image predictions back to back, as a device classifying a stream.

maml-bench times each call after a pause and other runtimes' calls (round-robin, fair under load bursts),
so its `predict x1` row is a cold call. A deployment that learned a task once and then classifies images as
they arrive runs predict.onnx back to back on one adapted state: this times that, after a warm-up, and
prints p50/p90 per image and the adapt call's p50 (onnxruntime only; numpy and onnxruntime are all it needs).
"""
from __future__ import annotations

import json
import time

import click
import numpy as np

from maml_export.cli import run


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("export_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--threads", type=click.IntRange(min=1), default=None, help="onnxruntime threads [default: all cores]")
@click.option("--images", type=click.IntRange(min=10), default=1500, show_default=True, help="timed predictions")
@click.option("--warmup", type=click.IntRange(min=0), default=300, show_default=True, help="untimed predictions first")
def cli(export_dir, threads, images, warmup):
    """Time predict.onnx on one image at a time, back to back, on one task learned by adapt.onnx."""
    from maml_export.adapter import Adapter
    from maml_export.contract import LOGITS, QUERY_IMAGES, SUPPORT_IMAGES, SUPPORT_LABELS
    from maml_export.data import synthetic_tasks

    adapter = Adapter(export_dir, threads=threads)
    t = synthetic_tasks(1, adapter.ways, 1, 15, 0, adapter.image_size, adapter.channels)
    task = adapter.adapt(t.x_spt[0], t.y_spt[0])
    _, predict = adapter.halves()
    feeds = [{**task.state, QUERY_IMAGES: t.x_qry[0, i:i + 1]} for i in range(t.x_qry.shape[1])]
    times = []
    for i in range(warmup + images):  # session.run itself: the Task's input checks are the caller's cost
        start = time.perf_counter()
        predict.run([LOGITS], feeds[i % len(feeds)])
        times.append(time.perf_counter() - start)
    adapt, _ = adapter.halves()
    adapt_times = []
    for _ in range(12):
        start = time.perf_counter()
        adapt.run(None, {SUPPORT_IMAGES: t.x_spt[0], SUPPORT_LABELS: t.y_spt[0]})
        adapt_times.append(time.perf_counter() - start)
    ms = 1e3 * np.array(times[warmup:])
    click.echo(json.dumps({"export": export_dir, "threads": threads, "images": images,
                           "predict_one_p50_ms": float(np.median(ms)), "predict_one_p90_ms": float(np.percentile(ms, 90)),
                           "images_per_s": float(1e3 / ms.mean()), "adapt_p50_ms": float(1e3 * np.median(adapt_times[2:]))}))


def main(args: list[str] | None = None) -> None:
    run(cli, args, "python -m bench.stream")


if __name__ == "__main__":
    main()
