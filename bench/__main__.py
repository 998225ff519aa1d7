"""`maml-bench`: adapt-then-predict latency of the exported MAML graph beside its peers.

    maml-bench --provider cpu                                  # bundled weights, 4 configs, a table
    maml-bench --model export/model.onnx --configs 5w1s --runs 50 --max-seconds 0 --json bench.json
    maml-bench --data ../shared/omniglot --tasks 600           # plus meta-test accuracy

The work is `maml_export.bench.benchmark.run_benchmark`; this module parses options and prints.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import click

from maml_export.cli import GPU_INSTALL, run
from maml_export.contract import MAX_STEPS


COLUMNS = ("steps", "p50 ms", "p90 ms", "p99 ms", "mean ms", "tasks/s", "queries/s", "vs fastest", "x floor", "runs",
           "rel diff", "same class")
STAGES = ("adapt+predict", "adapt", "predict")  # the order of a config's rows: fused first, then the split rows


def _cells(r: dict) -> tuple:
    mark = " !!" if r["flagged"] else " f64" if r["disagreements"] else ""
    ms = ".2f" if r["p50_ms"] < 10 else ".1f"  # a predict row takes well under a millisecond
    unchecked, ratio = r["max_rel_vs_eager"] is None, r["ratio_to_fastest"]
    steps = "-" if r["steps_run"] is None else f"{r['steps_run']:g}/{r['steps']}"  # a predict call runs no step
    return (steps, *(f"{r[k]:{ms}}" for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms")),
            "-" if r["stage"] == "predict" else f"{r['tasks_per_s']:.2f}",  # a predict call adapts no task
            f"{r['queries_per_s']:.0f}" if "queries_per_s" in r else "-", "-" if ratio is None else f"{ratio:.2f}x",
            "n/a" if r["floor_multiple"] is None else f"{r['floor_multiple']:.1f}x", str(r["runs"]),
            "n/a" if unchecked else f"{r['max_rel_vs_eager']:.1e}",
            "not checked" if unchecked else f"{r['same_class']}/{r['queries']}{mark}")


def _order(r: dict) -> tuple:
    """A config's rows: adapt-and-predict, adapt, predict one query, predict all; in each, the rows of the same
    work together (most steps first), fastest first."""
    return (STAGES.index(r["stage"]), r.get("queries_per_call", 0), -(r["steps_run"] or 0),
            r["p50_ms"] / r.get("task_batch", 1))


def table(report: dict) -> str:
    """The report as text: a header, one block per config (rows fastest first), then notes."""
    s, m, results = report["settings"], report["machine"], report["results"]
    names = {id(r): r["runtime"] + (f" ({r['detail']})" if r["detail"] else "") for r in results}
    width = max([len(n) for n in names.values()] + [18])
    line = lambda name, cells: f"  {name:<{width}}" + "".join(f"{c:>{len(h) + 2}}" for c, h in zip(cells, COLUMNS))
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if k != "maml-export")
    how = ("every SGD step in every runtime (--every-step)" if s.get("every_step") else
           "SGD steps up to the fixed point the graphs stop at (--every-step: all)")
    lines = [f"adapt-then-predict: one task per call (support + 15 queries per class), {how}, provider "
             f"{s['provider']}, {s['threads']} threads; inputs: {s['inputs']}",
             f"machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}; {versions}",
             (f"floor = counted FLOPs / the p50 rate of a {report['gemm']}, timed round-robin with each config's rows"
              if report.get("gemm_round_robin") else
              f"floor = counted FLOPs / {report['gemm_gflops']:.1f} GFLOP/s ({report['gemm']}, measured now)"
              if report["gemm_gflops"] else f"no floor: no GEMM rate measured ({report['gemm']})")
             + "; rel diff and same class: against eager Paddle" + (" (the kit's logits)" if s.get("kit") else "")]
    if m.get("gpu"):
        lines.insert(2, f"GPU: {m['gpu']}")
    for config, floor in report["flop_floor_ms"].items():
        model = report["models"][config]
        floor_text = "no floor" if floor is None else f"floor {floor:.1f} ms"
        gemm = report.get("gemm_round_robin", {}).get(config)
        if gemm:
            floor_text += f" (GEMM p50 {gemm['p50_gflops']:.0f} GFLOP/s, best {gemm['best_gflops']:.0f}, {gemm['runs']} runs)"
        views = model.get("support_views", 1)
        lines += ["", f"{config}: {model['flops'] / 1e9:.2f} GFLOP ({model['steps']} steps"
                      + (f" on {views} views of each support image" if views > 1 else "") + f"), {floor_text}; "
                      f"weights: {model['weights']}", line("runtime", COLUMNS)]
        lines += [line(names[id(r)], _cells(r)) for r in sorted(results, key=_order) if r["config"] == config]
        lines += [f"  {x['runtime']:<{width}}  cannot run: {x['reason']}" for x in report["skipped"]
                  if x["config"] == config]
    notes = ["steps: the SGD steps a row's call ran, of the graph's; vs fastest: only between rows of the same work "
             "(the same call, the same steps run on the same support views); '-': no other row did that work"]
    if len({r["steps_run"] for r in results if r["steps_run"] is not None}) > 1:
        notes.append("rows that ran other numbers of steps did other work and are not compared: the single-task "
                     "graphs, eager Paddle, Paddle Inference and PyTorch stop at the fixed point (a step that would "
                     "change nothing), the PaddleRec loop runs every step; maml-bench --every-step runs every step "
                     "everywhere (docs/design.md#adaptation-stops-at-a-fixed-point)")
    if s["provider"] != "cpu":
        notes.append("Paddle peers not timed: this paddlepaddle computes on the CPU only (time them with --provider "
                     "cpu); eager Paddle still gives the reference logits. GPU rows: inputs and logits stay on the "
                     "device (onnxruntime: IO binding), except that the --task-batch rows copy them in and out on "
                     "every call; the floor is the GPU's fp32 GEMM rate.")
    if any(r["runs"] < s["runs"] for r in results):
        notes.append(f"rows with fewer than --runs {s['runs']} runs stopped after --max-seconds {s['max_seconds']:g} "
                     "(at least 3 runs); the p99 of few runs is about their maximum")
    if s.get("task_batch"):
        T = s["task_batch"]
        speedups = ", ".join(f"{r['config']} " + ("not the same work (the single-task graph stopped early: "
                                                  "--every-step)" if r["speedup_vs_loop"] is None else
                                                  f"{r['speedup_vs_loop']:.2f}x")
                             for r in results if "speedup_vs_loop" in r)
        notes.append(f"--task-batch {T}: onnxruntime-batch is one call of the graph exported with --task-batch {T}, "
                     f"onnxruntime-loop {T} calls of the single-task graph, on the same {T} tasks; their ms columns are "
                     f"per call ({T} tasks), tasks/s, vs fastest and x floor per task. Batched vs loop tasks/s: "
                     f"{speedups}")
    split = [r for r in results if r["stage"] != "adapt+predict"]
    if split:
        notes.append("adapt once, predict many: NAME adapt runs the SGD steps on the support set alone (adapt.onnx "
                     "for onnxruntime) and returns the task's state; NAME predict x1 / xQ classify 1 / all the "
                     "config's queries under it (predict.onnx); queries/s = queries per call / mean time; vs "
                     "fastest compares rows of the same work, x floor uses each row's own FLOPs; an adapt row's "
                     "classes are those its state gives the queries")
    if any(r["max_rel_vs_eager"] is None for r in split):
        notes.append("not checked: under transductive query normalisation a query predicted alone is normalised "
                     "with its own statistics, another function than the batch's eager Paddle computed")
    if any(r["disagreements"] and not r["flagged"] for r in results):
        notes.append("f64: the classes differ from eager float32 only where float64 Paddle sides with this runtime "
                     "(a max-pool near-tie that float32 rounds either way; docs/design.md#max-pool-near-ties-in-float32)")
    if any(r["flagged"] for r in results):
        notes.append("!!: DISAGREEMENT: other classes than eager Paddle in float32 and in float64")
    for a in report["accuracy"]:
        o, e = a["onnxruntime"], a["paddle-eager"]
        notes.append(f"accuracy {a['config']} over {a['tasks']} Omniglot test tasks: exported graph "
                     f"{100 * o['accuracy']:.2f} ± {100 * o['ci95']:.2f} %, eager Paddle {100 * e['accuracy']:.2f} ± "
                     f"{100 * e['ci95']:.2f} % (95% interval); same class {a['same_class']}/{a['queries']}; "
                     f"weights: {a['weights']}")
    return "\n".join(lines + [""] * bool(notes) + notes)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True,
              help=f"onnxruntime execution provider. cuda/tensorrt need onnxruntime-gpu in place of onnxruntime "
                   f"({GPU_INSTALL}) and run with IO binding (and a CUDA graph where possible); "
                   "the Paddle peers, CPU-only here, are then not timed.")
@click.option("--model", type=str, default=None,
              help="An exported model.onnx (or its folder), with model.json/model.pdiparams beside it. "
                   "[default: export the bundled weights into a temporary folder]")
@click.option("--configs", default="5w1s,5w5s,20w1s,20w5s", show_default=True,
              help="N-way K-shot configs, 15 queries per class. The graph's ways are fixed: other ways get a graph "
                   "of the same architecture and steps, from a bundled checkpoint of those ways if one exists, else "
                   "the model's conv weights with a zero head (latency does not depend on the values); the table "
                   "says which.")
@click.option("--steps", type=click.IntRange(1, MAX_STEPS), default=None,
              help=f"Inner SGD steps in the graph, 1 to {MAX_STEPS} (as maml-export). [default: the --model's, or 5 "
                   "when exporting]")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads. [default: all cores]")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True, help="Untimed calls per row.")
@click.option("--runs", type=click.IntRange(min=1), default=20, show_default=True, help="Timed calls per row.")
@click.option("--max-seconds", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="Stop a row's timed calls after this many seconds (at least 3 runs; slow peers such as the "
                   "PaddleRec loop get fewer runs). 0: always --runs.")
@click.option("--data", type=str, default=None,
              help="Omniglot folder, or the image folders the --model was trained on: benchmark on their real test "
                   "tasks. [default: $OMNIGLOT_DIR, else made-up characters]")
@click.option("--tasks", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also measure meta-test accuracy ± 95% interval on this many test tasks (the protocol: 600), "
                   "exported graph beside eager adaptation. Needs --data.")
@click.option("--task-batch", type=click.IntRange(min=1), default=None,
              help="Also time onnxruntime's throughput on T tasks: one call of a graph exported with --task-batch T "
                   "(same weights, exported now) against T single-task calls, on the same tasks; rows "
                   "onnxruntime-batch and onnxruntime-loop, tasks/s per task. With --write-kit: the kit holds the "
                   "batched graphs and T tasks; with --kit: the kit's T.")
@click.option("--write-kit", type=click.Path(file_okay=False), default=None,
              help="Write a benchmark kit to this folder and exit: the graphs --configs need, one task per config "
                   "and eager Paddle's logits for it. `maml-bench --kit DIR` then times them where Paddle is "
                   "not installed (a GPU box with onnxruntime-gpu and PyTorch).")
@click.option("--kit", type=click.Path(exists=True, file_okay=False), default=None,
              help="Time the graphs and tasks of a kit written by --write-kit, checked against its logits; needs "
                   "onnxruntime (and PyTorch for its row), not Paddle.")
@click.option("--every-step", is_flag=True, default=False,
              help="Every runtime runs every SGD step: the graphs exported with maml-export --every-step (a --model "
                   "or --kit must be), the peers without their stop. [default: the graphs, eager Paddle, Paddle "
                   "Inference and PyTorch stop at the fixed point where a step would change nothing; the PaddleRec "
                   "loop never does; rows of other steps are not compared]")
@click.option("--json", "json_file", type=click.Path(dir_okay=False), default=None, help="Also write the results here.")
def cli(provider, model, configs, steps, threads, warmup, runs, max_seconds, data, tasks, task_batch, write_kit, kit,
        every_step, json_file):
    """Time adapt-then-predict (one task in, query logits out, its SGD steps) of the exported MAML graph in
    onnxruntime beside eager Paddle, a PaddleRec-style loop, Paddle Inference and PyTorch, against the FLOP
    floor; and adapt once, predict many: adapt alone (adapt.onnx), then predict one query and all the
    config's queries (predict.onnx), beside the PyTorch peer doing the same.

    Prints the SGD steps each call ran, p50/p90/p99/mean latency, tasks/s (queries/s for the predict rows), the
    ratio to the fastest runtime of the same work (call, steps run, support views) and the multiple of the floor
    (counted FLOPs / this machine's GEMM rate, measured in the same run), and checks that every runtime predicts the classes eager Paddle predicts.
    Exits 3 on a disagreement, 1 on an error (2 on a usage error).
    """
    from maml_export.bench.benchmark import parse_configs, run_benchmark
    from maml_export.outputs import check_writable_dir, check_writable_file

    parsed = parse_configs(configs)
    data = data or os.environ.get("OMNIGLOT_DIR")
    if write_kit and kit:
        raise click.UsageError("--write-kit and --kit: write a kit here, time it (--kit) where it is to run")
    if json_file:  # now, not after minutes of timing
        check_writable_file(json_file, "--json")
    if write_kit:
        check_writable_dir(write_kit, "--write-kit")
    if write_kit:
        from maml_export.bench.benchmark import write_kit as write
        index = write(Path(write_kit), parsed, model and Path(model), steps, data, task_batch,
                      echo=lambda m: click.echo(m, err=True), every_step=every_step)
        click.echo(f"wrote the kit {write_kit}: {', '.join(index['configs'])}; time it with maml-bench --kit {write_kit}")
        return 0
    report = run_benchmark(parsed, provider, model, steps, threads, warmup, runs, max_seconds, data, tasks, task_batch,
                           kit, echo=lambda m: click.echo(m, err=True), every_step=every_step)
    click.echo(table(report))
    if json_file:
        with open(json_file, "w") as f:
            json.dump(report, f, indent=1)
    bad = [r for r in report["results"] if r["flagged"]]
    for r in bad:
        click.echo(f"!! DISAGREEMENT: {r['runtime']} predicts other classes than eager Paddle (float32 and float64) "
                   f"on {r['disagreements']} of {r['queries']} queries of {r['config']} (rel logit diff "
                   f"{r['max_rel_vs_eager']:.1e}; weights: {report['models'][r['config']]['weights']})", err=True)
    return 3 if bad else 0


def main(args: list[str] | None = None) -> None:
    run(cli, args, "maml-bench")


if __name__ == "__main__":
    main()
