"""Meta-training and evaluation: the loop behind `python -m train`.

A run folder holds `latest.npz`/`.json` (weights, Adam state, task-sampler state: `--resume` continues
exactly where it stopped), `best.npz`/`.json` (best validation accuracy) and `metrics.jsonl` (one JSON
object per line: training iterations, validations, resumes). Checkpoints are chosen on the validation
split; the test split is only used by `evaluate`.
"""
from __future__ import annotations

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
from .checkpoint import Checkpoint, as_deployed, load_checkpoint, save_checkpoint
from .config import RESUME_MAY_CHANGE, VALIDATION, MamlConfig, flag
from .data import TaskSampler
from .folders import open_dataset
from .distributed import RankLostError, Ranks
from .errors import ConfigError, DataError, MamlError
from .maml import MAML, zero_head
from .model import Model, to_tensors, with_query_norm
from .optim import Adam
from .outputs import check_writable_dir

VAL_SEED = 1_000_003  # the validation tasks are the same at every validation, and across runs
TEST_SEED = 2_000_003


def set_threads(threads: int | None) -> int:
    """Paddle's CPU kernels default to one thread; use every core unless told otherwise."""
    threads = threads or os.cpu_count() or 1
    paddle.base.core.set_num_threads(threads)
    return threads


def mean_ci95(values) -> tuple[float, float]:
    """Mean and the half-width of its 95% interval, 1.96 * std / sqrt(n), as the protocol reports."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(1.96 * values.std() / np.sqrt(len(values)))


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


class Run:
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


def _start(config: MamlConfig, run: Run, resume: bool, overrides: dict):
    """(config, checkpoint or None, {option: value before} of the overrides applied): a new run, or the run
    in `run.out` with allowed overrides applied."""
    if not resume:
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
    """A new run's weights and where they came from: `--init`'s checkpoint's (same architecture required;
    with `--zero-head` only the same backbone: its head is zeroed anyway), else random from `--seed`."""
    if config.init is None:
        return model.init_params(config.seed), {"seed": config.seed}
    source = load_checkpoint(config.init)
    origin = {"init": str(config.init), "init_run": source.config.name, "init_iteration": source.iteration}
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


def train(config: MamlConfig, data: str | os.PathLike | None, out: str | os.PathLike, resume: bool = False,
          overrides: dict | None = None, threads: int | None = None, progress: bool = True,
          save_every_seconds: float | None = 60.0) -> dict:
    """Meta-train (or resume) a run; returns a summary: `train_seconds`, the meta-iterations' compute time
    over the whole run (the `seconds` of metrics.jsonl), and `wall_seconds`, this call's. `latest` is saved
    at each validation, after the first iteration that ends `save_every_seconds` after the last save (0:
    every iteration; None: only at validations), and on Ctrl-C or SIGTERM. The data folder is recorded in
    the checkpoints: a resume without `data` reads the run's own."""
    wall = time.perf_counter()
    ranks = Ranks()
    set_threads(threads or max(1, (os.cpu_count() or 1) // ranks.world))
    run = Run(out)
    config, ckpt, changed = _start(config, run, resume, overrides or {})
    ranks.check_meta_batch(config.meta_batch)
    if ranks.main:
        check_writable_dir(run.out, "--out")
    data = os.path.abspath(data_dir(data, ckpt.state.get("data") if ckpt else None))
    # Omniglot or image folders; a new run's config gets the folders' defaults (pixels, split, and the sizes the
    # CLI user did not give) and its protocol
    dataset, config = open_dataset(data, config, new_run=not ckpt, given=None if overrides is None else overrides,
                                   need=config.shots + max(config.query, config.val_query or config.query))
    sampler = dataset.sampler("train", config.ways, config.shots, config.query, config.seed)

    val_ways = config.deployed_ways

    def val_sampler() -> TaskSampler:  # a fresh one each time: every validation sees the same tasks
        return dataset.sampler("val", val_ways, config.shots,
                               config.query if config.val_query is None else config.val_query, VAL_SEED)

    val_sampler()  # fail now, not at the first validation, if the validation split cannot give such tasks
    model = Model.from_specs(config.layers)
    initial, origin = (ckpt.params, None) if ckpt else initial_params(model, config)
    params = to_tensors(initial)
    maml = MAML(model, params, config.inner_lr, config.inner_steps, config.first_order)
    adam = Adam(params, config.meta_lr)
    if config.head_is_zero:
        zero_head(model, params)
    state = {"best_val_accuracy": None, "best_iteration": None, "seconds": 0.0, "data": data}
    start, rechoose = 0, False
    if ckpt:
        adam.load_state_arrays(ckpt.optimizer)
        sampler.load_state_dict(ckpt.state["sampler"])
        state.update({k: ckpt.state[k] for k in state if k in ckpt.state and k != "data"})
        start = ckpt.iteration
        rechoose = any(k in changed for k in VALIDATION)
        if rechoose:  # best.npz keeps the old best until a validation under the new settings replaces it
            state.update(best_val_accuracy=None, best_iteration=None)
        if ranks.main:
            dropped = run.truncate(start)  # rows of iterations after the checkpoint: redone now
            run.log({"event": "resume", "iteration": start, "ranks": ranks.world, "meta_lr": config.meta_lr,
                     "data": data, **({"dropped_rows": dropped} if dropped else {}),
                     "changed": {k: [v, getattr(config, k)] for k, v in changed.items()},  # option: [before, now]
                     **({"best": "chosen afresh: validation changed"} if rechoose else {})})
    run.out.mkdir(parents=True, exist_ok=True)
    if not ckpt and ranks.main:  # the config the run starts with, so a bundle can say how it was trained
        run.log({"event": "start", "iteration": 0, "ranks": ranks.world, "config": config.to_dict(), "weights": origin,
                 "data": data})

    def checkpoint(path: Path, iteration: int, sampler_state: dict):
        if not ranks.main:
            return
        save_checkpoint(path, Checkpoint(config, {k: v.numpy() for k, v in params.items()}, iteration,
                                         adam.state_arrays(), {**state, "sampler": sampler_state}))

    def validate(iteration: int) -> tuple[float, float]:
        inner_lr, steps = config.deployed_inner_lr, config.deployed_steps
        sampler, deployed = val_sampler(), maml
        if val_ways != config.ways or config.deployed_head_init != config.head_init:
            # --val-ways, --val-head-init: the current backbone with a zero or prototype head, as `train bundle` ships it
            shipped = as_deployed(Checkpoint(config, {k: v.numpy() for k, v in params.items()}))
            deployed = MAML(Model.from_specs(shipped.config.layers), to_tensors(shipped.params), inner_lr, steps)
        accuracy, ci = mean_ci95(evaluate(deployed, sampler, config.val_tasks, batch=config.meta_batch, ranks=ranks,
                                          steps=steps, inner_lr=inner_lr))
        if ranks.main:
            run.log({"event": "validation", "iteration": iteration, "val_accuracy": accuracy, "val_ci95": ci,
                     "tasks": config.val_tasks, "inner_lr": inner_lr, "steps": steps, "ways": sampler.ways,
                     "query": sampler.query, "seconds": round(state["seconds"], 2)})
        return accuracy, ci

    def validate_and_keep(iteration: int) -> dict:
        """Validate; save `best` if it is, and `latest`; returns the sampler state they were saved with."""
        accuracy, ci = validate(iteration)
        sampler_state = sampler.state_dict()
        if state["best_val_accuracy"] is None or accuracy > state["best_val_accuracy"]:
            state.update(best_val_accuracy=accuracy, best_iteration=iteration)
            checkpoint(run.best, iteration, sampler_state)
        checkpoint(run.latest, iteration, sampler_state)
        saved[0] = time.perf_counter()
        if ranks.main and progress:
            bar.write(f"iteration {iteration}: validation accuracy {100 * accuracy:.2f} ± {100 * ci:.2f} % "
                      f"(best {100 * state['best_val_accuracy']:.2f} % at {state['best_iteration']})")
        return sampler_state

    iteration = start
    on_main_thread = threading.current_thread() is threading.main_thread()
    if on_main_thread:  # save `latest` before stopping, as on Ctrl-C; restored when training returns
        previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated)
    bar = tqdm(total=config.iterations, initial=start, desc=config.name, unit="it",
               disable=not (progress and ranks.main), dynamic_ncols=True)
    sampler_state = sampler.state_dict()
    saved = [time.perf_counter()]  # when `latest` was last written
    try:
        # the weights a run starts from compete first when they are not this run's own: after a change of
        # validation on resume, or --init's (a fine-tune's baseline, on the same tasks; best never below it)
        if rechoose or (not ckpt and config.init is not None):
            validate_and_keep(iteration)
        while iteration < config.iterations:
            sampler_state = sampler.state_dict()  # the state *before* this iteration's tasks: resume point
            began = time.perf_counter()
            block = ranks.block(config.meta_batch)  # every rank draws the meta-batch, keeps its block
            step = maml.meta_step(*as_tensors(a[block] for a in sampler.sample(config.meta_batch)))
            grads = ranks.mean_of_blocks(step.grads, config.meta_batch)
            adam.step(grads)
            if config.zero_head:
                zero_head(model, params)
            iteration += 1
            sampler_state = sampler.state_dict()  # the tasks after `iteration`'s: its resume point
            state["seconds"] += time.perf_counter() - began
            metrics = ranks.mean_of_blocks({"loss": paddle.to_tensor([step.loss]),
                                            "accuracy": paddle.to_tensor([step.accuracy])}, config.meta_batch)
            loss, accuracy = float(metrics["loss"][0]), float(metrics["accuracy"][0])
            if ranks.main:
                run.log({"iteration": iteration, "loss": round(loss, 5), "accuracy": round(accuracy, 4),
                         "seconds": round(state["seconds"], 2)})
            best = state["best_val_accuracy"]  # none before a first validation
            bar.set_postfix(loss=f"{loss:.3f}", acc=f"{accuracy:.3f}", **({} if best is None else {"val": f"{best:.3f}"}))
            bar.update(1)
            if iteration % config.val_every == 0 or iteration == config.iterations:
                sampler_state = validate_and_keep(iteration)
            elif save_every_seconds is not None and time.perf_counter() - saved[0] >= save_every_seconds:
                checkpoint(run.latest, iteration, sampler_state)  # a hard kill loses at most this long
                saved[0] = time.perf_counter()
    except (KeyboardInterrupt, RankLostError, Terminated):
        # the interrupted iteration is redone on resume: save the weights and sampler state before it
        checkpoint(run.latest, iteration, sampler_state)
        raise
    finally:
        bar.close()
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous_sigterm)
    return {"iterations": iteration, "best_val_accuracy": state["best_val_accuracy"],
            "best_iteration": state["best_iteration"], "train_seconds": state["seconds"],
            "wall_seconds": time.perf_counter() - wall, "out": str(run.out)}


