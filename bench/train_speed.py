"""Seconds per meta-iteration: this project's trainer (first- and second-order) beside a PaddleRec-style loop.

    python -m bench.train_speed --data ../shared/omniglot            # 5-way 1-shot, 15 queries, 5 steps, 32 tasks

All runtimes see the same weights and the same real Omniglot tasks, in one process, one after another;
each is warmed up once and timed `--repeats` times (median reported).
"""
import json
import statistics
import time

import click

from maml_export.cli import run


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--data", type=click.Path(), default=None, help="Omniglot folder [default: $OMNIGLOT_DIR]")
@click.option("--ways", type=click.IntRange(min=2), default=5, show_default=True)
@click.option("--shots", default=1, show_default=True)
@click.option("--query", default=15, show_default=True, help="query images per class")
@click.option("--steps", default=5, show_default=True, help="inner SGD steps")
@click.option("--meta-batch", default=32, show_default=True, help="tasks per meta-iteration")
@click.option("--repeats", default=3, show_default=True, help="timed meta-iterations per runtime")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads [default: all cores]")
@click.option("--skip-paddlerec", is_flag=True, help="do not time the (slow) PaddleRec-style loop")
@click.option("--json", "json_file", type=click.Path(dir_okay=False), default=None, help="also write results here")
def cli(data, ways, shots, query, steps, meta_batch, repeats, threads, skip_paddlerec, json_file):
    """Time one meta-iteration (adapt every task, query loss, meta-gradient) of each runtime."""
    import paddle

    from maml_export.bench import paddlerec
    from maml_export.data import TaskSampler, load_omniglot, split_characters
    from maml_export.errors import MamlError
    from maml_export.maml import MAML
    from maml_export.bench.machine import count_flops, gemm_gflops
    from maml_export.model import Model, to_tensors
    from maml_export.specs import conv4_specs
    from maml_export.process import set_threads
    from maml_export.trainer import as_tensors, data_dir

    threads = set_threads(threads)
    try:
        images = load_omniglot(data_dir(data))
    except MamlError as e:
        raise click.ClickException(str(e))
    tasks = TaskSampler(images, split_characters()["train"], ways, shots, query, seed=0).sample(meta_batch)
    tensors = as_tensors(tasks)
    model = Model.from_specs(conv4_specs(ways))
    init = model.init_params(0)

    def timed(step):
        step()  # warm-up
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            step()
            times.append(time.perf_counter() - began)
        return statistics.median(times)

    results = {}
    for name, first_order in (("maml-export first-order", True), ("maml-export second-order", False)):
        maml = MAML(model, to_tensors(init), inner_lr=0.4, steps=steps, first_order=first_order)
        results[name] = timed(lambda: maml.meta_step(*tensors))
        click.echo(f"{name:28s} {results[name]:7.2f} s/iteration", err=True)
    if not skip_paddlerec:
        net = paddlerec.build_net(model, init)
        results["paddlerec-style first-order"] = timed(
            lambda: paddlerec.meta_step_first_order(net, tensors, steps, 0.4))
        click.echo(f"{'paddlerec-style first-order':28s} {results['paddlerec-style first-order']:7.2f} s/iteration",
                   err=True)
        for name in list(results)[:2]:
            click.echo(f"speed-up of {name} over the PaddleRec-style loop: "
                       f"{results['paddlerec-style first-order'] / results[name]:.2f}x", err=True)
    # The floor: a meta-iteration's counted FLOPs (first-order: the support steps, then the query's
    # forward and gradients) over this machine's numpy GEMM rate, and over the rate of Paddle's own
    # conv2d kernel on the query's largest convolution, the fastest op any Paddle trainer can use.
    specs = model.specs()
    flops = meta_batch * (count_flops(specs, ways * shots, 0, steps) + count_flops(specs, ways * query, 0, 1))
    conv_rate = paddle_conv_gflops(ways * query)
    floors = {"gflop": flops / 1e9, "gemm_gflops": gemm_gflops(threads), "paddle_conv2d_gflops": conv_rate}
    floors["gemm_floor_s"] = floors["gflop"] / floors["gemm_gflops"]
    floors["paddle_conv2d_floor_s"] = floors["gflop"] / conv_rate
    click.echo(f"floor: {floors['gflop']:.1f} GFLOP per meta-iteration (first-order) / "
               f"{floors['gemm_gflops']:.0f} GFLOP/s numpy GEMM = {floors['gemm_floor_s']:.2f} s; / "
               f"{conv_rate:.0f} GFLOP/s Paddle conv2d ({ways * query}x64x14x14) = "
               f"{floors['paddle_conv2d_floor_s']:.2f} s", err=True)
    report = {"floor": floors,
              "config": {"ways": ways, "shots": shots, "query": query, "steps": steps, "meta_batch": meta_batch,
                         "threads": threads, "repeats": repeats, "paddle": paddle.__version__},
              "seconds_per_iteration": results}
    click.echo(json.dumps(report))
    if json_file:
        with open(json_file, "w") as f:
            json.dump(report, f, indent=1)


def paddle_conv_gflops(images: int) -> float:
    """Rate of Paddle's conv2d forward on (images, 64, 14, 14) -> 64 channels, 3x3: best of 5."""
    import paddle
    import paddle.nn.functional as F

    x, w = paddle.rand([images, 64, 14, 14]), paddle.rand([64, 64, 3, 3])
    float(F.conv2d(x, w, padding=1).sum())  # warm-up
    best = float("inf")
    for _ in range(5):
        began = time.perf_counter()
        float(F.conv2d(x, w, padding=1).sum())
        best = min(best, time.perf_counter() - began)
    return 2 * images * 64 * 64 * 9 * 14 * 14 / best / 1e9


def main(args: list[str] | None = None) -> None:
    run(cli, args, "python -m bench.train_speed")


if __name__ == "__main__":
    main()
