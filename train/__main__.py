"""`maml-train` or `python -m train`: meta-train MAML on Omniglot or your own image folders; `evaluate`: meta-test
accuracy; `bundle`; `download`: Omniglot's official zips; `examples`: images to try maml-predict with.

`maml-train` is the installed console script: it runs this same CLI from any folder, where `python -m
train` would run a `train.py` of the current folder instead, if there is one.
"""
import json
import sys

import click

from maml_export.cli import checkpoint_argument, fail, run
from maml_export.config import RESUME_MAY_CHANGE, MamlConfig, click_options, flag, given
from maml_export.specs import HEAD_INITS, QUERY_NORMS


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--data", type=click.Path(), default=None,
              help="Omniglot (the .npz pair, the official zips or their extracted folders), or a folder of your "
                   "own images: DIR/<class>/*.png|jpg|jpeg|bmp|webp (split by --split), DIR/{train,val,test}/<class>/, "
                   "or DIR/images/ with train.csv, val.csv, test.csv (filename,label) [default: with --resume, the "
                   "run's own (recorded in its checkpoints); else $OMNIGLOT_DIR; else Omniglot's official zips in the "
                   "cache, downloaded on first use (`maml-train download`)]")
@click.option("--out", type=click.Path(file_okay=False), default="runs/default", show_default=True,
              help="run folder: checkpoints latest/best (.npz + .json) and metrics.jsonl")
@click.option("--resume", is_flag=True, help="continue the run in --out (weights, Adam and task stream); only "
              + ", ".join(map(flag, RESUME_MAY_CHANGE)) + " may differ from the run's")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for Paddle [default: all cores]")
@click.option("--save-every-seconds", type=click.FloatRange(min=0), default=60, show_default=True,
              help="also save `latest` after the first iteration this long after the last save, so that a hard "
                   "kill (power, OOM killer, SIGKILL) loses at most about this much; 0: after every iteration")
@click_options(MamlConfig)
@click.pass_context
def cli(ctx, data, out, resume, threads, save_every_seconds, **options):
    """Meta-train a conv-4 MAML on Omniglot or your own images (5-way 1-shot by default).

    \b
    Examples (`python -m train` runs the same):
      maml-train --data ../shared/omniglot --iterations 200 --first-order --out runs/quick
      maml-train --data my-drawings/ --out runs/mine   (an image folder: 5 minutes, ends with runs/mine/bundle.npz)
      maml-train --out runs/quick --resume --iterations 400    (the run remembers its --data)
      maml-train --out runs/quick --resume --iterations 600 --meta-lr 1e-4
      maml-train evaluate --checkpoint runs/quick --tasks 600    (a run folder: its bundle.npz, else best.npz)

    
    An image folder of drawings (grayscale, dark on light) meta-fine-tunes the shipped omniglot-5w1s weights at
    their pixels (1x28x28, ink); other images train from random weights (3x84x84, 32 filters). Either way:
    first-order, meta-batch 4, 5 queries a class, --minutes 5, at least 5 classes in val and test, and a
    calibrated bundle at the end. Options given win; docs/training.md#your-own-images.

    Prints a JSON summary: `train_seconds` is the meta-iterations' compute time over the whole run
    (validation excluded, as the `seconds` of metrics.jsonl), `wall_seconds` this command's wall time.
    """
    if ctx.invoked_subcommand is not None:
        return
    options = given(options)
    from maml_export.distributed import RankLostError  # these import paddle: keep --help fast
    from maml_export.trainer import Terminated, train
    import shlex
    again = f"{ctx.find_root().info_name} --out {shlex.quote(out)} --resume"  # the run remembers its data
    # a resume's options are checked together with the run's own config (trainer._start), not alone: the run's
    # --augment-redraw makes a new --augment-redraw-mix valid, its --zero-head a new --val-ways
    config = None if resume else MamlConfig(**options)
    try:
        summary = train(config, data, out, resume=resume, overrides=options, threads=threads,
                        save_every_seconds=save_every_seconds)
    except (RankLostError, Terminated) as e:
        sys.exit(fail(f"{e}; the last completed iteration is saved: continue with {again}", 1))
    except KeyboardInterrupt:
        sys.exit(fail(f"interrupted; the last completed iteration is saved: continue with {again}", 130))
    click.echo(json.dumps(summary))


