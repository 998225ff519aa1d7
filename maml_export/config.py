"""The typed configuration of a MAML run: the CLIs fill it, every checkpoint and export carries it.

One dataclass, one field per option: `click_options(MamlConfig)` turns the fields (with their help
text) into CLI options, so the trainer's options and the library can never drift apart.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields

import click

from .errors import ConfigError
from .images import Preprocessing
from .specs import HEAD_INITS, QUERY_NORMS, conv4_specs, layer_spec

PROTOCOL = "omniglot/README.md protocol: RandomState(1) split 1100/100/423, (character, rotation) classes, 28x28 LANCZOS, ink=1"

# What `--resume` may change: how long to train (and whether to end with a calibrated bundle), the meta step size (lowering it for the tail of a long
# run is the usual last step), the share, mix and tilt of redrawings (a schedule of the same augmentation), and how checkpoints are chosen; the resume
# event in metrics.jsonl records it.
RESUME_MAY_CHANGE = ("iterations", "minutes", "calibration_tasks", "val_every", "meta_lr", "augment_redraw", "augment_redraw_mix", "augment_tilt",
                     "val_tasks", "val_inner_lr", "val_ways", "val_query", "val_steps", "val_head_init")
# Changing these makes earlier validation figures incomparable: the best is chosen afresh from then on.
VALIDATION = ("val_tasks", "val_inner_lr", "val_ways", "val_query", "val_steps", "val_head_init")


def flag(name: str) -> str:
    """The CLI option of a config field: `inner_lr` -> `--inner-lr`."""
    return "--" + name.replace("_", "-")


def _opt(default, help: str, cli: bool = True):
    return field(default=default, metadata={"help": help, "cli": cli})


@dataclass
class MamlConfig:
    """Everything that defines a MAML model and how it was trained (see README for the defaults' sources)."""

    name: str = _opt("omniglot-5w1s", "name of the run/config, carried into exports")
    ways: int = _opt(5, "classes per task (N-way)")
    shots: int = _opt(1, "support images per class (K-shot)")
    query: int = _opt(15, "query images per class during training")
    inner_steps: int = _opt(5, "SGD steps on the support set (inner loop)")
    inner_lr: float = _opt(0.4, "inner-loop SGD step size")
    learn_inner_lr: bool = _opt(False, "learn a step size per layer and inner step, starting from --inner-lr (LSLR of "
                                       "MAML++, Antoniou et al., ICLR 2019): meta-parameters that exports carry as "
                                       "constants; validation and deployment then take --inner-steps steps at them")
    first_order: bool = _opt(False, "first-order MAML (drop second derivatives); default second-order")
    meta_batch: int = _opt(32, "tasks per meta-iteration")
    meta_lr: float = _opt(1e-3, "Adam step size of the meta-update")
    zero_head: bool = _opt(False, "keep the linear head at zero, so that every task adapts from a zero head "
                                  "(the zeroing trick of Kao et al., ICLR 2022)")
    iterations: int = _opt(10000, "meta-iterations to train for (in total, counting resumed ones)")
    minutes: float = _opt(None, "a time budget: this command trains for at most this many minutes of wall time (each "
                                "resume its own), then validates, keeps the best checkpoint and stops, whatever "
                                "--iterations says [default: 5 for image folders, none for Omniglot]")
    seed: int = _opt(0, "seed of the initial weights and the task stream")
    init: str = _opt(None, "start from this checkpoint's weights (.npz or run folder) instead of random ones, "
                           "e.g. to fine-tune a first-order run second-order, or (with --zero-head) a 5-way backbone "
                           "on 20-way tasks; Adam and the task stream start fresh")
    from_scratch: bool = _opt(False, "image folders: start from random weights (--seed) instead of the shipped "
                                     "omniglot-5w1s weights, which a folder of drawings starts from by default")
    hidden: int = _opt(64, "filters per conv layer")
    head_init: str = _opt("meta", "where each task's adaptation starts the linear head: 'meta', the meta-learned head "
                                  "(zero with --zero-head); 'prototypes', each class's row from the mean support "
                                  "features p_c of the class (weight 2 p_c, bias -|p_c|^2: the Euclidean prototype "
                                  "classifier, Proto-MAML of Triantafillou et al., ICLR 2020), then the SGD steps")
    query_norm: str = _opt("support", "what batch norm normalises a query image with once a task is adapted: 'support', "
                                      "the support set's statistics (a query's class depends on the support set and "
                                      "that image alone: classify one image at a time); 'transductive', the query "
                                      "batch's own, as the MAML paper's code does (a query's class can change with "
                                      "its batch-mates; for comparison with papers)")
    temperature: float = _opt(1.0, "what deployed logits are divided by, fitted on validation tasks by `train "
                                   "bundle` so that their softmax is calibrated", cli=False)
    support_shift: int = _opt(0, "deployed adaptation also learns from each support image shifted by this many pixels "
                                 "in each direction (9 views, edges replicated); chosen on validation by `train "
                                 "evaluate --support-shift`, shipped by `train bundle --support-shift`; 0: off",
                              cli=False)
    augment_shift: int = _opt(0, "training's data augmentation: every training image (support and query) shifted by "
                                 "its own random whole number of pixels from -K to K along each axis, edges "
                                 "replicated; validation and test images never are; 0: off")
    augment_redraw: float = _opt(0.0, "training's data augmentation: each training image (support and query) is, with "
                                      "this probability, redrawn from its full-resolution drawing as people draw "
                                      "(tilted, small and off-centre, thinner or thicker, elastic, or all: the "
                                      "robustness suite's conditions, `evaluate --suite shift`); Omniglot only; "
                                      "may change on --resume; 0: off")
    augment_redraw_mix: str = _opt(None, "how --augment-redraw picks each redrawn image's condition: weights such as "
                                         "'tilted=3,small=2,all=3,thin=1,thick=1,elastic=1' (a condition left out "
                                         "weighs 0); may change on --resume, e.g. more tilt for the tail of a run "
                                         "[default: all six equally]")
    augment_tilt: float = _opt(30.0, "the most degrees --augment-redraw's tilted and all-together drawings turn, "
                                     "either way, from 10 (the suite's tilted drawings turn by 10-30, so a query "
                                     "and its support differ by up to 60); up to 45, as classes are quarter-turns; "
                                     "may change on --resume")
    calibration_tasks: int = _opt(None, "end each training command with RUN/bundle.npz: the best checkpoint, deployed, "
                                        "with a temperature fitted on this many validation tasks so that its "
                                        "probabilities are calibrated (what `maml-export --checkpoint RUN` exports); 0: "
                                        "no bundle [default: 200 for image folders, 0 for Omniglot]")
    val_every: int = _opt(250, "validate (and save the best checkpoint) every this many iterations")
    val_tasks: int = _opt(200, "validation tasks (always the same ones) per validation")
    val_inner_lr: float = _opt(None, "inner step size validation adapts with, i.e. the one the checkpoint will be "
                                     "deployed with, which chooses the best checkpoint [default: --inner-lr]")
    val_ways: int = _opt(None, "classes per validation task, i.e. the ways the checkpoint will be deployed for; "
                               "another number than --ways needs --zero-head (the backbone is validated with a "
                               "zero head of that many ways), e.g. train 20-way, choose for 5-way [default: --ways]")
    val_query: int = _opt(None, "query images per class of a validation task [default: --query]")
    val_steps: int = _opt(None, "inner SGD steps validation adapts with, i.e. the number the checkpoint will be "
                                "deployed with (maml-export --steps), e.g. train with 1, choose for 5 "
                                "[default: --inner-steps]")
    val_head_init: str = _opt(None, "where validation's adaptation starts the head, i.e. the head init the checkpoint will "
                                    "be deployed with, e.g. train a zero head, choose for 'prototypes' (needs "
                                    "--zero-head) [default: --head-init]")
    channels: int = _opt(1, "image channels: 1 (grayscale) or 3 (RGB); Omniglot: 1 [default for image folders: 3]")
    image_size: int = _opt(28, "image height and width the images are resized to; Omniglot: 28 "
                               "[default for image folders: 84]")
    pixels: str = _opt(None, "pixel convention: 'ink', grayscale drawings inverted so that ink is 1.0 and paper 0.0 "
                             "(Omniglot's); 'plain', the pixel values / 255 (photos) [default: ink for Omniglot, "
                             "plain for image folders]")
    resize: str = _opt("lanczos", "how images are resized to --image-size: lanczos, bilinear, bicubic or nearest "
                                  "(Omniglot: lanczos)")
    split: str = _opt(None, "train,val,test fractions of the classes of an image folder without train/val/test "
                            "sub-folders or csv files, split by a RandomState(1) permutation of the sorted class "
                            "names [default: 0.7,0.1,0.2]")
    rotations: bool = _opt(None, "also make each class's 90, 180 and 270 degree rotations classes of their own, as "
                                 "Omniglot's protocol does (always on for Omniglot; off for image folders unless given)")
    protocol: str = _opt(PROTOCOL, "data protocol the weights were trained under", cli=False)
    layers: list = _opt(None, "layer specs (derived from the fields above when empty)", cli=False)

    def __post_init__(self):
        if self.iterations < 0:  # 0: no meta-training (a bundle of an --init run's starting weights)
            raise ConfigError(f"--iterations must be at least 0, got {self.iterations}")
        if self.minutes is not None and not self.minutes > 0:
            raise ConfigError(f"--minutes must be positive, got {self.minutes}")
        if self.calibration_tasks is not None and self.calibration_tasks < 0:
            raise ConfigError(f"--calibration-tasks must be at least 0, got {self.calibration_tasks}")
        if self.from_scratch and self.init is not None:
            raise ConfigError(f"--from-scratch starts from random weights, --init from {self.init}: pass one of them")
        for name in ("ways", "val_ways"):  # first: --ways 0 and --ways 1 get the same bound
            if getattr(self, name) is not None and getattr(self, name) < 2:
                raise ConfigError(f"{flag(name)} must be at least 2, got {getattr(self, name)}")
        for name in ("shots", "query", "inner_steps", "meta_batch", "hidden", "val_tasks",
                     "val_every", "val_query", "val_steps"):  # None: an optional one not given
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{flag(name)} must be at least 1, got {getattr(self, name)}")
        for name in ("inner_lr", "meta_lr", "val_inner_lr"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ConfigError(f"{flag(name)} must be positive, got {getattr(self, name)}")
        if self.learn_inner_lr and self.val_inner_lr is not None:
            raise ConfigError("--learn-inner-lr: validation adapts with the learned step sizes; leave out --val-inner-lr")
        if self.learn_inner_lr and self.val_steps not in (None, self.inner_steps):
            raise ConfigError(f"--learn-inner-lr learns step sizes for --inner-steps {self.inner_steps} steps; "
                              f"leave out --val-steps {self.val_steps}")
        if self.val_ways not in (None, self.ways) and not self.zero_head:
            raise ConfigError(f"--val-ways {self.val_ways} differs from --ways {self.ways}: pass --zero-head, so that "
                              f"the backbone adapts from a zero head of any number of ways")
        if self.val_head_init not in (None, *HEAD_INITS):
            raise ConfigError(f"--val-head-init must be one of {', '.join(HEAD_INITS)}, got {self.val_head_init!r}")
        if self.val_head_init not in (None, self.head_init) and not self.zero_head:
            raise ConfigError(f"--val-head-init {self.val_head_init} differs from --head-init {self.head_init}: pass "
                              f"--zero-head, so that the head the backbone is trained with is zero or unused")
        if self.head_init not in HEAD_INITS:
            raise ConfigError(f"--head-init must be one of {', '.join(HEAD_INITS)}, got {self.head_init!r}")
        if self.query_norm not in QUERY_NORMS:
            raise ConfigError(f"--query-norm must be one of {', '.join(QUERY_NORMS)}, got {self.query_norm!r}")
        if not (isinstance(self.temperature, (int, float)) and 0 < self.temperature < float("inf")):
            raise ConfigError(f"temperature must be a positive number, got {self.temperature!r}")
        for name in ("support_shift", "augment_shift"):  # shifts in whole pixels, below half the image
            shift = getattr(self, name)
            if isinstance(shift, bool) or not isinstance(shift, int) or not 0 <= shift < self.image_size // 2:
                raise ConfigError(f"{flag(name)} must be a whole number of pixels from 0 to {self.image_size // 2 - 1} "
                                  f"(below half of --image-size {self.image_size}), got {shift!r}")
        if not (isinstance(self.augment_redraw, (int, float)) and 0 <= self.augment_redraw <= 1):
            raise ConfigError(f"--augment-redraw must be a probability from 0 to 1, got {self.augment_redraw!r}")
        if self.augment_redraw_mix is not None:
            from .suite import redraw_mix
            if not self.augment_redraw:
                raise ConfigError("--augment-redraw-mix weighs the conditions of --augment-redraw: pass --augment-redraw "
                                  "P (e.g. 0.5) too")
            try:
                redraw_mix(self.augment_redraw_mix)
            except ValueError as e:
                raise ConfigError(f"--augment-redraw-mix: {e}") from None
        if isinstance(self.augment_tilt, bool) or not (isinstance(self.augment_tilt, (int, float)) and 10 <= self.augment_tilt <= 45):
            raise ConfigError(f"--augment-tilt must be a number of degrees from 10 to 45, got {self.augment_tilt!r}")
        if self.augment_tilt != 30 and not self.augment_redraw:
            raise ConfigError("--augment-tilt sets how far --augment-redraw tilts its drawings: pass --augment-redraw P "
                              "(e.g. 0.5) too")
        try:  # the preprocessing checks its own fields (--channels, --pixels, --resize)
            self.preprocessing
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.image_size < 16:
            raise ConfigError(f"--image-size must be at least 16 (four 2x2 poolings), got {self.image_size}")
        if not self.layers:
            self.layers = conv4_specs(self.ways, self.channels, self.image_size, self.hidden, head_init=self.head_init,
                                      query_norm=self.query_norm)
            self.layers[-1]["temperature"] = self.temperature
            self.layers[-1]["support_shift"] = self.support_shift
        try:  # every key spelled out (an older checkpoint's head has no "init": it is "meta")
            self.layers = [layer_spec(s).spec() for s in self.layers]
        except (TypeError, ValueError) as e:
            raise ConfigError(f"invalid layer specs: {e}") from None
        if self.layers[-1].get("init", "meta") != self.head_init:
            raise ConfigError(f"--head-init {self.head_init} differs from the layers' head "
                              f"({self.layers[-1].get('init')})")
        norms = {s["query_norm"] for s in self.layers if s["type"] == "BatchNorm"}
        if norms and norms != {self.query_norm}:
            raise ConfigError(f"--query-norm {self.query_norm} differs from the layers' batch norm ({', '.join(sorted(norms))})")
        if self.layers[-1].get("temperature", 1.0) != self.temperature:
            raise ConfigError(f"temperature {self.temperature} differs from the layers' head "
                              f"({self.layers[-1].get('temperature')})")
        if self.layers[-1].get("support_shift", 0) != self.support_shift:
            raise ConfigError(f"--support-shift {self.support_shift} differs from the layers' head "
                              f"({self.layers[-1].get('support_shift')})")

    @property
    def preprocessing(self) -> Preprocessing:
        """How an image file becomes this model's input (`images.Preprocessing`): training data and
        `maml-predict` both prepare images with it. Without `pixels` (training fills it in from the data):
        Omniglot's ink for one channel, plain for three."""
        pixels = self.pixels or ("ink" if self.channels == 1 else "plain")
        return Preprocessing(self.channels, self.image_size, pixels, self.resize)

    @property
    def head_is_zero(self) -> bool:
        """Whether training holds the head's meta-parameters at zero: --zero-head, or a head that prototypes
        replace in every task (never read, so never trained)."""
        return self.zero_head or self.head_init == "prototypes"

    # How validation adapts, i.e. the deployment a checkpoint is chosen for (and `train bundle` ships it for):
    # each val_* option where given, else the training one.
    @property
    def deployed_ways(self) -> int:
        return self.ways if self.val_ways is None else self.val_ways

    @property
    def deployed_inner_lr(self) -> float:
        return self.inner_lr if self.val_inner_lr is None else self.val_inner_lr

    @property
    def deployed_head_init(self) -> str:
        return self.head_init if self.val_head_init is None else self.val_head_init

    @property
    def deployed_steps(self) -> int:
        return self.inner_steps if self.val_steps is None else self.val_steps

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def cli_args(self) -> list[str]:
        """The `python -m train` options that rebuild this config (every CLI field, defaults included)."""
        args = []
        for f in fields(self):
            value = getattr(self, f.name)
            if not f.metadata.get("cli", True) or value is None or (f.type in ("bool", bool) and not value):
                continue
            args += [flag(f.name)] + ([] if f.type in ("bool", bool) else [str(value)])
        return args

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: dict) -> "MamlConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown} (written by a newer maml-export?)")
        if "query_norm" not in data:  # written before query_norm existed: trained and deployed transductive
            data = {**data, "query_norm": "transductive"}
            if data.get("layers"):
                data["layers"] = [{**s, "query_norm": "transductive"} if s.get("type") == "BatchNorm" else s
                                  for s in data["layers"]]
        return cls(**data)


def click_options(cls, only_cli: bool = True):
    """Decorator adding one click option per dataclass field (`inner_lr` -> `--inner-lr`), default None.

    None means "not given", so `--resume` can tell given options from defaults.
    """
    def decorate(func):
        for f in reversed(fields(cls)):
            if only_cli and not f.metadata.get("cli", True):
                continue
            option = flag(f.name)
            default = f.default
            if f.type in ("bool", bool):
                func = click.option(option, f.name, is_flag=True, default=None,
                                    help=f"{f.metadata['help']}")(func)
            else:
                kind = {"int": int, "float": float, "str": str}.get(f.type, str)
                # a None default means "none" or a default the help text names itself
                shown = "" if default is None else f" [default: {default}]"
                func = click.option(option, f.name, type=kind, default=None, show_default=False,
                                    help=f"{f.metadata['help']}{shown}")(func)
        return func
    return decorate


def given(options: dict) -> dict:
    """The options the user actually gave (click passes None for the others)."""
    return {k: v for k, v in options.items() if v is not None}
