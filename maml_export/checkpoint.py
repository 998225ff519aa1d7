"""Pickle-free checkpoints: weights, optimizer and sampler state, and the config that rebuilds the model.

A checkpoint is one `.npz` (loadable with `allow_pickle=False`) holding
    param/<name>      the meta-parameters, float32
    opt/<key>         optimizer arrays (Adam moments), only in training checkpoints
    meta              a JSON string: {"config": MamlConfig, "iteration": int, "state": {...}}
and a `.json` beside it with the same metadata for people and tools. Both are written atomically (a
temporary file, then a rename), so a run killed mid-write never leaves a broken checkpoint.

Example:
    >>> ckpt = load_checkpoint(default_checkpoint())
    >>> ckpt.config.ways, sorted(ckpt.params)[0]
    (5, 'bn1.bias')
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import MamlConfig, flag
from .errors import CheckpointError, MamlError, reason
from .model import Model
from .specs import with_head, with_query_norm

PRETRAINED_DIR = Path(__file__).parent / "pretrained"


def default_checkpoint() -> Path:
    """The bundled pretrained 5-way 1-shot Omniglot weights (see docs/pretrained.md)."""
    return PRETRAINED_DIR / "omniglot-5w1s.npz"


def bundled_names() -> list[str]:
    """Names of the bundled checkpoints (`omniglot-5w1s`, `omniglot-20w1s`): usable wherever a path is."""
    return sorted(p.stem for p in PRETRAINED_DIR.glob("*.npz"))


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The .npz a checkpoint argument means: a file as it is, a run folder's `latest.npz`, or a bundled
    checkpoint by name (so an installed package needs no path into site-packages)."""
    path = Path(path)
    if path.is_dir():
        return path / "latest.npz"
    if not path.exists() and str(path) in bundled_names():
        return PRETRAINED_DIR / f"{path}.npz"
    return path