FEATURE_SCALE_HELP = ("multiply the features by this (the last batch norm's weight and bias; the prototype logits by its "
                      "square, classes unchanged), so that a 1-shot support loss saturates and adaptation stops at its "
                      "fixed point: docs/design.md#the-feature-scale; the temperature divides it back out")


def _suite_conditions(ctx, param, value: str | None) -> tuple | None:
    """--conditions 'as-drawn,tilted' -> ('as-drawn', 'tilted'), in the suite's order; a name it lacks is a usage error."""
    if value is None:
        return None
    from maml_export.suite import CONDITIONS  # here, not at import: the suite's image code is no part of start-up
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in CONDITIONS]
    if unknown or not names:
        raise click.BadParameter(f"{', '.join(unknown) or repr(value)}: the suite's conditions are {','.join(CONDITIONS)}")
    return tuple(c for c in CONDITIONS if c in names)


@cli.command()
@click.option("--checkpoint", type=click.Path(), default=None,
              help="checkpoint .npz, a run folder (its calibrated bundle.npz where training ended with one, else its "
                   "best.npz, chosen on validation), or a bundled one by name "
                   "(omniglot-20w1s) [default: the bundled omniglot-5w1s]")
@click.option("--data", type=click.Path(), default=None,
              help="the data the checkpoint was trained on (Omniglot or its image folder) [default: a run's own; "
                   "else $OMNIGLOT_DIR]")
@click.option("--tasks", type=click.IntRange(min=1), default=600, show_default=True, help="test tasks to average over")
@click.option("--split", type=click.Choice(["test", "val", "train"]), default="test", show_default=True)
@click.option("--steps", type=int, default=None,
              help="inner SGD steps [default: the checkpoint's deployed ones: its --val-steps if it has them]")
@click.option("--inner-lr", type=float, default=None,
              help="inner step size [default: the checkpoint's deployed one: its --val-inner-lr if it has one]")
@click.option("--head-init", type=click.Choice(HEAD_INITS), default=None,
              help="where adaptation starts the head (see `python -m train --help`) [default: the checkpoint's]")
@click.option("--query-norm", type=click.Choice(QUERY_NORMS), default=None,
              help="how queries are normalised (see `python -m train --help`) [default: the checkpoint's]")
@click.option("--support-shift", type=click.IntRange(min=0), default=None,
              help="adaptation also learns from each support image shifted by this many pixels in each direction "
                   "(9 views; see maml-export --help) [default: the checkpoint's]")
@click.option("--feature-scale", type=click.FloatRange(min=0, min_open=True), default=None,
              help=FEATURE_SCALE_HELP)
@click.option("--ways", type=click.IntRange(min=2), default=None,
              help="classes per task: a --zero-head checkpoint's backbone with a zero head of that size "
                   "[default: the checkpoint's deployed ways]")
@click.option("--export", "export_dir", type=click.Path(file_okay=False), default=None,
              help="evaluate this maml-export folder instead, as a deployment runs it: onnxruntime, adapt.onnx once "
                   "per task, then predict.onnx on one query image at a time (--checkpoint and the adaptation "
                   "options do not apply)")
@click.option("--shots", type=click.IntRange(min=1), default=None, help="support images per class [default: the checkpoint's]")
@click.option("--query", type=click.IntRange(min=1), default=None,
              help="query images per class [default: 15, or fewer where an image folder's classes hold fewer: all "
                   "the images of its smallest class but the shots]")
@click.option("--seed", type=int, default=None, help="seed of the test tasks [default: fixed]")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads [default: all cores]")
@click.option("--suite", type=click.Choice(["shift"]), default=None,
              help="the robustness suite: Omniglot's --split redrawn as people draw (tilted, small and off-centre, "
                   "thinner and thicker strokes, elastic, all together; maml_export/suite.py), 1- and 5-shot (or "
                   "--shots), each query alone, 0 steps and the deployed steps paired on the same tasks")
@click.option("--conditions", callback=_suite_conditions, default=None,
              help="with --suite: only these of its conditions, comma-separated, e.g. 'as-drawn,tilted,small,all' "
                   "(they are listed in docs/robustness.md) [default: all]")
