"""Meta-training on real Omniglot: it learns, resumes exactly, and rejects bad input in one line."""
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import paddle
import pytest

from maml_export.checkpoint import Checkpoint, bundle_run, load_checkpoint, save_checkpoint, weights_sha256
from maml_export.config import MamlConfig
from maml_export.errors import CheckpointError, ConfigError
from maml_export.optim import Adam
from maml_export.model import Model
from maml_export.protocol import VAL_SEED
from maml_export.trainer import initial_params, train

from conftest import DATA, needs_omniglot as needs_data, require_omniglot, sigint_default

SMALL = dict(hidden=16, meta_batch=4, query=3, inner_steps=2, val_tasks=20, first_order=True)


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "train", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_adam_equals_paddle_adam():
    rng = np.random.default_rng(0)
    init = rng.normal(size=(4, 3)).astype("float32")
    ours = {"w": paddle.to_tensor(init)}
    adam = Adam(ours, lr=0.01)
    ref = paddle.create_parameter([4, 3], "float32", default_initializer=paddle.nn.initializer.Assign(init))
    opt = paddle.optimizer.Adam(learning_rate=0.01, parameters=[ref])
    for _ in range(5):
        g = rng.normal(size=(4, 3)).astype("float32")
        adam.step({"w": paddle.to_tensor(g)})
        (ref * paddle.to_tensor(g)).sum().backward()
        opt.step()
        opt.clear_grad()
    np.testing.assert_allclose(ours["w"].numpy(), ref.numpy(), rtol=1e-6, atol=1e-6)  # float32 rounding


@needs_data
@pytest.mark.slow
def test_short_training_learns(tmp_path):
    """Loss drops and validation accuracy rises well above both chance (0.2) and the untrained net's."""
    config = MamlConfig(iterations=60, val_every=60, **{**SMALL, "meta_batch": 8, "hidden": 32})
    untrained = MamlConfig(iterations=1, val_every=1, **{**SMALL, "meta_batch": 1, "hidden": 32, "meta_lr": 1e-12})
    base = train(untrained, DATA, tmp_path / "untrained", progress=False)["best_val_accuracy"]
    summary = train(config, DATA, tmp_path / "run", progress=False)
    lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    losses = [r["loss"] for r in lines if "loss" in r]
    assert len(losses) == 60
    assert np.mean(losses[-15:]) < np.mean(losses[:15]) - 0.1
    # 20 validation tasks of 15 queries: about ±5 points of noise, so the margins are wider than that
    # (seen: 0.50-0.52 after 60 iterations, float rounding alone moves it; untrained 0.31, chance 0.2)
    assert summary["best_val_accuracy"] > max(0.4, base + 0.1), (summary, base)
    # the evaluation entry reports meta-test accuracy with its interval, by the protocol (15 queries)
    result = cli("evaluate", "--checkpoint", str(tmp_path / "run" / "best.npz"), "--data", DATA, "--tasks", "20",
                 "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["query"] == 15 and report["tasks"] == 20 and report["split"] == "test"
    assert 0.4 < report["accuracy"] <= 1 and 0 < report["ci95"] < 0.2


@needs_data
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    straight = MamlConfig(iterations=4, val_every=2, **SMALL)
    train(straight, DATA, tmp_path / "a", progress=False)
    train(MamlConfig(iterations=2, val_every=2, **SMALL), DATA, tmp_path / "b", progress=False)
    train(MamlConfig(**SMALL), DATA, tmp_path / "b", resume=True, overrides={"iterations": 4}, progress=False)
    a, b = load_checkpoint(tmp_path / "a" / "latest.npz"), load_checkpoint(tmp_path / "b" / "latest.npz")
    assert a.iteration == b.iteration == 4
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name], err_msg=name)
    for key in a.optimizer:
        np.testing.assert_array_equal(a.optimizer[key], b.optimizer[key], err_msg=key)
    # the metrics of the first segment are kept; the resume is recorded
    events = [json.loads(line).get("event") for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert "resume" in events


@needs_data
@pytest.mark.parametrize("option, value", [("augment_shift", 2), ("augment_redraw", 0.5)])
def test_augmentation_changes_training_and_resumes_exactly(tmp_path, option, value):
    """The shifts and the redrawings come from the task stream's generator, saved in every checkpoint: a resumed
    augmented run ends with the weights of an uninterrupted one, and they differ from the unaugmented run's."""
    augmented = {**SMALL, option: value}
    train(MamlConfig(iterations=4, val_every=2, **augmented), DATA, tmp_path / "a", progress=False)
    train(MamlConfig(iterations=2, val_every=2, **augmented), DATA, tmp_path / "b", progress=False)
    train(MamlConfig(**augmented), DATA, tmp_path / "b", resume=True, overrides={"iterations": 4}, progress=False)
    train(MamlConfig(iterations=4, val_every=2, **SMALL), DATA, tmp_path / "plain", progress=False)
    a, b, plain = (load_checkpoint(tmp_path / run / "latest.npz") for run in ("a", "b", "plain"))
    assert getattr(a.config, option) == getattr(b.config, option) == value and not getattr(plain.config, option)
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name], err_msg=name)
    assert not np.array_equal(a.params["conv1.weight"], plain.params["conv1.weight"])
    if option == "augment_shift":  # the shifts are part of the run; the redrawings' share may change on resume
        with pytest.raises(ConfigError, match="--augment-shift"):
            train(MamlConfig(**SMALL), DATA, tmp_path / "b", resume=True, overrides={"iterations": 5, option: 1},
                  progress=False)


