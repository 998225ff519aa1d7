"""How close to the FLOP floor can onnxruntime come here? Work every graph of the adaptation does, timed alone.

    python -m bench.bound                              # 5w1s and 20w5s, 5 steps, 2 threads
    python -m bench.bound --configs 5w1s --rounds 30 --json bound.json

Each product of the adaptation (`maml_export.bench.machine.matrix_products`) runs as one onnxruntime MatMul of its
shape, in its fastest form, and the queries' first block pools and takes batch statistics of its full-size
map, round-robin with the floor's numpy GEMM; the sum is a lower bound for any graph built from
onnxruntime's own kernels. The work is `maml_export.bench.bound.product_bound`.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from maml_export.cli import run


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--configs", default="5w1s,20w5s", show_default=True,
              help="Comma-separated N-way K-shot configs (15 queries per class), as maml-bench's.")
@click.option("--steps", type=click.IntRange(min=1), default=5, show_default=True, help="Inner SGD steps.")
@click.option("--hidden", type=click.IntRange(min=1), default=64, show_default=True, help="conv-4 channels.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads. [default: all cores]")
@click.option("--rounds", type=click.IntRange(min=3), default=15, show_default=True,
              help="Timed calls of each product (and of the GEMM), round-robin; p50 reported.")
@click.option("--json", "json_file", type=click.Path(dir_okay=False), default=None, help="Also write the report here.")
def cli(configs, steps, hidden, threads, rounds, json_file):
    """Time each matrix product of adapt-then-predict (K SGD steps on the support set, one forward on the
    queries) alone as an onnxruntime MatMul, and the queries' first block's batch statistics and max-pool,
    and compare their sum with the FLOP floor (counted FLOPs over numpy's 2048^3 GEMM rate, timed in the
    same rounds)."""
    from maml_export.bench.benchmark import parse_configs
    from maml_export.bench.bound import product_bound
    from maml_export.bench.machine import available_cores
    from maml_export.specs import conv4_specs

    threads = threads or available_cores()
    reports = {}
    for c in parse_configs(configs):
        click.echo(f"timing the products of {c.name} ...", err=True)
        r = reports[c.name] = product_bound(conv4_specs(c.ways, hidden=hidden), c.ways * c.shots, c.ways * c.query,
                                            steps, threads, rounds)
        click.echo(f"{c.name}: {r['flops'] / 1e9:.2f} GFLOP in {sum(p['count'] for p in r['products'])} products; "
                   f"floor {r['floor_ms']:.1f} ms (2048^3 GEMM p50: numpy {r['gemm_p50_gflops']:.0f} GFLOP/s, "
                   f"onnxruntime {r['onnxruntime_gemm_p50_gflops']:.0f}; {threads} threads)")
        for p in sorted(r["products"], key=lambda p: -p["ms"]):
            shape = f"({p['m']}, {p['k']}) x ({p['k']}, {p['n']}) x{p['count']:<2d}"
            click.echo(f"  {p['ms']:7.2f} ms  {p['what']:<24s} {shape} {p['gflops']:6.1f} GFLOP/s  {p['form']}")
        click.echo(f"  products alone: {r['products_ms']:.1f} ms = {r['products_floor_multiple']:.2f}x the floor")
        b = r["query_first_block_ms"]
        if b:
            forms = ", ".join(f"{k} {v:.2f}" for k, v in b["pool_forms"].items())
            click.echo(f"  + the queries' first block: batch statistics {b['statistics']:.2f} ms, "
                       f"max-pool {b['pool']:.2f} ms ({forms})")
        click.echo(f"  lower bound: {r['bound_ms']:.1f} ms = {r['floor_multiple']:.2f}x the floor\n")
    if json_file:
        Path(json_file).write_text(json.dumps(reports, indent=1))


def main(args: list[str] | None = None) -> None:
    run(cli, args, "python -m bench.bound")


if __name__ == "__main__":
    main()
