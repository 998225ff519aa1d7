"""Meta-training and evaluation: the loop behind `python -m train`.

A run folder holds `latest.npz`/`.json` (weights, Adam state, task-sampler state: `--resume` continues
exactly where it stopped), `best.npz`/`.json` (best validation accuracy) and `metrics.jsonl` (one JSON
object per line: training iterations, validations, resumes). Checkpoints are chosen on the validation
split; the test split is only used by `evaluate`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import paddle
from tqdm import tqdm

from .calibration import calibration_report, fit_temperature
from .checkpoint import (Checkpoint, as_deployed, bundle_run, load_checkpoint, save_checkpoint, scale_features,
                         weights_sha256)
from .config import RESUME_MAY_CHANGE, VALIDATION, MamlConfig, flag
from .data import TaskSampler, shift_tasks
from .folders import open_dataset, trained_on_folders
from .distributed import RankLostError, Ranks
from .errors import ConfigError, DataError, MamlError
from .maml import MAML, split_step_sizes, step_size_shapes, zero_head
from .model import Model, to_tensors
from .specs import with_query_norm
from .optim import Adam
from .outputs import check_writable_dir
from .process import set_threads
from .protocol import CALIBRATION_SEED, TEST_SEED, VAL_SEED, mean_ci95


def as_tensors(tasks) -> list:
    return [paddle.to_tensor(a) for a in tasks]


def _task_batches(sampler: TaskSampler, num_tasks: int, batch: int, progress: bool, desc: str = "evaluate"):
    """`num_tasks` tasks from `sampler` in batches of at most `batch`: yields (first task's index, Tasks)."""
    done = 0
    with tqdm(total=num_tasks, desc=desc, unit="task", disable=not progress, leave=False) as bar:
        while done < num_tasks:
            tasks = sampler.sample(min(batch, num_tasks - done))
            yield done, tasks
            done += len(tasks.x_spt)
            bar.update(len(tasks.x_spt))


def evaluate(maml: MAML, sampler: TaskSampler, num_tasks: int, batch: int = 16, steps: int | None = None,
             progress: bool = False, ranks: Ranks | None = None, inner_lr: float | None = None) -> np.ndarray:
    """Query accuracy of each of `num_tasks` tasks after adaptation (queries normalised as the model's
    query_norm says).

    With `ranks`, every rank draws the same batches and adapts only its block of each.
    """
    accuracies = np.zeros(num_tasks, dtype=np.float32)
    with paddle.no_grad():
        for done, tasks in _task_batches(sampler, num_tasks, batch, progress):
            block = ranks.block(len(tasks.x_spt)) if ranks else slice(None)
            x_spt, y_spt, x_qry, y_qry = as_tensors(a[block] for a in tasks)
            if x_spt.shape[0]:
                logits = maml.predict(maml.adapt(x_spt, y_spt, steps=steps, inner_lr=inner_lr), x_qry)
                hits = (logits.argmax(axis=-1) == y_qry).astype("float32").mean(axis=1).numpy()
                accuracies[done:done + len(tasks.x_spt)][block] = hits
    return ranks.gather(accuracies) if ranks else accuracies


def query_logits(maml: MAML, sampler: TaskSampler, num_tasks: int, batch: int = 16, steps: int | None = None,
                 inner_lr: float | None = None, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Every query's logits (tasks, Q, ways), as `MAML.predict` gives them (divided by the temperature), and
    labels (tasks, Q), of `num_tasks` tasks from `sampler`."""
    logits, labels = [], []
    with paddle.no_grad():
        for _, tasks in _task_batches(sampler, num_tasks, batch, progress):
            x_spt, y_spt, x_qry, _ = as_tensors(tasks)
            logits.append(maml.predict(maml.adapt(x_spt, y_spt, steps=steps, inner_lr=inner_lr), x_qry).numpy())
            labels.append(tasks.y_qry)
    return np.concatenate(logits), np.concatenate(labels)


class Terminated(MamlError):
    """SIGTERM arrived (paddle.distributed.launch sends it to every rank when one rank fails)."""


def _raise_terminated(signum, frame):
    raise Terminated("stopped by SIGTERM (under paddle.distributed.launch this means another rank failed: "
                     "its workerlog in the launcher's --log_dir says why)")


class RunFolder:
    """The files of one training run in `out`."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.latest, self.best, self.metrics = self.out / "latest.npz", self.out / "best.npz", self.out / "metrics.jsonl"

    def log(self, record: dict) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate(self, iteration: int) -> int:
        """Drop the metric rows after `iteration` (the checkpoint a resume continues from: a hard kill loses
        the iterations after it, which the resume redoes) and a last line cut short by the kill, so that
        the log reads as one run; returns how many lines were dropped."""
        if not self.metrics.exists():
            return 0
        kept, dropped = [], 0
        for line in self.metrics.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict) and record.get("iteration", 0) <= iteration:
                kept.append(line + "\n")
            elif line.strip():
                dropped += 1
        if dropped:
            tmp = self.metrics.with_name(self.metrics.name + ".tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, self.metrics)
        return dropped


def _start(config: MamlConfig | None, run: RunFolder, resume: bool, overrides: dict):
    """(config, checkpoint or None, {option: value before} of the overrides applied): a new run, or the run
    in `run.out` with allowed overrides applied (a resume does not read `config`: the run's own is checked with
    the overrides)."""
    if not resume:
        if config is None:
            raise ValueError("a new run needs its MamlConfig (None is for --resume, which reads the run's own)")
        if run.latest.exists():
            raise ConfigError(f"{run.out} already holds a run: pass --resume to continue it, or another --out")
        return config, None, {}
    if not run.latest.exists():
        raise ConfigError(f"--resume: no checkpoint {run.latest} to resume (train without --resume first)")
    ckpt = load_checkpoint(run.latest)
    saved = ckpt.config
    conflicts = [f"{flag(k)} {v} (run has {getattr(saved, k)})" for k, v in overrides.items()
                 if k not in RESUME_MAY_CHANGE and getattr(saved, k) != v]
    if conflicts:
        raise ConfigError(f"--resume continues the run as it was configured; these options differ: "
                          f"{', '.join(conflicts)} (on resume only {', '.join(map(flag, RESUME_MAY_CHANGE))} may change)")
    before = {k: getattr(saved, k) for k in RESUME_MAY_CHANGE if k in overrides and overrides[k] != getattr(saved, k)}
    # a new config, so that the changed options are checked with the others (--val-ways needs --zero-head)
    return dataclasses.replace(saved, **{k: overrides[k] for k in before}), ckpt, before


def initial_params(model: Model, config: MamlConfig) -> tuple[dict, dict]:
    """A new run's weights and where they came from (`_initial_weights`), with `--learn-inner-lr`'s step sizes:
    `--init`'s where it learned them for as many steps, else --inner-lr at every layer and step."""
    params, origin = _initial_weights(model, config)
    if not config.learn_inner_lr:
        return split_step_sizes(params)[0], origin
    shapes = step_size_shapes(model, config.inner_steps)
    if all(k in params and params[k].shape == shape for k, shape in shapes.items()):
        return params, origin
    return {**params, **{k: np.full(shape, config.inner_lr, "float32") for k, shape in shapes.items()}}, origin


def _initial_weights(model: Model, config: MamlConfig) -> tuple[dict, dict]:
    """The network's starting weights and where they came from: `--init`'s checkpoint's (same architecture
    required; with `--zero-head` only the same backbone: its head is zeroed anyway), else random from `--seed`."""
    if config.init is None:
        return model.init_params(config.seed), {"seed": config.seed}
    source = load_checkpoint(config.init)
    # the path names a file that a later ship may overwrite; the hash names the weights themselves
    origin = {"init": str(config.init), "init_run": source.config.name, "init_iteration": source.iteration,
              "init_weights_sha256": weights_sha256(source.params)}
    scale = source.state.get("feature_scale")
    if scale not in (None, 1):  # a bundle shipped with its features scaled: train in the space it was trained in
        source.params = scale_features(source.config, source.params, 1 / scale)
        origin["feature_scale_undone"] = scale
    # how queries are normalised is no part of the weights: a transductive run's weights may start a support one
    source_layers = with_query_norm(source.config.layers, config.query_norm)
    if source_layers == config.layers:
        return source.params, origin
    # another number of ways, head init or temperature: the backbone, with a head that is zero or unused
    if config.head_is_zero and source_layers[:-1] == config.layers[:-1]:
        return model.with_zero_head(source.params), {**origin, "head": f"zero {config.ways}-way"}
    raise ConfigError(f"--init {config.init} is a {source.config.ways}-way model with {source.config.hidden} filters; "
                      f"this run is {config.ways}-way with {config.hidden} (match --hidden, and --ways unless "
                      f"--zero-head)")


class Training:
    """One meta-training run, phase by phase. Constructing it starts the run in `out` or resumes it (config,
    data, weights, Adam, the task stream); `step` runs one meta-iteration; `validate` measures the model as
    it would be deployed on the validation tasks; `save` writes a checkpoint and `keep` validates and saves
    `best` (if it is) and `latest`. `train` drives it. Under paddle.distributed every rank builds one and
    steps in lockstep; only the main rank writes."""

    def __init__(self, config: MamlConfig | None, data: str | os.PathLike | None, out: str | os.PathLike,
                 resume: bool = False, overrides: dict | None = None, threads: int | None = None):
        self.ranks = Ranks()
        set_threads(threads or max(1, (os.cpu_count() or 1) // self.ranks.world))
        self.files = RunFolder(out)
        self.config, ckpt, changed = _start(config, self.files, resume, overrides or {})
        self.ranks.check_meta_batch(self.config.meta_batch)
        if self.ranks.main:
            check_writable_dir(self.files.out, "--out")
        # the data folder is recorded in the checkpoints: a resume without --data reads the run's own
        self.data = os.path.abspath(data_dir(data, ckpt.state.get("data") if ckpt else None))
        # Omniglot or image folders; a new run's config gets the folders' defaults (pixels, split, and the sizes
        # the CLI user did not give) and its protocol
        self.dataset, self.config = open_dataset(self.data, self.config, new_run=not ckpt, given=overrides)
        c = self.config
        self.sampler = self.dataset.sampler("train", c.ways, c.shots, c.query, c.seed)
        if c.augment_redraw:
            if self.dataset.kind != "omniglot":
                raise ConfigError("--augment-redraw redraws Omniglot's full-resolution drawings: leave it out for "
                                  "image folders")
            from .suite import RedrawingSampler, raw_drawings, redraw_mix
            self.sampler = RedrawingSampler(self.sampler, raw_drawings(self.data, self.dataset.splits["train"]),
                                            c.augment_redraw, tasks=self.ranks.block(c.meta_batch),
                                            mix=redraw_mix(c.augment_redraw_mix), max_tilt=c.augment_tilt)
        self.val_sampler()  # fail now, not at the first validation, if the validation split cannot give such tasks
        self.model = Model.from_specs(c.layers)
        initial, origin = (ckpt.params, None) if ckpt else initial_params(self.model, c)
        self.params = to_tensors(initial)
        self.maml = MAML(self.model, self.params, c.inner_lr, c.inner_steps, c.first_order)
        self.adam = Adam(self.params, c.meta_lr)
        if c.head_is_zero:
            zero_head(self.model, self.params)
        self.iteration, self.seconds = 0, 0.0  # seconds: the meta-iterations' compute time over the whole run
        self.best_val_accuracy: float | None = None
        self.best_iteration: int | None = None
        # the weights a run starts from compete first when they are not this run's own: after a change of
        # validation on resume, or --init's (a fine-tune's baseline, on the same tasks; best never below it)
        self.validate_first = not ckpt and c.init is not None
        if ckpt:
            self._resume(ckpt, changed)
        self.files.out.mkdir(parents=True, exist_ok=True)
        if not ckpt and self.ranks.main:  # the config the run starts with, so a bundle can say how it was trained
            self.files.log({"event": "start", "iteration": 0, "ranks": self.ranks.world, "config": c.to_dict(),
                            "weights": origin, "data": self.data})
        self.saved_at = time.perf_counter()  # when `latest` was last written

    def _resume(self, ckpt: Checkpoint, changed: dict) -> None:
        """Continue from `ckpt`: Adam, the task stream, the best so far (chosen afresh if validation changed)."""
        self.adam.load_state_arrays(ckpt.optimizer)
        self.sampler.load_state_dict(ckpt.state["sampler"])
        self.seconds = ckpt.state.get("seconds", 0.0)
        self.iteration = ckpt.iteration
        rechoose = any(k in changed for k in VALIDATION)
        if not rechoose:  # else best.npz keeps the old best until a validation under the new settings replaces it
            self.best_val_accuracy = ckpt.state.get("best_val_accuracy")
            self.best_iteration = ckpt.state.get("best_iteration")
        self.validate_first = rechoose
        if self.ranks.main:
            dropped = self.files.truncate(self.iteration)  # rows of iterations after the checkpoint: redone now
            self.files.log({"event": "resume", "iteration": self.iteration, "ranks": self.ranks.world,
                            "meta_lr": self.config.meta_lr, "data": self.data,
                            **({"dropped_rows": dropped} if dropped else {}),
                            "changed": {k: [v, getattr(self.config, k)] for k, v in changed.items()},  # [before, now]
                            **({"best": "chosen afresh: validation changed"} if rechoose else {})})

    def val_sampler(self) -> TaskSampler:
        """The validation tasks: a fresh sampler each time, so every validation sees the same tasks."""
        c = self.config
        return self.dataset.sampler("val", c.deployed_ways, c.shots, c.query if c.val_query is None else c.val_query,
                                    VAL_SEED)

    def meta_gradient(self) -> tuple[dict, float, float]:
        """The next meta-batch's meta-gradient (name -> tensor), query loss and accuracy: means over all its
        tasks, the same on every rank (each rank draws the whole meta-batch, adapts its block, and the blocks'
        means are summed over ranks)."""
        c, ranks = self.config, self.ranks
        block = ranks.block(c.meta_batch)
        tasks = self.sampler.sample(c.meta_batch)
        if c.augment_shift:  # drawn from the task stream's generator, so that --resume continues it exactly
            tasks = shift_tasks(tasks, c.augment_shift, self.sampler.rng)
        step = self.maml.meta_step(*as_tensors(a[block] for a in tasks))
        metrics = ranks.mean_of_blocks({"loss": paddle.to_tensor([step.loss]),
                                        "accuracy": paddle.to_tensor([step.accuracy])}, c.meta_batch)
        return (ranks.mean_of_blocks(step.grads, c.meta_batch), float(metrics["loss"][0]),
                float(metrics["accuracy"][0]))

    def step(self) -> tuple[float, float]:
        """One meta-iteration: the meta-gradient (`meta_gradient`), then Adam; returns the meta-batch's query
        loss and accuracy."""
        c = self.config
        began = time.perf_counter()
        grads, loss, accuracy = self.meta_gradient()
        self.adam.step(grads)
        if c.zero_head:
            zero_head(self.model, self.params)
        self.iteration += 1
        self.seconds += time.perf_counter() - began
        if self.ranks.main:
            self.files.log({"iteration": self.iteration, "loss": round(loss, 5), "accuracy": round(accuracy, 4),
                            "seconds": round(self.seconds, 2)})
        return loss, accuracy

    def validate(self) -> tuple[float, float]:
        """Accuracy ± 95 % interval on the validation tasks, adapted as deployed (--val-* options), logged."""
        c = self.config
        inner_lr, steps = c.deployed_inner_lr, c.deployed_steps
        if c.learn_inner_lr:
            inner_lr = None  # the learned step sizes, as exported
        sampler = self.val_sampler()
        deployed = MAML(self.model, self.params, inner_lr, steps, stop_at_fixed_point=True)  # as exported
        if c.deployed_ways != c.ways or c.deployed_head_init != c.head_init:
            # --val-ways, --val-head-init: the current backbone with a zero or prototype head, as `train bundle` ships it
            shipped = as_deployed(Checkpoint(c, self._weights()))
            deployed = _deployed_maml(shipped, steps)
        accuracy, ci = mean_ci95(evaluate(deployed, sampler, c.val_tasks, batch=c.meta_batch, ranks=self.ranks,
                                          steps=steps, inner_lr=inner_lr))
        if self.ranks.main:
            self.files.log({"event": "validation", "iteration": self.iteration, "val_accuracy": accuracy,
                            "val_ci95": ci, "tasks": c.val_tasks, "inner_lr": deployed.step_size_summary, "steps": steps,
                            "ways": sampler.ways, "query": sampler.query, "seconds": round(self.seconds, 2)})
        return accuracy, ci

    def save(self, path: Path, sampler_state: dict) -> None:
        """A checkpoint of the weights, Adam and the run's state after `self.iteration`; `sampler_state` is the
        task stream's resume point (main rank only)."""
        if not self.ranks.main:
            return
        state = {"best_val_accuracy": self.best_val_accuracy, "best_iteration": self.best_iteration,
                 "seconds": self.seconds, "data": self.data, "sampler": sampler_state}
        save_checkpoint(path, Checkpoint(self.config, self._weights(), self.iteration, self.adam.state_arrays(), state))
        if path == self.files.latest:
            self.saved_at = time.perf_counter()

    def keep(self) -> str:
        """Validate; save `best` if it is, and `latest`. Returns the line to show."""
        accuracy, ci = self.validate()
        sampler_state = self.sampler.state_dict()
        if self.best_val_accuracy is None or accuracy > self.best_val_accuracy:
            self.best_val_accuracy, self.best_iteration = accuracy, self.iteration
            self.save(self.files.best, sampler_state)
        self.save(self.files.latest, sampler_state)
        return (f"iteration {self.iteration}: validation accuracy {100 * accuracy:.2f} ± {100 * ci:.2f} % "
                f"(best {100 * self.best_val_accuracy:.2f} % at {self.best_iteration})")

    def _weights(self) -> dict:
        return {k: v.numpy() for k, v in self.params.items()}


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM raises `Terminated` (so `latest` is saved, as on Ctrl-C) inside the block; the previous handler
    is restored after. Signal handlers can only be set on the main thread: elsewhere, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def train(config: MamlConfig | None, data: str | os.PathLike | None, out: str | os.PathLike, resume: bool = False,
          overrides: dict | None = None, threads: int | None = None, progress: bool = True,
          save_every_seconds: float | None = 60.0) -> dict:
    """Meta-train (or resume) a run; returns a summary: `train_seconds`, the meta-iterations' compute time
    over the whole run (the `seconds` of metrics.jsonl), and `wall_seconds`, this call's. `latest` is saved
    at each validation, after the first iteration that ends `save_every_seconds` after the last save (0:
    every iteration; None: only at validations), and on Ctrl-C or SIGTERM. The data folder is recorded in
    the checkpoints: a resume without `data` reads the run's own. With `--minutes`, no iteration starts after
    the budget (counted from this call's start) is spent: the last one is validated and kept, as at
    `--iterations`. With `--calibration-tasks`, the run ends with its calibrated bundle (`end_with_bundle`)."""
    wall = time.perf_counter()
    training = Training(config, data, out, resume, overrides, threads)
    c = training.config
    budget = None if c.minutes is None else 60 * c.minutes
    shown = progress and training.ranks.main
    if budget is None:
        bar = tqdm(total=c.iterations, initial=training.iteration, desc=c.name, unit="it", disable=not shown,
                   dynamic_ncols=True)
    else:  # the bar is the budget, and says the time left of it (not tqdm's estimate, which validations upset)
        bar = tqdm(total=round(budget), desc=c.name, unit="s", disable=not shown, dynamic_ncols=True,
                   bar_format="{desc}: {percentage:3.0f}%|{bar}|{postfix}")
    show = bar.write if shown else (lambda line: None)

    def tick(postfix: dict) -> bool:
        """Move the bar after an iteration; whether the budget allows another one."""
        if budget is None:
            bar.set_postfix(**postfix)
            bar.update(1)
            return True
        spent = time.perf_counter() - wall
        left = max(0, round(budget - spent))
        bar.set_postfix_str(f"{left // 60}:{left % 60:02d} left of {c.minutes:g} min, iteration {training.iteration}, "
                            + ", ".join(f"{k} {v}" for k, v in postfix.items()), refresh=False)
        bar.update(min(round(spent), bar.total) - bar.n)
        return spent < budget

    sampler_state = training.sampler.state_dict()  # the resume point of the weights at hand
    with _sigterm_raises():
        try:
            if training.validate_first:
                show(training.keep())
            more = budget is None or time.perf_counter() - wall < budget
            while more and training.iteration < c.iterations:
                sampler_state = training.sampler.state_dict()  # before this iteration's tasks: redone if it is cut short
                loss, accuracy = training.step()
                sampler_state = training.sampler.state_dict()  # the tasks after this iteration's: its resume point
                best = training.best_val_accuracy  # none before a first validation
                more = tick(dict(loss=f"{loss:.3f}", acc=f"{accuracy:.3f}", **({} if best is None else {"val": f"{best:.3f}"})))
                if training.iteration % c.val_every == 0 or training.iteration == c.iterations or not more:
                    show(training.keep())
                elif save_every_seconds is not None and time.perf_counter() - training.saved_at >= save_every_seconds:
                    training.save(training.files.latest, sampler_state)  # a hard kill loses at most this long
        except (KeyboardInterrupt, RankLostError, Terminated):
            training.save(training.files.latest, sampler_state)  # the interrupted iteration is redone on resume
            raise
        finally:
            bar.close()
    summary = {"iterations": training.iteration, "best_val_accuracy": training.best_val_accuracy,
               "best_iteration": training.best_iteration, "train_seconds": training.seconds,
               "wall_seconds": time.perf_counter() - wall, "out": str(training.files.out)}
    if c.calibration_tasks and training.ranks.main and training.files.best.exists():
        summary["bundle"] = str(end_with_bundle(training, progress))
        summary["wall_seconds"] = time.perf_counter() - wall
    return summary


BUNDLE = "bundle.npz"  # a run's calibrated bundle, which `maml-export --checkpoint RUN` exports (cli.checkpoint_argument)


def end_with_bundle(training: Training, progress: bool = True) -> Path:
    """RUN/bundle.npz: the run's best checkpoint as deployed (`checkpoint.bundle_run`), named as the run, with a
    temperature fitted on `--calibration-tasks` tasks of the validation classes (as many queries per class as
    they hold, up to 15: `split_sampler`); a fine-tune of a bundle deploys as that bundle did (its support shift and feature
    scale, `recipe.deployment`). One line says the temperature and the ECE it reached."""
    from .recipe import deployment
    c, out = training.config, training.files.out / BUNDLE
    deploy = deployment(c.init) if c.init else {}
    fit = lambda deployed: calibrate(deployed, training.data, c.calibration_tasks, None, progress)  # noqa: E731
    bundle = bundle_run(training.files.out, out, calibrate=fit, name=c.name, **deploy)
    report = bundle.state["calibration"]
    if progress:
        tqdm.write(f"wrote {out}: temperature {report['temperature']:.4g} fitted on {report['tasks']} validation "
                   f"tasks ({report['query']} queries a class), ECE {report['ece_before']:.3f} -> {report['ece_after']:.3f}")
    return out


def data_dir(data, recorded: str | None = None) -> str:
    """The data folder (Omniglot or image folders): `data` (--data) if given, else `recorded` (the one a resumed
    run was trained on) if it is still there, else $OMNIGLOT_DIR, else Omniglot's official zips in the cache
    (`download.default_dir()`), which are fetched first if they are not there yet, as torchvision and
    learn2learn fetch it on first use; offline, one DataError line says where to get the files."""
    from .download import default_dir, download_omniglot, downloaded
    if not data and recorded:
        if os.path.isdir(recorded) or not os.environ.get("OMNIGLOT_DIR"):
            return recorded  # gone and nothing else given: load_omniglot says it is missing, naming it
    data = data or os.environ.get("OMNIGLOT_DIR") or downloaded()
    if not data:
        tqdm.write(f"no --data or OMNIGLOT_DIR: fetching Omniglot's official zips into {default_dir()} (once)")
        try:
            data = str(download_omniglot())
        except DataError as e:
            raise DataError(f"no --data or OMNIGLOT_DIR, and Omniglot could not be fetched: {e}; "
                            "`maml-train download --base-url URL` fetches it from a mirror") from None
    return data


QUERIES = {"support": "per query (each query normalised with the support set's statistics: the same alone as in "
                      "any batch)",
           "transductive": "transductive (the queries of a task normalised together)"}


QUERY = 15  # query images per class of a test or calibration task: the protocol's


def split_sampler(data, split: str, ways: int, shots: int, query: int | None, seed: int,
                  config: MamlConfig | None = None, recorded: str | None = None) -> TaskSampler:
    """Tasks of `split` ("train", "val", "test") of the data in `data_dir(data, recorded)`: Omniglot's protocol
    split, or the image folders `config` (default: Omniglot's) was trained on, prepared as it says. `query`
    None: QUERY, or fewer where an image folder's classes hold fewer (every image of its smallest class but the
    shots), so that a folder of 12 images a class is measured on all its classes."""
    dataset, _ = open_dataset(data_dir(data, recorded), config or MamlConfig(), need=shots + (query or 1),
                              measure=True)
    if query is None:
        counts = getattr(dataset, "counts", {}).get(split)  # image folders only
        query = QUERY if counts is None or not len(counts) else int(min(QUERY, counts.min() - shots))
    return dataset.sampler(split, ways, shots, query, seed)


def _deployed_maml(ckpt: Checkpoint, steps: int | None = None) -> MAML:
    """The checkpoint as deployed in eager Paddle: adaptation stops at a fixed point, as the exported graphs'."""
    config = ckpt.config
    return MAML(Model.from_specs(config.layers), to_tensors(ckpt.params), config.inner_lr,
                config.inner_steps if steps is None else steps, stop_at_fixed_point=True)


def evaluate_checkpoint(checkpoint: str | os.PathLike, data, tasks: int = 600, split: str = "test",
                        steps: int | None = None, inner_lr: float | None = None, seed: int = TEST_SEED,
                        query: int | None = QUERY, threads: int | None = None, progress: bool = True,
                        head_init: str | None = None, query_norm: str | None = None,
                        ways: int | None = None, shots: int | None = None, support_shift: int | None = None,
                        feature_scale: float | None = None) -> dict:
    """Meta-test accuracy of a checkpoint by the shared protocol (15 queries per class), with its 95% interval,
    and how calibrated its probabilities are (ECE over 15 bins, NLL: `calibration.calibration_report`)."""
    set_threads(threads)
    # a run folder adapts as its validation did; the options, if given, as the config checks them
    ckpt = as_deployed(load_checkpoint(checkpoint), ways=ways, inner_lr=inner_lr, head_init=head_init,
                       query_norm=query_norm, support_shift=support_shift, feature_scale=feature_scale)
    config = ckpt.config
    shots = config.shots if shots is None else shots
    sampler = split_sampler(data, split, config.ways, shots, query, seed, config, ckpt.state.get("data"))
    maml = _deployed_maml(ckpt, steps)
    started = time.perf_counter()
    logits, labels = query_logits(maml, sampler, tasks, steps=steps, progress=progress)
    accuracy, ci = mean_ci95((logits.argmax(-1) == labels).mean(axis=1))
    calibration = calibration_report(logits, labels)  # the logits are already divided by the temperature
    return {"checkpoint": str(checkpoint), "config": config.name, "split": split, "tasks": tasks,
            "ways": config.ways, "shots": shots, "query": sampler.query, "steps": maml.steps,
            "inner_lr": maml.step_size_summary, "head_init": config.head_init, "query_norm": config.query_norm,
            "support_shift": config.support_shift,
            "queries": QUERIES[config.query_norm], "accuracy": accuracy, "ci95": ci,
            "temperature": config.temperature, "ece": calibration["ece"], "nll": calibration["nll"],
            "seconds": round(time.perf_counter() - started, 2)}




def calibrate(ckpt: Checkpoint, data, tasks: int = 200, query: int | None = QUERY,
              progress: bool = True) -> tuple[float, dict]:
    """The temperature that calibrates a deployed checkpoint's probabilities, fitted on `tasks` validation tasks
    of `query` queries per class (None: `split_sampler`'s) (`calibration.fit_temperature`); and a report: how it was fitted, ECE and NLL
    on those tasks before and after."""
    config = ckpt.config
    sampler = split_sampler(data, "val", config.ways, config.shots, query, CALIBRATION_SEED, config,
                            ckpt.state.get("data"))
    logits, labels = query_logits(_deployed_maml(ckpt), sampler, tasks, progress=progress)
    raw = logits * config.temperature  # undo a temperature the checkpoint may already have
    flat, flat_labels = raw.reshape(-1, config.ways), labels.reshape(-1)
    temperature = fit_temperature(flat, flat_labels)
    before, after = calibration_report(flat, flat_labels), calibration_report(flat, flat_labels, temperature)
    return temperature, {"temperature": temperature, "split": "val", "tasks": tasks, "query": sampler.query,
                         "seed": CALIBRATION_SEED, "query_norm": config.query_norm,
                         "ece_before": before["ece"], "ece_after": after["ece"], "nll_before": before["nll"],
                         "nll_after": after["nll"], "below_after": after["below"]}


def evaluate_export(export: str | os.PathLike, data, tasks: int = 600, split: str = "test", seed: int = TEST_SEED,
                    query: int | None = QUERY, threads: int | None = None, progress: bool = True,
                    shots: int | None = None) -> dict:
    """Accuracy and calibration of an exported model as a deployment runs it: onnxruntime's adapt.onnx once
    per task, then predict.onnx on ONE query image at a time (`adapter.Task`), on the protocol's tasks; and
    whether each query's class is the one it gets in its task's batch of queries."""
    from .adapter import Adapter
    adapter = Adapter(export, threads=threads)
    shots = int(adapter.metadata.get("shots_trained", 1)) if shots is None else shots
    config = MamlConfig.from_dict(json.loads(adapter.metadata["config"])) if "config" in adapter.metadata else None
    sampler = split_sampler(data, split, adapter.ways, shots, query, seed, config)
    alone, batched, labels = [], [], []
    for _, batch in _task_batches(sampler, tasks, 16, progress, desc="evaluate (one query at a time)"):
        for xs, ys, xq, yq in zip(*batch):
            task = adapter.adapt(xs, ys)
            alone.append(np.concatenate([task.predict(xq[i:i + 1]) for i in range(len(xq))]))
            batched.append(task.predict(xq))
            labels.append(yq)
    alone, batched, labels = np.stack(alone), np.stack(batched), np.stack(labels)
    accuracy, ci = mean_ci95((alone.argmax(-1) == labels).mean(axis=1))
    batch_accuracy, batch_ci = mean_ci95((batched.argmax(-1) == labels).mean(axis=1))
    calibration = calibration_report(alone, labels)
    return {"export": str(export), "config": adapter.config_name, "split": split, "tasks": tasks,
            "ways": adapter.ways, "shots": sampler.shots, "query": sampler.query, "steps": adapter.steps,
            "query_norm": adapter.query_norm, "queries": "each query alone, onnxruntime (predict.onnx)",
            "accuracy": accuracy, "ci95": ci, "batch_accuracy": batch_accuracy, "batch_ci95": batch_ci,
            "same_class_alone_and_in_batch": int((alone.argmax(-1) == batched.argmax(-1)).sum()),
            "answers": int(labels.size), "temperature": adapter.temperature, "ece": calibration["ece"],
            "nll": calibration["nll"]}


def evaluate_suite(checkpoint: str | os.PathLike, data, tasks: int = 200, split: str = "test",
                   shots: tuple = (1, 5), conditions: tuple | None = None, seed: int = TEST_SEED, query: int | None = QUERY,
                   threads: int | None = None, progress: bool = True, ways: int | None = None,
                   steps: int | None = None, inner_lr: float | None = None, support_shift: int | None = None,
                   feature_scale: float | None = None) -> dict:
    """The robustness suite (`suite.py`) on Omniglot's `split`: per condition and shots, the accuracy of each
    query alone (its support set's statistics) with 0 steps and with the deployed steps, paired on the same
    tasks, and the paired difference with its 95 % interval; and the mean over those cells. `conditions` None:
    all of `suite.CONDITIONS`. `query` None: the protocol's QUERY."""
    from .suite import CONDITIONS, SUITE_SEED, split_drawings, suite_images
    set_threads(threads)
    query = QUERY if query is None else query
    ckpt = as_deployed(load_checkpoint(checkpoint), ways=ways, inner_lr=inner_lr, support_shift=support_shift,
                       feature_scale=feature_scale)
    if trained_on_folders(ckpt.config):
        raise ConfigError(f"{checkpoint} was trained on image folders: the suite redraws Omniglot's drawings, "
                          f"for Omniglot models (measure yours with `evaluate --data FOLDER`)")
    maml = _deployed_maml(ckpt, steps)
    characters = split_drawings(data_dir(data), split)
    rows = []
    for condition in conditions or CONDITIONS:
        images = suite_images(characters, condition)
        for k in shots:
            sampler = lambda: TaskSampler(images, np.arange(len(images)), ckpt.config.ways, k, query, seed)  # noqa: E731
            hits = {}
            for n in sorted({0, maml.steps}):  # paired on the same tasks (fresh samplers of one seed)
                logits, labels = query_logits(maml, sampler(), tasks, steps=n, progress=progress)
                hits[n] = (logits.argmax(-1) == labels).mean(axis=1)
            accuracy, ci = mean_ci95(hits[maml.steps])
            zero, zero_ci = mean_ci95(hits[0])
            gain, gain_ci = mean_ci95(hits[maml.steps] - hits[0])
            rows.append({"condition": condition, "ways": ckpt.config.ways, "shots": k, "accuracy": accuracy,
                         "ci95": ci, "accuracy_0_steps": zero, "ci95_0_steps": zero_ci, "steps_gain": gain,
                         "steps_gain_ci95": gain_ci})
            if progress:
                tqdm.write(f"{condition:>9} {ckpt.config.ways}-way {k}-shot: {100 * zero:.2f} % with 0 steps, "
                           f"{100 * accuracy:.2f} % with {maml.steps} ({100 * gain:+.2f} ± {100 * gain_ci:.2f})")
    return {"checkpoint": str(checkpoint), "config": ckpt.config.name, "split": split, "tasks": tasks,
            "query": query, "seed": seed, "suite_seed": SUITE_SEED, "steps": maml.steps, "inner_lr": maml.step_size_summary,
            "support_shift": ckpt.config.support_shift, "queries": QUERIES[ckpt.config.query_norm], "rows": rows,
            # one figure to choose checkpoints by: the cells' mean, each cell weighing the same
            "mean_accuracy_0_steps": float(np.mean([r["accuracy_0_steps"] for r in rows])),
            "mean_accuracy": float(np.mean([r["accuracy"] for r in rows]))}