@dataclass
class Checkpoint:
    config: MamlConfig
    params: dict  # name -> float32 ndarray, no task axis
    iteration: int = 0
    optimizer: dict = field(default_factory=dict)  # key -> ndarray
    state: dict = field(default_factory=dict)  # JSON-able: sampler state, best validation, ...

    def metadata(self) -> dict:
        return {"format": "maml-export-checkpoint-v1", "config": self.config.to_dict(),
                "iteration": self.iteration, "state": self.state}


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; a checkpoint is an ordinary file
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(path: str | os.PathLike, ckpt: Checkpoint) -> Path:
    """Write `path` (.npz) and its .json beside it, each atomically."""
    path = Path(path)
    meta = json.dumps(ckpt.metadata(), indent=1)
    arrays = {f"param/{k}": np.asarray(v, dtype=np.float32) for k, v in ckpt.params.items()}
    arrays.update({f"opt/{k}": np.asarray(v) for k, v in ckpt.optimizer.items()})
    arrays["meta"] = np.array(meta)
    _atomic_write(path, lambda f: np.savez(f, **arrays))
    _atomic_write(path.with_suffix(".json"), lambda f: f.write(meta.encode()))
    return path


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and validate a checkpoint; every problem is one `CheckpointError` line naming the file."""
    path = resolve_checkpoint(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (pass a .npz written by `python -m train`, a run "
                              f"folder, or a bundled name: {', '.join(bundled_names())})")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        meta = json.loads(str(arrays.pop("meta")))
        config = MamlConfig.from_dict(meta["config"])
        params = {k[len("param/"):]: v for k, v in arrays.items() if k.startswith("param/")}
        optimizer = {k[len("opt/"):]: v for k, v in arrays.items() if k.startswith("opt/")}
        ckpt = Checkpoint(config, params, int(meta.get("iteration", 0)), optimizer, meta.get("state", {}))
    except MamlError as e:
        raise CheckpointError(f"checkpoint {path} has an invalid config: {e}") from None
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a maml-export checkpoint "
                              f"({reason(e)})") from None
    check_params(Model.from_specs(config.layers), params, str(path), config)
    return ckpt


def weights_sha256(params: dict) -> str:
    """sha256 over, for each parameter in name order: name, NUL, shape as JSON, NUL, float32 LE bytes.

    What names a model's weights wherever they travel: the exports' metadata, a task file's header, and a
    run's `--init` (its start event and its bundle's `state["weights"]`)."""
    h = hashlib.sha256()
    for name in sorted(params):
        a = np.ascontiguousarray(params[name], dtype="<f4")
        h.update(name.encode() + b"\0" + json.dumps(list(a.shape)).encode() + b"\0" + a.tobytes())
    return h.hexdigest()


def check_params(model: Model, params: dict, where: str, config: MamlConfig | None = None) -> None:
    """Raise CheckpointError unless `params` has exactly the model's names and shapes (and, where `config`
    learns its step sizes, theirs: `maml.step_size_shapes`)."""
    from .maml import step_size_shapes
    expected = model.param_shapes()
    if config is not None and config.learn_inner_lr:
        expected.update(step_size_shapes(model, config.inner_steps))
    missing = [k for k in expected if k not in params]
    extra = [k for k in params if k not in expected]
    wrong = [f"{k} {tuple(params[k].shape)} != {v}" for k, v in expected.items()
             if k in params and tuple(params[k].shape) != tuple(v)]
    if missing or extra or wrong:
        details = "; ".join(filter(None, [missing and f"missing {missing}", extra and f"unexpected {extra}",
                                          wrong and f"shapes {wrong}"]))
        raise CheckpointError(f"checkpoint {where} does not match its model: {details}")
    for k, v in params.items():
        if not np.all(np.isfinite(v)):
            raise CheckpointError(f"checkpoint {where} holds non-finite values in {k}")


def as_deployed(ckpt: Checkpoint, ways: int | None = None, inner_lr: float | None = None,
                head_init: str | None = None, query_norm: str | None = None,
                temperature: float | None = None, support_shift: int | None = None,
                feature_scale: float | None = None) -> Checkpoint:
    """The checkpoint as validation adapted it, i.e. as it is deployed: its config's `deployed_ways`,
    `deployed_inner_lr`, `deployed_steps` and `deployed_head_init` become its `ways`, `inner_lr`, `inner_steps`
    and `head_init` (the `val_*`
    options cleared), and a backbone validated on other ways than it trained on (`--val-ways`, with
    `--zero-head`) gets a zero head of those ways. `ways` or `inner_lr`, if given, override the deployed
    ones; `head_init`, if given, makes adaptation start the head that way (`--head-init`; "meta" needs a
    `--zero-head` checkpoint, whose zero head is the meta-learned one); `query_norm`, if given, normalises the
    queries that way ("support" or "transductive", `--query-norm`); `temperature`, if given, is what its
    deployed logits are divided by (`calibration.py`); `support_shift`, if given, is how many pixels adaptation also
    shifts each support image by (`--support-shift`, `maml.shifted_support`); `feature_scale`, if given, multiplies
    the features by it (`scale_features`: the prototype logits by its square). A bundle is already deployed: it comes
    back unchanged. `train evaluate` and `maml-export`
    load every checkpoint through this, so a run folder trained with `--val-inner-lr 0.1` exports at 0.1,
    not at its training step size (docs/experiments.md#validating-at-the-deployed-step-size).

    Example:
        >>> config = MamlConfig(ways=20, zero_head=True, val_ways=5, val_inner_lr=0.1)  # train 20, ship 5 ways
        >>> deployed = as_deployed(Checkpoint(config, Model.from_specs(config.layers).init_params(0)))
        >>> deployed.config.ways, deployed.config.inner_lr, deployed.params["fc1.weight"].shape
        (5, 0.1, (64, 5))
    """
    c = ckpt.config
    if inner_lr is not None and c.learn_inner_lr:
        raise CheckpointError(f"{c.name} learned its step sizes (--learn-inner-lr): leave out --inner-lr")
    ways = c.deployed_ways if ways is None else ways
    config = dataclasses.replace(c, inner_lr=c.deployed_inner_lr if inner_lr is None else inner_lr,
                                 inner_steps=c.deployed_steps, val_ways=None, val_inner_lr=None, val_steps=None,
                                 val_head_init=None)
    head_init = c.deployed_head_init if head_init is None else head_init
    params = ckpt.params
    if ways != c.ways:  # deployed for other ways: the backbone with a zero head of that size
        if not c.zero_head:
            raise CheckpointError(f"{c.name} was trained without --zero-head: its head is meta-learned for "
                                  f"{c.ways} ways and cannot be deployed for {ways} (leave out --ways)")
        config = dataclasses.replace(config, ways=ways, layers=with_head(c.layers, ways))
        params = Model.from_specs(config.layers).with_zero_head(params)
    if head_init not in (None, c.head_init):  # the head's meta-parameters: unused by "prototypes", zero for "meta"
        if head_init == "meta" and not c.zero_head:
            raise CheckpointError(f"{c.name} was trained with --head-init {c.head_init} without --zero-head: it has no "
                                  f"meta-learned head to deploy with --head-init meta")
        config = dataclasses.replace(config, head_init=head_init, layers=with_head(config.layers, init=head_init))
        params = Model.from_specs(config.layers).with_zero_head(params)
    if query_norm not in (None, config.query_norm):
        config = dataclasses.replace(config, query_norm=query_norm, layers=with_query_norm(config.layers, query_norm))
    if temperature is not None:
        config = dataclasses.replace(config, temperature=float(temperature),
                                     layers=with_head(config.layers, temperature=float(temperature)))
    if support_shift is not None:
        # not int(): the config refuses a fractional shift instead of truncating it
        config = dataclasses.replace(config, support_shift=support_shift,
                                     layers=with_head(config.layers, support_shift=support_shift))
    if feature_scale not in (None, 1):
        params = scale_features(config, params, feature_scale)
    return dataclasses.replace(ckpt, config=config, params=params)


def scale_features(config: MamlConfig, params: dict, scale: float) -> dict:
    """`params` with the last batch norm's weight and bias multiplied by `scale` > 0: since only max-pooling, ReLU
    and flattening follow it, every feature is multiplied by `scale` and every prototype logit by its square
    (bit for bit for a power of two). Classes do not change; the support loss saturates sooner, so adaptation
    reaches its fixed point (docs/design.md#the-feature-scale), and the temperature fitted afterwards divides
    the square back out of the probabilities."""
    if not (isinstance(scale, (int, float)) and 0 < scale < float("inf")):
        raise CheckpointError(f"the feature scale must be a positive number, got {scale!r} (--feature-scale)")
    layers = config.layers
    last = max(i for i, spec in enumerate(layers) if spec["type"] == "BatchNorm")
    if any(spec["type"] not in ("MaxPool2", "ReLU", "Flatten") for spec in layers[last + 1:-1]):
        raise CheckpointError(f"{config.name}: layers other than max-pooling, ReLU and flattening follow the last "
                              f"batch norm, so scaling it would not scale the features (leave out --feature-scale)")
    name = Model.from_specs(layers).names[last]
    scaled = dict(params)
    for k in (f"{name}.weight", f"{name}.bias"):
        scaled[k] = (params[k] * scale).astype(params[k].dtype)
    return scaled


def bundle_run(run: str | os.PathLike, out: str | os.PathLike, inner_lr: float | None = None,
               note: str | None = None, ways: int | None = None, head_init: str | None = None,
               calibrate=None, support_shift: int | None = None, feature_scale: float | None = None,
               name: str | None = None, checkpoint: str | os.PathLike | None = None) -> Checkpoint:
    """Package a run's best checkpoint (chosen on validation) for shipping: `out` (.npz + .json) with the
    weights and config but no optimizer or sampler state, the command that reproduces the run (resumes
    and their changed options included) and the run's metrics log up to that iteration (`out` with
    suffix .metrics.jsonl). The weights `maml-export` and `maml-bench` use by default are such a bundle.

    What ships is `as_deployed(best)`: the checkpoint as validation adapted it (its `--val-ways`,
    `--val-inner-lr`, `--val-steps`; e.g. trained 20-way with 1 step, shipped 5-way with 5), with the trained
    values in `state` (`ways_trained`, `inner_lr_trained`, `inner_steps_trained`) and in the command.
    `inner_lr`, if given, replaces the step size (`maml-export`'s default), for one chosen on the validation
    split; `ways`, if given, ships a `--zero-head` run for that many ways instead (e.g. a run trained on
    20-way tasks and chosen on 5-way ones, shipped for 20 ways too); `head_init`, if given, ships it with that
    head initialisation (e.g. "prototypes", chosen on the validation split); `support_shift`, if given, ships it
    with that support augmentation (`as_deployed`, chosen on the validation split); `feature_scale`, if given,
    ships its features multiplied by it (`scale_features`) and records it in `state["feature_scale"]`; `note` (e.g. the validation figures
    behind the choice) goes to `state["note"]`. `calibrate`, if given, is called with the deployed checkpoint
    and returns (temperature, report): the bundle ships with that temperature (`trainer.calibrate`), the
    report in `state["calibration"]`. The bundle's config is named `name`, else after its file (`out`'s stem, e.g.
    omniglot-5w1s: what `--checkpoint` takes, what exports, `maml-web` and errors call it); the run's name goes to
    `state["run"]`. A run on an image folder keeps its folder in `state["data"]`, where `evaluate` finds it.
    `checkpoint`, if given, ships that checkpoint of the run (e.g. a copy of its latest.npz chosen on the
    robustness suite) instead of its best.npz; it must be the run's own (the same run name), and the log and
    command ship up to its iteration. Where the run's weights began (its start event's `weights`: the seed, or
    `--init`'s path, run, iteration and `weights_sha256`) goes to `state["weights"]`, so that an init whose
    file a later ship replaced is still named exactly.
    """
    import shlex
    run, out = Path(run), Path(out)
    if checkpoint is None:
        best = load_checkpoint(run / "best.npz")
    else:  # the run's name from any of its checkpoints: a run resumed from a copy may have no best.npz
        chosen = load_checkpoint(checkpoint)
        own = run / "best.npz" if (run / "best.npz").exists() else run / "latest.npz"
        run_name = load_checkpoint(own).config.name
        if chosen.config.name != run_name:
            raise CheckpointError(f"--checkpoint {checkpoint} is a checkpoint of run {chosen.config.name!r}, not of "
                                  f"{run} ({run_name!r})")
        best = dataclasses.replace(chosen, state={k: v for k, v in chosen.state.items()
                                                  if k not in ("best_val_accuracy", "best_iteration")})
    log = run / "metrics.jsonl"
    try:
        events = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        raise CheckpointError(f"run {run}: cannot read {log.name} ({type(e).__name__}: {e})") from None
    kept = [e for e in events if e.get("iteration", 0) <= best.iteration
            and not (e.get("event") == "resume" and e["iteration"] == best.iteration)]
    start = next((e for e in kept if e.get("event") == "start"), None)
    if start:
        config = MamlConfig.from_dict(start["config"])
    else:  # a log from before start events: undo what later resumes changed, where they recorded it
        config = dataclasses.replace(best.config)
        for e in reversed([e for e in kept if e.get("event") == "resume"]):
            for k, (before, _) in e.get("changed", {}).items():
                setattr(config, k, before)
    steps = [shlex.join(["python", "-m", "train", *config.cli_args(), "--out", str(run)])]
    for e in (e for e in kept if e.get("event") == "resume"):  # how the run was continued
        changed = [f"{flag(k)} {now}" for k, (_, now) in e.get("changed", {}).items()]
        if "changed" not in e:  # older logs only recorded the meta-lr in effect after the resume
            changed = [f"(meta-lr {e.get('meta_lr', '?')})"]
        steps.append(f"at iteration {e['iteration']}: python -m train --out {run} --resume {' '.join(changed)}".rstrip()
                     + f" [{e.get('ranks', 1)} rank(s)]")
    command = "; ".join(steps)
    trained = best.config
    deployed = as_deployed(best, ways, inner_lr, head_init, support_shift=support_shift, feature_scale=feature_scale)
    calibration = None
    if calibrate is not None:
        temperature, calibration = calibrate(deployed)
        deployed = as_deployed(deployed, temperature=temperature)
    state = {k: best.state[k] for k in ("best_val_accuracy", "best_iteration", "seconds") if k in best.state}
    if checkpoint is not None:
        state["chosen"] = f"iteration {best.iteration} of the run, not its best on validation (--checkpoint)"
        validated = [e for e in kept if e.get("event") == "validation" and e["iteration"] == best.iteration]
        if validated:  # the run's own validation of this checkpoint, where it validated one
            state["val_accuracy"] = validated[-1]["val_accuracy"]
    if "data" in best.state and best.config.protocol != MamlConfig().protocol:  # image folders: the model's data
        state["data"] = best.state["data"]
    state["command"] = command
    if start and "weights" in start:  # where the run's weights began: a seed, or --init's file, run and sha256
        state["weights"] = start["weights"]
    for key, shipped, was in (("inner_lr_trained", deployed.config.inner_lr, trained.inner_lr),
                              ("inner_steps_trained", deployed.config.inner_steps, trained.inner_steps),
                              ("ways_trained", deployed.config.ways, trained.ways),
                              ("head_init_trained", deployed.config.head_init, trained.head_init)):
        if shipped != was:
            state[key] = was
    if feature_scale not in (None, 1):
        state["feature_scale"] = feature_scale
    if calibration:
        state["calibration"] = calibration
    if note:
        state["note"] = note
    state["run"] = trained.name  # the bundle names itself by its file (omniglot-5w1s): what the CLIs and the page show
    bundle = Checkpoint(dataclasses.replace(deployed.config, iterations=best.iteration, name=name or out.stem), deployed.params,
                        best.iteration, {}, state)
    save_checkpoint(out, bundle)
    _atomic_write(out.with_suffix(".metrics.jsonl"), lambda f: f.write("".join(json.dumps(e) + "\n" for e in kept).encode()))
    return bundle