def data_dir(data, recorded: str | None = None) -> str:
    """The data folder (Omniglot or image folders): `data` (--data) if given, else `recorded` (the one a resumed
    run was trained on) if it is still there, else $OMNIGLOT_DIR, else the copy `maml-train download` fetched."""
    from .download import downloaded
    if not data and recorded:
        if os.path.isdir(recorded) or not os.environ.get("OMNIGLOT_DIR"):
            return recorded  # gone and nothing else given: load_omniglot says it is missing, naming it
    data = data or os.environ.get("OMNIGLOT_DIR") or downloaded()
    if not data:
        raise DataError("no data: pass --data DIR (Omniglot, or a folder of your own images), set OMNIGLOT_DIR, or "
                        "download Omniglot with `maml-train download` (the official images_background.zip and "
                        "images_evaluation.zip are published at "
                        "https://github.com/brendenlake/omniglot/tree/master/python)")
    return data


QUERIES = {"support": "per query (each query normalised with the support set's statistics: the same alone as in "
                      "any batch)",
           "transductive": "transductive (the queries of a task normalised together)"}


def split_sampler(data, split: str, ways: int, shots: int, query: int, seed: int, config: MamlConfig | None = None,
                  recorded: str | None = None) -> TaskSampler:
    """Tasks of `split` ("train", "val", "test") of the data in `data_dir(data, recorded)`: Omniglot's protocol
    split, or the image folders `config` (default: Omniglot's) was trained on, prepared as it says."""
    dataset, _ = open_dataset(data_dir(data, recorded), config or MamlConfig(), need=shots + query)
    return dataset.sampler(split, ways, shots, query, seed)