@click.option("--json", "as_json", is_flag=True, help="print only the JSON result")
def evaluate(checkpoint, data, tasks, split, steps, inner_lr, head_init, query_norm, support_shift, feature_scale, ways,
             export_dir, shots, query, seed, threads, suite, conditions, as_json):
    """Meta-test accuracy of a checkpoint (or an export), mean over --tasks tasks with its 95% interval, and the
    calibration of its probabilities (ECE, 15 bins).

    \b
    Examples:
      maml-train evaluate --tasks 600                          (the bundled 5-way 1-shot model, Omniglot's test split)
      maml-train evaluate --checkpoint omniglot-20w1s --suite shift --tasks 200 --split val
      maml-train evaluate --data my-drawings/ --shots 5        (a bundle on your own labelled folder's test classes)
    """
    from maml_export.checkpoint import default_checkpoint
    from maml_export.protocol import TEST_SEED
    from maml_export.trainer import evaluate_checkpoint, evaluate_export, evaluate_suite
    seed = TEST_SEED if seed is None else seed
    if conditions and not suite:
        raise click.UsageError("--conditions chooses among the robustness suite's conditions: pass --suite shift")
    if suite:
        if export_dir or head_init or query_norm:
            raise click.UsageError("--suite evaluates a checkpoint as deployed, each query alone: leave out --export, "
                                   "--head-init and --query-norm")
        result = evaluate_suite(checkpoint_argument(checkpoint) or default_checkpoint(), data, tasks, split,
                                (shots,) if shots else (1, 5), conditions, seed=seed, query=query, threads=threads,
                                progress=not as_json, ways=ways, steps=steps, inner_lr=inner_lr,
                                support_shift=support_shift, feature_scale=feature_scale)
        click.echo(json.dumps(result))
        return
    if export_dir:
        result = evaluate_export(export_dir, data, tasks, split, seed, query, threads, progress=not as_json,
                                 shots=shots)
    else:
        result = evaluate_checkpoint(checkpoint_argument(checkpoint) or default_checkpoint(), data, tasks, split,
                                     steps, inner_lr, seed, query, threads, progress=not as_json, head_init=head_init,
                                     query_norm=query_norm, ways=ways, shots=shots,
                                     support_shift=support_shift, feature_scale=feature_scale)
    if not as_json:
        head = f"{result['head_init']} head, " if "head_init" in result else ""
        click.echo(f"{result['config']}: {result['ways']}-way {result['shots']}-shot, {result['steps']} steps, {head}"
                   f"{split} accuracy {100 * result['accuracy']:.2f} ± {100 * result['ci95']:.2f} % "
                   f"over {tasks} tasks, {result['queries']}; ECE {result['ece']:.4f}")
    click.echo(json.dumps(result))


@cli.command()
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), required=True,
              help="bundle to write (.npz; .json and .metrics.jsonl beside it), e.g. "
                   "maml_export/pretrained/omniglot-5w1s.npz to make it the default weights")
@click.option("--inner-lr", type=float, default=None,
              help="inner step size adaptation uses from now on (the exports' default), e.g. one chosen on the "
                   "validation split with `evaluate --split val --inner-lr`; [default: the run's]")
@click.option("--note", default=None, help="why, e.g. the validation figures behind --inner-lr (kept in the bundle)")
@click.option("--ways", type=int, default=None,
              help="ship for this many ways: the backbone of a --zero-head run with a zero head of that size, e.g. "
                   "a run trained on 20-way tasks and chosen on 5-way ones, shipped for 20 ways [default: the "
                   "run's --val-ways, else its --ways]")
@click.option("--head-init", type=click.Choice(HEAD_INITS), default=None,
              help="ship with this head initialisation, e.g. 'prototypes' chosen on the validation split with "
                   "`evaluate --split val --head-init` [default: the run's]")
@click.option("--support-shift", type=click.IntRange(min=0), default=None,
              help="ship with adaptation also learning from each support image shifted by this many pixels (9 "
                   "views), chosen on the validation split with `evaluate --split val --support-shift`; the "
                   "temperature is fitted with it [default: the run's, 0]")
@click.option("--feature-scale", type=click.FloatRange(min=0, min_open=True), default=None,
              help=FEATURE_SCALE_HELP + " [default: 1]")
@click.option("--calibration-tasks", type=click.IntRange(min=0), default=200, show_default=True,
              help="validation tasks (--calibration-query queries per class) the temperature is fitted on, so that "
                   "the shipped model's probabilities are calibrated; 0: ship without one (temperature 1)")
