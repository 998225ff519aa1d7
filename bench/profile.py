"""Steady-state onnxruntime profile of an exported graph, by op type and by (op type, output shape).

    python -m bench.profile exported/model.onnx --threads 2                  # 5-way 1-shot shapes
    python -m bench.profile exported/model.onnx --shots 5 --json prof.json

The work is `maml_export.bench.profile.profile_graph`; this module parses options and prints.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from maml_export.cli import run


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(exists=True))
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True, help="onnxruntime intra-op threads.")
@click.option("--shots", type=click.IntRange(min=1), default=1, show_default=True, help="Support images per class.")
@click.option("--query", type=click.IntRange(min=1), default=15, show_default=True, help="Query images per class.")
@click.option("--runs", type=click.IntRange(min=2), default=12, show_default=True, help="Profiled calls.")
@click.option("--warmup", type=click.IntRange(min=0), default=4, show_default=True,
              help="Calls left out of the medians (the first ones pay for memory-arena growth).")
@click.option("--top", type=click.IntRange(min=0), default=20, show_default=True, help="(op, shape) rows to print.")
@click.option("--json", "json_file", type=click.Path(dir_okay=False), default=None, help="Also write the report here.")
def cli(model, threads, shots, query, runs, warmup, top, json_file):
    """Profile MODEL (an exported model.onnx or adapt.onnx, or their folder: model.onnx) in onnxruntime on made-up characters: each
    node's median kernel time over the calls after --warmup, summed by op type and by output shape."""
    from maml_export.bench.profile import profile_graph

    path = Path(model) / "model.onnx" if Path(model).is_dir() else Path(model)
    report = profile_graph(path, threads, shots, query, runs, warmup)
    click.echo(f"{path}: {report['nodes']} nodes, {report['total_ms']:.1f} ms of kernel time per call "
               f"({threads} threads, {shots}-shot, {query} queries per class, median of calls "
               f"{warmup + 1}-{runs})")
    click.echo("by op: " + ", ".join(f"{r['op']} {r['ms']:.1f} (x{r['nodes']})" for r in report["by_op"][:14]))
    for r in report["by_shape"][:top]:
        click.echo(f"  {r['ms']:7.2f} ms  x{r['nodes']:<3d} {r['op']:<14s} {r['shape'][:70]}")
    if json_file:
        Path(json_file).write_text(json.dumps(report, indent=1))


def main(args: list[str] | None = None) -> None:
    run(cli, args, "python -m bench.profile")


if __name__ == "__main__":
    main()