@needs_data
def test_resume_may_lower_the_meta_lr_but_not_change_the_model(tmp_path):
    train(MamlConfig(iterations=1, val_every=5, **SMALL), DATA, tmp_path, progress=False)
    with pytest.raises(ConfigError, match="--hidden"):
        train(MamlConfig(**SMALL), DATA, tmp_path, resume=True, overrides={"iterations": 2, "hidden": 8}, progress=False)
    train(MamlConfig(**SMALL), DATA, tmp_path, resume=True, overrides={"iterations": 2, "meta_lr": 1e-4},
          progress=False)
    assert load_checkpoint(tmp_path / "latest.npz").config.meta_lr == 1e-4
    resumes = [e for e in map(json.loads, open(tmp_path / "metrics.jsonl")) if e.get("event") == "resume"]
    assert resumes[-1]["meta_lr"] == 1e-4
    assert resumes[-1]["changed"] == {"iterations": [1, 2], "meta_lr": [1e-3, 1e-4]}


@needs_data
def test_resume_may_change_the_mix_tilt_and_share_of_redrawings(tmp_path):
    """A run's tail may weigh the redrawings differently (more tilt), tilt them further or redraw fewer images: the
    resume records it, the checkpoints carry it.
    Through the command line, as a user resumes: the mix is checked with the run's own --augment-redraw."""
    redrawn = {**SMALL, "augment_redraw": 0.5}
    train(MamlConfig(iterations=1, val_every=5, **redrawn), DATA, tmp_path, progress=False)
    mix = "tilted=3,small=2,all=3,thin=1,thick=1,elastic=1"
    done = cli("--out", str(tmp_path), "--resume", "--iterations", "2", "--augment-redraw-mix", mix, "--threads", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert load_checkpoint(tmp_path / "latest.npz").config.augment_redraw_mix == mix
    resumes = [e for e in map(json.loads, open(tmp_path / "metrics.jsonl")) if e.get("event") == "resume"]
    assert resumes[-1]["changed"] == {"iterations": [1, 2], "augment_redraw_mix": [None, mix]}
    done = cli("--out", str(tmp_path), "--resume", "--iterations", "3", "--augment-tilt", "40", "--threads", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert load_checkpoint(tmp_path / "latest.npz").config.augment_tilt == 40
    resumes = [e for e in map(json.loads, open(tmp_path / "metrics.jsonl")) if e.get("event") == "resume"]
    assert resumes[-1]["changed"] == {"iterations": [2, 3], "augment_tilt": [30, 40]}
    done = cli("--out", str(tmp_path), "--resume", "--iterations", "4", "--augment-redraw", "0.3", "--threads", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert load_checkpoint(tmp_path / "latest.npz").config.augment_redraw == 0.3
    resumes = [e for e in map(json.loads, open(tmp_path / "metrics.jsonl")) if e.get("event") == "resume"]
    assert resumes[-1]["changed"] == {"iterations": [3, 4], "augment_redraw": [0.5, 0.3]}


@needs_data
def test_init_starts_a_new_run_from_another_runs_weights(tmp_path):
    """--init: the first-order run's weights, fine-tuned second-order in a run of its own (docs/experiments.md#5-way-bundle-history)."""
    train(MamlConfig(iterations=2, val_every=2, **SMALL), DATA, tmp_path / "fo", progress=False)
    source = load_checkpoint(tmp_path / "fo" / "latest.npz")
    second_order = {**SMALL, "first_order": False}
    train(MamlConfig(iterations=1, val_every=5, init=str(tmp_path / "fo" / "latest.npz"), **second_order),
          DATA, tmp_path / "so", progress=False)
    tuned = load_checkpoint(tmp_path / "so" / "latest.npz")
    assert tuned.iteration == 1 and not tuned.config.first_order
    # one Adam step of size meta_lr away from the source, nowhere near a fresh random initialisation
    for name, value in source.params.items():
        step = np.abs(tuned.params[name] - value).max()
        assert 0 < step <= 1.01 * tuned.config.meta_lr, (name, step)
    events = [json.loads(line) for line in open(tmp_path / "so" / "metrics.jsonl")]
    start, baseline = events[0], events[1]  # the initial weights are validated before the first step
    assert baseline["event"] == "validation" and baseline["iteration"] == 0
    assert load_checkpoint(tmp_path / "so" / "best.npz").iteration in (0, 1)
    assert start["weights"] == {"init": str(tmp_path / "fo" / "latest.npz"), "init_run": "omniglot-5w1s",
                                "init_iteration": 2, "init_weights_sha256": weights_sha256(source.params)}
    assert "--init " in " ".join(tuned.config.cli_args())
    with pytest.raises(ConfigError, match="match --hidden"):
        train(MamlConfig(iterations=1, init=str(tmp_path / "fo" / "latest.npz"), **{**SMALL, "hidden": 8}),
              DATA, tmp_path / "wrong", progress=False)
    with pytest.raises(ConfigError, match="--ways unless --zero-head"):
        train(MamlConfig(iterations=1, init=str(tmp_path / "fo" / "latest.npz"), **{**SMALL, "ways": 3}),
              DATA, tmp_path / "wrong", progress=False)
    # its bundle names the init by its weights too: the file at that path may be replaced by a later ship
    (tmp_path / "fo" / "latest.npz").unlink()
    shipped = bundle_run(tmp_path / "so", tmp_path / "so.npz")
    assert shipped.state["weights"] == start["weights"]
    assert load_checkpoint(tmp_path / "so.npz").state["weights"]["init_weights_sha256"] == weights_sha256(source.params)


@needs_data
def test_init_with_zero_head_takes_a_backbone_to_another_number_of_ways(tmp_path):
    """--init --zero-head --ways 3 from a 5-way run: its backbone, a zero 3-way head (docs/experiments.md#20-way-bundle-history)."""
    train(MamlConfig(iterations=1, val_every=5, **SMALL), DATA, tmp_path / "5way", progress=False)
    source = load_checkpoint(tmp_path / "5way" / "latest.npz")
    config = MamlConfig(iterations=1, val_every=5, ways=3, zero_head=True,
                        init=str(tmp_path / "5way" / "latest.npz"), **SMALL)
    params, origin = initial_params(Model.from_specs(config.layers), config)
    assert origin["head"] == "zero 3-way" and params.keys() == source.params.keys()
    for name, value in params.items():
        if name.startswith("fc"):
            assert value.shape[-1] == 3 and not value.any(), name
        else:
            np.testing.assert_array_equal(value, source.params[name], err_msg=name)
    train(config, DATA, tmp_path / "3way", progress=False)  # and it trains
    assert load_checkpoint(tmp_path / "3way" / "latest.npz").config.ways == 3
    assert json.loads(open(tmp_path / "3way" / "metrics.jsonl").readline())["weights"]["head"] == "zero 3-way"


@needs_data
@pytest.mark.slow
def test_resume_may_change_how_checkpoints_are_chosen(tmp_path):
    """Validating at the step size the weights will be deployed with chooses a new best (docs/experiments.md#validating-at-the-deployed-step-size: at the
    training step size 0.4 the run's best was 2800; at the deployed 0.15 a later checkpoint did better)."""
    train(MamlConfig(iterations=2, val_every=1, **SMALL), DATA, tmp_path, progress=False)
    train(MamlConfig(**SMALL), DATA, tmp_path, resume=True, overrides={"iterations": 3, "val_inner_lr": 0.1},
          progress=False)
    events = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    resume = next(e for e in events if e.get("event") == "resume")
    assert resume["changed"] == {"iterations": [2, 3], "val_inner_lr": [None, 0.1]} and "afresh" in resume["best"]
    validations = [e for e in events if e.get("event") == "validation"]
    assert [(v["iteration"], v["inner_lr"]) for v in validations] == [(1, 0.4), (2, 0.4), (2, 0.1), (3, 0.1)]
    best = load_checkpoint(tmp_path / "best.npz")  # the resumed weights compete under the new validation
    chosen = max(validations[2:], key=lambda v: v["val_accuracy"])
    assert best.iteration == chosen["iteration"] and best.state["best_val_accuracy"] == chosen["val_accuracy"]
    result = cli("bundle", str(tmp_path), "--out", str(tmp_path / "ship.npz"))  # adapts as it was chosen
    assert result.returncode == 0, result.stderr
    shipped = load_checkpoint(tmp_path / "ship.npz")
    assert shipped.config.inner_lr == 0.1 and shipped.state["inner_lr_trained"] == 0.4
    # the bundle ships the temperature fitted on validation tasks: the NLL it minimised is lower there
    calibration = shipped.state["calibration"]
    assert shipped.config.temperature == calibration["temperature"] != 1.0 and calibration["tasks"] == 200
    assert calibration["nll_after"] <= calibration["nll_before"] and calibration["query_norm"] == "support"
    assert shipped.config.layers[-1]["temperature"] == shipped.config.temperature


@needs_data
@pytest.mark.slow
def test_val_ways_chooses_and_ships_the_checkpoint_for_the_ways_it_will_be_deployed_with(tmp_path):
    """Train 3-way, validate and ship 2-way (docs/pretrained.md#omniglot-5w1s: 20-way training for a 5-way deployment): validation
    adapts the backbone from a zero 2-way head on 2-way tasks, and the bundle is a 2-way model. Likewise the
    number of steps: trained with 2, validated and shipped with 3 (`--val-steps`)."""
    from maml_export.data import TaskSampler, load_omniglot, split_characters
    from maml_export.maml import MAML
    from maml_export.model import to_tensors
    from maml_export.trainer import evaluate
    run = tmp_path / "run"
    train(MamlConfig(iterations=2, val_every=1, ways=3, zero_head=True, val_ways=2, val_query=4, val_steps=3, **SMALL),
          DATA, run, progress=False)
    validations = [e for e in map(json.loads, open(run / "metrics.jsonl")) if e.get("event") == "validation"]
    assert [(v["ways"], v["query"], v["steps"]) for v in validations] == [(2, 4, 3), (2, 4, 3)]
    best = load_checkpoint(run / "best.npz")
    assert best.config.ways == 3 and best.params["fc1.weight"].shape[-1] == 3
    result = cli("bundle", str(run), "--out", str(tmp_path / "ship.npz"))
    assert result.returncode == 0, result.stderr
    shipped = load_checkpoint(tmp_path / "ship.npz")
    assert shipped.config.ways == 2 and shipped.state["ways_trained"] == 3 and "--val-ways 2" in shipped.state["command"]
    assert shipped.config.inner_steps == 3 and shipped.state["inner_steps_trained"] == 2
    assert shipped.params.keys() == Model.from_specs(shipped.config.layers).param_shapes().keys()
    assert shipped.params["fc1.weight"].shape[-1] == 2 and not shipped.params["fc1.weight"].any()
    np.testing.assert_array_equal(shipped.params["conv1.weight"], best.params["conv1.weight"])
    # the shipped model scores on the run's 2-way validation tasks what the run's validation measured for it
    images = load_omniglot(DATA)
    sampler = TaskSampler(images, split_characters(len(images))["val"], 2, 1, 4, VAL_SEED)
    maml = MAML(Model.from_specs(shipped.config.layers), to_tensors(shipped.params), shipped.config.inner_lr,
                shipped.config.inner_steps)
    again = evaluate(maml, sampler, SMALL["val_tasks"], batch=SMALL["meta_batch"]).mean()
    chosen = next(v for v in validations if v["iteration"] == best.iteration)
    assert abs(again - chosen["val_accuracy"]) < 1e-6
    # `train evaluate` on the run's own checkpoint adapts as validation did (2 ways, 3 steps), not as training
    # did (3 ways, 2 steps): the same figure as on the bundle, which, already deployed, keeps no val_* to redo it
    evaluated = []
    for checkpoint in (run / "best.npz", tmp_path / "ship.npz"):
        result = cli("evaluate", "--checkpoint", str(checkpoint), "--data", str(DATA), "--split", "val", "--tasks", "8",
                     "--json")
        assert result.returncode == 0, result.stderr
        evaluated.append(json.loads(result.stdout.splitlines()[-1]))
    assert [(e["ways"], e["steps"], e["inner_lr"]) for e in evaluated] == [(2, 3, 0.4)] * 2
    assert evaluated[0]["accuracy"] == evaluated[1]["accuracy"]
    assert (shipped.config.val_ways, shipped.config.val_steps, shipped.config.val_inner_lr) == (None, None, None)
    # --ways ships the same checkpoint for other ways (the trained 3 here): backbone as chosen, zero 3-way head
    result = cli("bundle", str(run), "--out", str(tmp_path / "ship3.npz"), "--ways", "3")
    assert result.returncode == 0, result.stderr
    shipped3 = load_checkpoint(tmp_path / "ship3.npz")
    assert shipped3.config.ways == 3 and shipped3.iteration == best.iteration
    assert shipped3.params["fc1.weight"].shape[-1] == 3 and not shipped3.params["fc1.weight"].any()
    np.testing.assert_array_equal(shipped3.params["conv4.weight"], best.params["conv4.weight"])
    bad = cli("bundle", str(run), "--out", str(tmp_path / "x.npz"), "--ways", "1")
    assert bad.returncode != 0 and bad.stderr.strip().splitlines() == ["error: --ways must be at least 2, got 1"]
    with pytest.raises(ConfigError, match="--zero-head"):
        MamlConfig(ways=3, val_ways=2)
    plain = MamlConfig(ways=3, **SMALL)  # nor may a resume validate another number of ways without it
    save_checkpoint(tmp_path / "plain" / "latest.npz",
                    Checkpoint(plain, Model.from_specs(plain.layers).init_params(0), 1))
    with pytest.raises(ConfigError, match="--zero-head"):
        train(plain, DATA, tmp_path / "plain", resume=True, overrides={"val_ways": 2}, progress=False)


@needs_data
@pytest.mark.slow
def test_bundle_ships_the_best_checkpoint_with_the_command_that_reproduces_the_run(tmp_path):
    run = tmp_path / "run"
    train(MamlConfig(iterations=2, val_every=1, **SMALL), DATA, run, progress=False)
    train(MamlConfig(**SMALL), DATA, run, resume=True, overrides={"iterations": 3, "meta_lr": 5e-4}, progress=False)
    result = cli("bundle", str(run), "--out", str(tmp_path / "ship" / "model.npz"), "--inner-lr", "0.15",
                 "--note", "chosen on validation")
    assert result.returncode == 0, result.stderr
    best, shipped = load_checkpoint(run / "best.npz"), load_checkpoint(tmp_path / "ship" / "model.npz")
    assert shipped.iteration == best.iteration and not shipped.optimizer and "sampler" not in shipped.state
    assert all(np.array_equal(shipped.params[k], v) for k, v in best.params.items())
    assert shipped.state["best_val_accuracy"] == best.state["best_val_accuracy"]
    # named by what it is, its file (omniglot-5w1s), not by the run it came from
    assert shipped.config.name == "model" and shipped.state["run"] == best.config.name
    assert shipped.config.inner_lr == 0.15 and shipped.state["inner_lr_trained"] == 0.4  # adapts with 0.15 now
    assert shipped.state["note"] == "chosen on validation" and "--inner-lr 0.4 " in shipped.state["command"]
    assert shipped.state["weights"] == {"seed": best.config.seed}  # where its weights began
    command = shipped.state["command"]  # the start options as given (meta-lr 1e-3), then the resume's change
    assert command.startswith("python -m train ") and "--meta-lr 0.001 " in command and "--hidden 16" in command
    resumed = f"at iteration 2: python -m train --out {run} --resume --iterations 3 --meta-lr 0.0005"
    assert (resumed in command) == (best.iteration > 2), command  # a resume after the best is not part of it
    log = [json.loads(line) for line in open(tmp_path / "ship" / "model.metrics.jsonl")]
    assert log[0]["event"] == "start" and max(e["iteration"] for e in log) == best.iteration
    missing = cli("bundle", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.npz"))
    assert missing.returncode != 0 and missing.stderr.startswith("error: ") and "best.npz" in missing.stderr
    other_ways = cli("bundle", str(run), "--out", str(tmp_path / "x.npz"), "--ways", "3")  # a meta-learned head
    assert other_ways.returncode != 0 and len(other_ways.stderr.strip().splitlines()) == 1
    assert "--zero-head" in other_ways.stderr and not (tmp_path / "x.npz").exists()
    scaled = cli("bundle", str(run), "--out", str(tmp_path / "scaled.npz"), "--feature-scale", "4",
                 "--calibration-tasks", "0")  # the last batch norm's weight and bias times 4, recorded
    assert scaled.returncode == 0, scaled.stderr
    scaled = load_checkpoint(tmp_path / "scaled.npz")
    for k, v in best.params.items():
        assert np.array_equal(scaled.params[k], 4 * v if k in ("bn4.weight", "bn4.bias") else v), k
    assert scaled.state["feature_scale"] == 4.0
    for bad in ("0", "inf"):
        refused = cli("bundle", str(run), "--out", str(tmp_path / "x.npz"), "--feature-scale", bad, "--calibration-tasks", "0")
        assert refused.returncode != 0 and len(refused.stderr.strip().splitlines()) == 1 and "--feature-scale" in refused.stderr
    no_step = cli("bundle", str(run), "--out", str(tmp_path / "x.npz"), "--inner-lr", "0")  # the config's own check
    assert no_step.returncode != 0 and no_step.stderr.strip().splitlines() == ["error: --inner-lr must be positive, got 0.0"]
    assert not (tmp_path / "x.npz").exists()
    # --checkpoint: another checkpoint of the run (e.g. chosen on the robustness suite), its log up to there
    latest = load_checkpoint(run / "latest.npz")
    chosen = cli("bundle", str(run), "--out", str(tmp_path / "chosen.npz"), "--checkpoint", str(run / "latest.npz"),
                 "--calibration-tasks", "0", "--note", "chosen on the suite")
    assert chosen.returncode == 0, chosen.stderr
    chosen = load_checkpoint(tmp_path / "chosen.npz")
    assert chosen.iteration == latest.iteration == 3 and "best_val_accuracy" not in chosen.state
    validated = [json.loads(line) for line in open(run / "metrics.jsonl") if '"validation"' in line]
    assert chosen.state["val_accuracy"] == [e for e in validated if e["iteration"] == 3][-1]["val_accuracy"]
    assert all(np.array_equal(chosen.params[k], v) for k, v in latest.params.items())
    assert chosen.state["chosen"].startswith("iteration 3 ") and "--resume" in chosen.state["command"]
    assert max(json.loads(line)["iteration"] for line in open(tmp_path / "chosen.metrics.jsonl")) == 3
    other = tmp_path / "other"
    train(MamlConfig(iterations=1, val_every=1, name="other", **SMALL), DATA, other, progress=False)
    foreign = cli("bundle", str(run), "--out", str(tmp_path / "x.npz"), "--checkpoint", str(other / "latest.npz"))
    assert foreign.returncode != 0 and len(foreign.stderr.strip().splitlines()) == 1 and "not of" in foreign.stderr
    assert not (tmp_path / "x.npz").exists()
    (run / "best.npz").unlink()  # a run resumed from a copy of another's latest.npz has no best.npz of its own
    copied = cli("bundle", str(run), "--out", str(tmp_path / "copied.npz"), "--checkpoint", str(run / "latest.npz"),
                 "--calibration-tasks", "0")
    assert copied.returncode == 0, copied.stderr
    assert load_checkpoint(tmp_path / "copied.npz").iteration == 3


@needs_data
def test_zero_head_keeps_the_head_at_zero_and_trains_the_body(tmp_path):
    from maml_export.model import Model
    config = MamlConfig(iterations=2, val_every=5, zero_head=True, **SMALL)
    train(config, DATA, tmp_path, progress=False)
    ckpt = load_checkpoint(tmp_path / "latest.npz")
    init = Model.from_specs(config.layers).init_params(config.seed)
    assert ckpt.config.zero_head and not np.allclose(ckpt.params["conv1.weight"], init["conv1.weight"])
    assert not np.any(ckpt.params["fc1.weight"]) and not np.any(ckpt.params["fc1.bias"])


def test_checkpoint_round_trip_and_corruption(tmp_path):
    config = MamlConfig(hidden=4)
    from maml_export.model import Model
    params = Model.from_specs(config.layers).init_params(0)
    path = save_checkpoint(tmp_path / "c.npz", Checkpoint(config, params, 7, {"adam.t": np.array(7)}, {"x": 1}))
    ckpt = load_checkpoint(path)
    assert ckpt.iteration == 7 and ckpt.state == {"x": 1} and ckpt.config == config
    assert json.load(open(tmp_path / "c.json"))["config"]["hidden"] == 4
    np.load(path, allow_pickle=False)  # no pickle needed
    (tmp_path / "bad.npz").write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "bad.npz")
    other = Model.from_specs(MamlConfig(hidden=8).layers).init_params(0)
    save_checkpoint(tmp_path / "mismatch.npz", Checkpoint(config, other))
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(tmp_path / "mismatch.npz")


@needs_data
@pytest.mark.slow
def test_head_init_prototypes_trains_second_order_and_ships_from_a_zero_head_run(tmp_path):
    """--head-init prototypes: each task's head starts from its support's prototypes, so the head's own
    meta-parameters stay zero and untrained while the body trains second-order through the prototypes; and a
    zero-head run ships with that head (`bundle --head-init`), evaluating as `evaluate --head-init` does."""
    config = MamlConfig(iterations=2, val_every=2, head_init="prototypes", **{**SMALL, "first_order": False})
    train(config, DATA, tmp_path / "proto", progress=False)
    ckpt = load_checkpoint(tmp_path / "proto" / "latest.npz")
    init = Model.from_specs(config.layers).init_params(config.seed)
    assert ckpt.config.layers[-1]["init"] == "prototypes"
    assert not np.allclose(ckpt.params["conv1.weight"], init["conv1.weight"])
    assert not ckpt.params["fc1.weight"].any() and not ckpt.params["fc1.bias"].any()
    run = tmp_path / "zero"
    train(MamlConfig(iterations=1, val_every=1, zero_head=True, **SMALL), DATA, run, progress=False)
    result = cli("bundle", str(run), "--out", str(tmp_path / "ship.npz"), "--head-init", "prototypes")
    assert result.returncode == 0, result.stderr
    shipped, best = load_checkpoint(tmp_path / "ship.npz"), load_checkpoint(run / "best.npz")
    assert shipped.config.head_init == "prototypes" and shipped.state["head_init_trained"] == "meta"
    np.testing.assert_array_equal(shipped.params["conv2.weight"], best.params["conv2.weight"])
    evaluated = []
    for args in (["--checkpoint", str(tmp_path / "ship.npz")], ["--checkpoint", str(run), "--head-init", "prototypes"],
                 ["--checkpoint", str(run)]):
        result = cli("evaluate", *args, "--data", str(DATA), "--tasks", "8", "--json")
        assert result.returncode == 0, result.stderr
        evaluated.append(json.loads(result.stdout.splitlines()[-1]))
    assert [e["head_init"] for e in evaluated] == ["prototypes", "prototypes", "meta"]
    assert evaluated[0]["accuracy"] == evaluated[1]["accuracy"]
    with pytest.raises(ConfigError, match="--head-init must be one of meta, prototypes"):
        MamlConfig(head_init="mean")


@pytest.mark.parametrize("args,message", [
    (["--data", "/nonexistent/omniglot"], "github.com/brendenlake/omniglot"),
    (["--ways", "5000"], "--ways 5000 is larger than"),
    (["--shots", "10", "--query", "15"], "above the 20 drawings"),
    (["--resume"], "--resume"),
    (["--meta-batch", "0"], "--meta-batch must be at least 1"),
    (["--val-inner-lr", "0"], "--val-inner-lr must be positive"),
    (["--ways", "3", "--val-ways", "2"], "pass --zero-head"),
    (["--val-query", "0"], "--val-query must be at least 1"),
    (["--val-ways", "1", "--zero-head"], "--val-ways must be at least 2"),
    (["--augment-shift", "14"], "--augment-shift must be a whole number of pixels from 0 to 13"),
    (["--augment-redraw", "1.5"], "--augment-redraw must be a probability from 0 to 1"),
    (["--augment-redraw-mix", "tilted=1"], "pass --augment-redraw P"),
    (["--augment-redraw", "0.5", "--augment-redraw-mix", "tilt=1"], "'tilt' is not a redrawing condition"),
    (["--augment-tilt", "40"], "pass --augment-redraw P"),
    (["--augment-redraw", "0.5", "--augment-tilt", "60"], "--augment-tilt must be a number of degrees from 10 to 45"),
])
def test_cli_bad_input_is_one_line(tmp_path, args, message):
    if "/nonexistent/omniglot" not in args:
        require_omniglot()
    result = cli("--out", str(tmp_path / "run"), "--iterations", "1", *args)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_cli_refuses_to_overwrite_a_run_and_evaluate_rejects_corrupt_checkpoint(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "latest.npz").write_bytes(b"precious")
    result = cli("--out", str(tmp_path / "run"), "--iterations", "1")
    assert result.returncode != 0 and "--resume" in result.stderr
    assert (tmp_path / "run" / "latest.npz").read_bytes() == b"precious"  # nothing lost
    result = cli("evaluate", "--checkpoint", str(tmp_path / "run" / "latest.npz"))  # read before any data
    assert result.returncode != 0 and result.stderr.startswith("error: ") and "corrupt" in result.stderr
    assert "Traceback" not in result.stderr


# --- what a new user hit: resume without --data, hard kills, write failures ----------------------------------------

SMALL_ARGS = ["--hidden", "16", "--meta-batch", "4", "--query", "3", "--inner-steps", "2", "--val-tasks", "20",
              "--first-order", "--threads", "1"]
NO_DATA_ENV = {k: v for k, v in os.environ.items() if k != "OMNIGLOT_DIR"}  # the run must find its data itself


def train_cli(*args, output=None):
    """`python -m train ARGS`, finished; with `output` (a file), started, writing stdout and stderr there (a
    pipe nobody reads would fill with the progress bar and stop the run)."""
    command = [sys.executable, "-m", "train", *args]
    if output:
        return subprocess.Popen(command, env=NO_DATA_ENV, stdout=output, stderr=subprocess.STDOUT, text=True,
                                preexec_fn=sigint_default)
    return subprocess.run(command, capture_output=True, text=True, env=NO_DATA_ENV, timeout=300)


def log(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def wait_for_rows(run, proc, rows: int, latest: bool = True) -> None:
    """Until the run has logged `rows` iterations (and saved `latest`)."""
    while (latest and not (run / "latest.npz").exists()) or not (run / "metrics.jsonl").exists() or sum(
            "loss" in r for r in log(run)) < rows:
        assert proc.poll() is None, "the run ended"
        time.sleep(0.05)


@needs_data
def test_a_run_remembers_its_data_and_ctrl_c_says_how_to_continue(tmp_path):
    run = tmp_path / "run"
    with open(tmp_path / "output", "w+") as output:
        proc = train_cli("--data", DATA, "--out", str(run), "--iterations", "1000", "--val-every", "1000", *SMALL_ARGS,
                         output=output)
        wait_for_rows(run, proc, 1, latest=False)  # Ctrl-C saves it
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
        output.seek(0)
        err = output.read()
    again = f"python -m train --out {run} --resume"
    assert proc.returncode == 130 and err.splitlines()[-1] == (
        f"error: interrupted; the last completed iteration is saved: continue with {again}"), err[-2000:]
    assert "loss=" in err and "val=" not in err  # the progress bar, with no validation figure before there is one
    assert log(run)[0]["data"] == os.path.abspath(DATA)
    stopped = load_checkpoint(run / "latest.npz").iteration
    done = train_cli(*shlex.split(again)[3:], "--iterations", str(stopped + 1))  # no --data, no OMNIGLOT_DIR
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.splitlines()[-1])
    assert summary["iterations"] == stopped + 1 and "seconds" not in summary
    assert 0 < summary["train_seconds"] and 0 < summary["wall_seconds"]  # named for what they count
    assert [r["data"] for r in log(run) if r.get("event") == "resume"] == [os.path.abspath(DATA)]
    elsewhere = str(tmp_path / "elsewhere")  # an explicit --data still wins over the recorded one
    moved = train_cli("--out", str(run), "--resume", "--iterations", str(stopped + 2), "--data", elsewhere)
    assert moved.returncode == 1 and f"Omniglot directory {elsewhere} does not exist" in moved.stderr, moved.stderr


@needs_data
@pytest.mark.slow
def test_sigkill_at_a_random_moment_then_resume_ends_as_an_uninterrupted_run(tmp_path):
    seed = random.randrange(2 ** 32)
    rng = random.Random(seed)
    args = [*SMALL_ARGS, "--iterations", "8", "--val-every", "4"]
    straight = train_cli("--data", DATA, "--out", str(tmp_path / "a"), *args)
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = tmp_path / "b"
    with open(tmp_path / "output", "w") as output:
        proc = train_cli("--data", DATA, "--out", str(killed), *args, "--save-every-seconds", "0", output=output)
        wait_for_rows(killed, proc, rng.randint(1, 5))
        time.sleep(rng.uniform(0, 0.3))
        proc.kill()  # SIGKILL: nothing is saved on the way out
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"seed {seed}: the run ended before the kill"
    lost = log(killed)
    resumed = train_cli("--out", str(killed), "--resume", "--threads", "1")  # its own data, recorded; the same
    # threads as the uninterrupted run (float sums in another order round differently)
    assert resumed.returncode == 0, f"seed {seed}: {resumed.stderr[-2000:]}"
    for name in ("latest", "best"):
        a, b = load_checkpoint(tmp_path / "a" / f"{name}.npz"), load_checkpoint(killed / f"{name}.npz")
        assert a.iteration == b.iteration and a.state["best_val_accuracy"] == b.state["best_val_accuracy"], seed
        for key in a.params:
            np.testing.assert_array_equal(a.params[key], b.params[key], err_msg=f"seed {seed}: {name} {key}")
        for key in a.optimizer:
            np.testing.assert_array_equal(a.optimizer[key], b.optimizer[key], err_msg=f"seed {seed}: {name} {key}")
    # the log reads as one run: each iteration and validation once, with the uninterrupted run's figures
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "data")} for r in rows  # noqa: E731
                          if r.get("event") in (None, "validation")]
    assert strip(log(killed)) == strip(log(tmp_path / "a")), f"seed {seed}; log before the resume: {lost}"
    assert [r["iteration"] for r in log(killed) if "loss" in r] == list(range(1, 9))