@click.option("--calibration-query", type=click.IntRange(min=1), default=15, show_default=True,
              help="query images per class of those tasks (image folders whose classes hold fewer than shots + 15 "
                   "images need fewer)")
@click.option("--data", type=click.Path(), default=None,
              help="the data for --calibration-tasks, Omniglot or the run's image folder [default: the run's own; "
                   "else $OMNIGLOT_DIR]")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
              help="ship this checkpoint of RUN instead of its best.npz: a copy of its latest.npz chosen on "
                   "something the run's validation does not measure, e.g. the robustness suite (`evaluate --suite "
                   "shift --split val`); say why in --note [default: RUN/best.npz]")
def bundle(run, out, inner_lr, note, ways, head_init, support_shift, feature_scale, calibration_tasks, calibration_query,
           data, checkpoint):
    """Package RUN's best checkpoint (chosen on validation) for shipping: weights and config without
    optimizer state, the temperature that calibrates its probabilities, the command that reproduces the run,
    and its metrics log up to that iteration."""
    from maml_export.checkpoint import bundle_run
    calibrate = None
    if calibration_tasks:
        from maml_export.trainer import calibrate as fit
        calibrate = lambda deployed: fit(deployed, data, calibration_tasks, calibration_query)  # noqa: E731
    # --inner-lr, --ways: checked by the shipped config (MamlConfig), as for training
    ckpt = bundle_run(run, out, inner_lr, note, ways, head_init, calibrate, support_shift, feature_scale,
                      checkpoint=checkpoint)
    click.echo(json.dumps({"out": out, "iteration": ckpt.iteration, **ckpt.state}))


@cli.command()
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="folder for images_background.zip and images_evaluation.zip [default: omniglot/ in the cache, "
                   "$MAML_EXPORT_CACHE or ~/.cache/maml-export, where training finds them without --data]")
@click.option("--base-url", default=None,
              help="folder URL the two zips are under, e.g. a mirror [default: $MAML_EXPORT_OMNIGLOT_URL, else the "
                   "official https://raw.githubusercontent.com/brendenlake/omniglot/master/python]")
def download(out, base_url):
    """Download Omniglot's official zips (md5-checked; a file already there is kept) and print their folder."""
    from maml_export.download import download_omniglot
    click.echo(download_omniglot(out, base_url))


@cli.command()
@click.option("--out", type=click.Path(file_okay=False), default="examples", show_default=True,
              help="folder for support/ (one sub-folder per class) and query/ (flat)")
@click.option("--data", type=click.Path(), default=None,
              help="Omniglot (the .npz pair, the official zips or their folders) [default: $OMNIGLOT_DIR; else "
                   "Omniglot's official zips in the cache, downloaded on first use]")
@click.option("--ways", type=click.IntRange(min=2), default=5, show_default=True,
              help="classes: the model's ways (omniglot-20w1s: 20)")
@click.option("--shots", type=click.IntRange(min=1), default=1, show_default=True, help="support drawings per class")
@click.option("--query", type=click.IntRange(min=1), default=3, show_default=True, help="query drawings per class")
@click.option("--seed", type=int, default=0, show_default=True, help="which characters and drawings")
def examples(out, data, ways, shots, query, seed):
    """Write example images for maml-predict from Omniglot's evaluation set (characters of the test split, which
    no shipped model trained on): OUT/support/<class>/N.png, the classes to learn, and OUT/query/<class>-N.png,
    the images to classify, in one flat folder (their names tell the answer)."""
    from maml_export.examples import write_examples
    from maml_export.outputs import check_writable_dir
    from maml_export.trainer import data_dir
    check_writable_dir(out, "--out")
    done = write_examples(data_dir(data), out, ways, shots, query, seed)
    click.echo(f"wrote {done['support']}/ ({', '.join(done['classes'])}: {shots} each) and {done['query']}/ "
               f"({query * ways} images); try: maml-predict --model exported --support {done['support']} "
               f"--query {done['query']}")


def main(args: list[str] | None = None, prog_name: str = "maml-train") -> None:
    """The `maml-train` console script (exit 1 on a failure, 2 on a usage error, 130 on Ctrl-C)."""
    run(cli, args, prog_name)


if __name__ == "__main__":
    main(prog_name="python -m train")