def _deployed_maml(ckpt: Checkpoint, steps: int | None = None) -> MAML:
    config = ckpt.config
    return MAML(Model.from_specs(config.layers), to_tensors(ckpt.params), config.inner_lr,
                config.inner_steps if steps is None else steps)


def evaluate_checkpoint(checkpoint: str | os.PathLike, data, tasks: int = 600, split: str = "test",
                        steps: int | None = None, inner_lr: float | None = None, seed: int = TEST_SEED,
                        query: int = 15, threads: int | None = None, progress: bool = True,
                        head_init: str | None = None, query_norm: str | None = None,
                        ways: int | None = None, shots: int | None = None) -> dict:
    """Meta-test accuracy of a checkpoint by the shared protocol (15 queries per class), with its 95% interval,
    and how calibrated its probabilities are (ECE over 15 bins, NLL: `calibration.calibration_report`)."""
    set_threads(threads)
    # a run folder adapts as its validation did; the options, if given, as the config checks them
    ckpt = as_deployed(load_checkpoint(checkpoint), ways=ways, inner_lr=inner_lr, head_init=head_init,
                       query_norm=query_norm)
    config = ckpt.config
    shots = config.shots if shots is None else shots
    sampler = split_sampler(data, split, config.ways, shots, query, seed, config, ckpt.state.get("data"))
    maml = _deployed_maml(ckpt, steps)
    started = time.perf_counter()
    logits, labels = query_logits(maml, sampler, tasks, steps=steps, progress=progress)
    accuracy, ci = mean_ci95((logits.argmax(-1) == labels).mean(axis=1))
    calibration = calibration_report(logits, labels)  # the logits are already divided by the temperature
    return {"checkpoint": str(checkpoint), "config": config.name, "split": split, "tasks": tasks,
            "ways": config.ways, "shots": shots, "query": query, "steps": maml.steps,
            "inner_lr": maml.inner_lr, "head_init": config.head_init, "query_norm": config.query_norm,
            "queries": QUERIES[config.query_norm], "accuracy": accuracy, "ci95": ci,
            "temperature": config.temperature, "ece": calibration["ece"], "nll": calibration["nll"],
            "seconds": round(time.perf_counter() - started, 2)}