def test_train_out_that_cannot_be_written_is_one_line_before_the_data_is_read(tmp_path, read_only_dir):
    (tmp_path / "a-file").write_text("")
    for out, reason in ((read_only_dir / "run", "cannot write there"), (tmp_path / "a-file" / "run", "lies under the file")):
        done = train_cli("--out", str(out), "--iterations", "1")  # no data given: refused before it is looked for
        assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
        assert done.stderr.startswith(f"error: --out {out}") and reason in done.stderr


def test_a_garbage_checkpoint_is_refused_without_advice_to_unpickle_it(tmp_path):
    (tmp_path / "c.npz").write_bytes(b"certainly not a checkpoint " + os.urandom(2000))
    with pytest.raises(CheckpointError, match="not a .npz of plain arrays") as e:
        load_checkpoint(tmp_path / "c.npz")
    assert "unsafe" not in str(e.value) and "allow_pickle" not in str(e.value)


@pytest.mark.parametrize("shift,message", [(-1, "--support-shift must be a whole number of pixels from 0 to 13"),
                                           (14, "below half of --image-size 28"), (1.5, "got 1.5")])
def test_support_shift_out_of_range_is_a_config_error(shift, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        MamlConfig(support_shift=shift)
    config = MamlConfig(support_shift=2)
    assert config.layers[-1]["support_shift"] == 2
    assert MamlConfig.from_dict(json.loads(json.dumps(config.to_dict()))).support_shift == 2


@needs_data
@pytest.mark.slow
@pytest.mark.parametrize("first_order", [True, False])
def test_learned_step_sizes_train_resume_validate_and_export(tmp_path, first_order):
    """--learn-inner-lr: the step sizes start at --inner-lr, are trained (first and second order), resume
    exactly, validate as learned, and export as constants of the graph, validated against eager Paddle; an
    export for more steps than were learned, or with another --inner-lr, is refused before any work."""
    from maml_export.adapter import Adapter
    from maml_export.errors import ExportError
    from maml_export.export import export_model
    config = dict(SMALL, first_order=first_order, learn_inner_lr=True, inner_lr=0.3, head_init="prototypes",
                  zero_head=True, shots=2)
    train(MamlConfig(iterations=4, val_every=2, **config), DATA, tmp_path / "a", progress=False)
    train(MamlConfig(iterations=2, val_every=2, **config), DATA, tmp_path / "b", progress=False)
    train(MamlConfig(**config), DATA, tmp_path / "b", resume=True, overrides={"iterations": 4}, progress=False)
    a, b = load_checkpoint(tmp_path / "a" / "latest.npz"), load_checkpoint(tmp_path / "b" / "latest.npz")
    sizes = sorted(k for k in a.params if k.startswith("lslr."))
    assert sizes == ["lslr.bn1", "lslr.bn2", "lslr.bn3", "lslr.bn4", "lslr.conv1", "lslr.conv2", "lslr.conv3",
                     "lslr.conv4", "lslr.fc1"]
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k], err_msg=k)
    assert a.params["lslr.conv4"].shape == (2,) and not np.allclose(a.params["lslr.conv4"], 0.3)
    validation = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl") if '"validation"' in line]
    assert validation[-1]["inner_lr"]["conv4"] == [round(float(v), 6) for v in a.params["lslr.conv4"]]
    if not first_order:
        return
    with pytest.raises(ExportError, match="learned step sizes for 2 steps: pass --steps 2 or fewer"):
        export_model(tmp_path / "a" / "latest.npz", tmp_path / "x", steps=3, tasks=2, data=DATA)
    with pytest.raises(ExportError, match="leave out --inner-lr"):
        export_model(tmp_path / "a" / "latest.npz", tmp_path / "x", steps=2, inner_lr=0.1, tasks=2, data=DATA)
    assert not (tmp_path / "x").exists()
    report = export_model(tmp_path / "a" / "latest.npz", tmp_path / "x", steps=2, tasks=3, data=DATA)
    assert report.parity  # every comparison held (export_model raises otherwise)
    learned = json.loads(Adapter(tmp_path / "x" / "model.onnx").metadata["inner_lr_learned"])
    assert learned["conv4"] == [float(v) for v in a.params["lslr.conv4"]]
