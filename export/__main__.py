"""`maml-export`: export a checkpoint's MAML adaptation to a Paddle static graph and to ONNX.

    maml-export --steps 5 --out exported/

writes exported/model.json + model.pdiparams (Paddle), model.onnx and export.json, then checks that
eager Paddle, the static program and onnxruntime agree. The work is `maml_export.export.export_model`;
this module only parses options and prints.
"""
from __future__ import annotations

import click

from maml_export.cli import checkpoint_argument, run
from maml_export.contract import MAX_STEPS

@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--checkpoint", type=str, default=None,
              help="Checkpoint (.npz written by `maml-train`; a run folder: its calibrated bundle.npz, which training "
                   "on an image folder ends with, else its best.npz, the checkpoint chosen on validation (pass "
                   "RUN/latest.npz for where training stopped); or a bundled one by name: "
                   "omniglot-5w1s, omniglot-20w1s). [default: the bundled omniglot-5w1s]")
@click.option("--steps", type=click.IntRange(1, MAX_STEPS), default=5, show_default=True,
              help=f"Inner SGD steps on the support set, unrolled into the graph: 1 to {MAX_STEPS} (each step is "
                   f"traced, and time and memory grow with them: {MAX_STEPS} take about 1.5 minutes on 2 cores).")
@click.option("--inner-lr", type=float, default=None,
              help="Inner SGD step size. [default: the checkpoint's deployed one: a bundle's, a run's "
                   "--val-inner-lr if it has one, else its --inner-lr]")
@click.option("--head-init", type=str, default=None,
              help="Where each task's adaptation starts the head: 'meta', the checkpoint's meta-learned head; "
                   "'prototypes', the support set's Euclidean prototype classifier. [default: the checkpoint's; "
                   "the bundled 5-way weights: prototypes]")
@click.option("--query-norm", type=click.Choice(["support", "transductive"]), default=None,
              help="What batch norm normalises query images with: 'support', the support set's statistics (each "
                   "query's class depends on it alone: classify one image at a time); 'transductive', the query "
                   "batch's own, as the MAML paper's code does. [default: the checkpoint's; models trained before "
                   "--query-norm existed: transductive]")
@click.option("--support-shift", type=click.IntRange(min=0), default=None,
              help="Adaptation also learns from each support image shifted by this many pixels in each direction "
                   "(9 views, edges replicated): test-time augmentation of the support set, which costs adapt about "
                   "9x and predict nothing; 0: off. [default: the checkpoint's; the bundled weights: 2]")
@click.option("--opset", type=click.IntRange(13, 21), default=17, show_default=True, help="ONNX opset version (13 to 21).")
@click.option("--out", type=str, default="exported", show_default=True,
              help="Output folder for model.onnx, adapt.onnx, predict.onnx (and their Paddle programs) and "
                   "export.json.")
@click.option("--tasks", type=click.IntRange(min=1), default=8, show_default=True,
              help="Tasks for the parity check (eager Paddle vs static program vs onnxruntime).")
@click.option("--data", type=str, default=None,
              help="The data the checkpoint was trained on (Omniglot, or its image folder): parity runs on real "
                   "test tasks. [default: $OMNIGLOT_DIR for Omniglot's models, a run's own image folder for its models, "
                   "else made-up characters]")
@click.option("--task-batch", type=click.IntRange(min=1), default=None,
              help="Export a graph for T tasks per call (inputs [T, S, C, H, W], [T, S], [T, Q, C, H, W] -> "
                   "logits [T, Q, ways]; T fixed, S and Q dynamic), for throughput. Parity then runs on --tasks "
                   "rounded up to a multiple of T. [default: one task per call, no task axis]")
@click.option("--every-step", is_flag=True, default=False,
              help="adapt.onnx and model.onnx run all --steps on every task, without the `If` that stops "
                   "adaptation where a step would change nothing (the same result; the stop saves the work). For "
                   "timing the same work as a peer that runs every step; --task-batch graphs always do.")
def cli(checkpoint, steps, inner_lr, head_init, query_norm, support_shift, opset, out, tasks, data, task_batch,
        every_step):
    """Export MAML adaptation (STEPS SGD steps on a support set, then query logits) as ONNX graphs.

    \b
    model.onnx    x_spt float32 [S, C, H, W], y_spt int64 [S] (labels 0..ways-1),
                  x_qry float32 [Q, C, H, W]  ->  logits float32 [Q, ways]
    adapt.onnx    x_spt, y_spt  ->  the task's state (fast weights, support statistics), named tensors
    predict.onnx  that state (the same names), x_qry [Q, C, H, W]  ->  logits [Q, ways]

    S and Q are dynamic; adapt once, then predict any number of images. With --task-batch T only
    model.onnx is written, every input and the output with a leading task axis of T. Exits non-zero
    when eager Paddle, the static program and onnxruntime disagree beyond the tolerance, or the split
    graphs differ from the fused one (figures in export.json).
    """
    from maml_export.outputs import check_writable_dir

    checkpoint = checkpoint_argument(checkpoint)
    check_writable_dir(out, "--out")  # before the minute of tracing and converting, not after it
    from maml_export.export import export_model

    report = export_model(checkpoint, out, steps=steps, inner_lr=inner_lr, opset=opset, tasks=tasks, data=data,
                          task_batch=task_batch, head_init=head_init, query_norm=query_norm,
                          support_shift=support_shift, every_step=every_step, echo=print)
    click.echo(f"wrote {', '.join(report.files.values())}")
    top = ", ".join(f"{k} {v}" for k, v in list(report.ops.items())[:5])
    click.echo(f"ONNX graph: {sum(report.ops.values())} nodes ({top}, ...)")


def main(args: list[str] | None = None) -> None:
    run(cli, args, "maml-export")


if __name__ == "__main__":
    main()