CALIBRATION_SEED = 3_000_003  # validation tasks for the temperature: others than the ones that chose the checkpoint


def calibrate(ckpt: Checkpoint, data, tasks: int = 200, query: int = 15, progress: bool = True) -> tuple[float, dict]:
    """The temperature that calibrates a deployed checkpoint's probabilities, fitted on `tasks` validation tasks
    of `query` queries per class (`calibration.fit_temperature`); and a report: how it was fitted, ECE and NLL
    on those tasks before and after."""
    config = ckpt.config
    sampler = split_sampler(data, "val", config.ways, config.shots, query, CALIBRATION_SEED, config,
                            ckpt.state.get("data"))
    logits, labels = query_logits(_deployed_maml(ckpt), sampler, tasks, progress=progress)
    raw = logits * config.temperature  # undo a temperature the checkpoint may already have
    flat, flat_labels = raw.reshape(-1, config.ways), labels.reshape(-1)
    temperature = fit_temperature(flat, flat_labels)
    before, after = calibration_report(flat, flat_labels), calibration_report(flat, flat_labels, temperature)
    return temperature, {"temperature": temperature, "split": "val", "tasks": tasks, "query": query,
                         "seed": CALIBRATION_SEED, "query_norm": config.query_norm,
                         "ece_before": before["ece"], "ece_after": after["ece"], "nll_before": before["nll"],
                         "nll_after": after["nll"], "below_after": after["below"]}


def evaluate_export(export: str | os.PathLike, data, tasks: int = 600, split: str = "test", seed: int = TEST_SEED,
                    query: int = 15, threads: int | None = None, progress: bool = True, shots: int | None = None) -> dict:
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
            "ways": adapter.ways, "shots": sampler.shots, "query": query, "steps": adapter.steps,
            "query_norm": adapter.query_norm, "queries": "each query alone, onnxruntime (predict.onnx)",
            "accuracy": accuracy, "ci95": ci, "batch_accuracy": batch_accuracy, "batch_ci95": batch_ci,
            "same_class_alone_and_in_batch": int((alone.argmax(-1) == batched.argmax(-1)).sum()),
            "answers": int(labels.size), "temperature": adapter.temperature, "ece": calibration["ece"],
            "nll": calibration["nll"]}
