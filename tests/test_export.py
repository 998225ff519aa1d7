"""The export: static graph, op check, ONNX contract and metadata, parity, the Adapter and both CLIs.

One export per module (fixture `exported`), with the bundled pretrained weights when they exist (parity on
trained weights is what matters, docs/design.md#gradients-written-in-forward-ops-convert), else freshly initialised ones. Real Omniglot
test tasks come from $OMNIGLOT_DIR or ../shared/omniglot; tests that need them skip when it is absent.
"""
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import paddle
import paddle.nn.functional as F
import pytest
from PIL import Image

from maml_export.adapter import Adapter
from maml_export.checkpoint import (PRETRAINED_DIR, Checkpoint, as_deployed, default_checkpoint, load_checkpoint,
                                    save_checkpoint)
from maml_export.config import MamlConfig
from maml_export.errors import CheckpointError, ExportError
from maml_export.export import export_model
from maml_export.onnx_convert import check_ops, convert, inspect_program
from maml_export.maml import MAML
from maml_export.model import Model, to_tensors
from maml_export.contract import RTOL, compare_logits

from conftest import DATA
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def run_cli(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    if default_checkpoint().is_file():
        return default_checkpoint()
    path = tmp_path_factory.mktemp("ckpt") / "init.npz"
    config = MamlConfig()
    return save_checkpoint(path, Checkpoint(config, Model.from_specs(config.layers).init_params(0)))


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    # query_norm "support": the default of every model trained since it exists (a no-op for such a checkpoint)
    report = export_model(checkpoint, out, steps=5, tasks=6, data=DATA, query_norm="support")
    return out, report


def deployed(checkpoint):
    """The checkpoint as `exported` exports it."""
    return as_deployed(load_checkpoint(checkpoint), query_norm="support")


TASK_BATCH = 3


@pytest.fixture(scope="module")
def exported_batch(checkpoint, tmp_path_factory):
    """The same weights and steps as `exported`, as a graph for TASK_BATCH tasks per call (parity: one call)."""
    out = tmp_path_factory.mktemp("export-batch")
    report = export_model(checkpoint, out, steps=5, tasks=2, data=DATA, task_batch=TASK_BATCH, query_norm="support")
    return out, report


@pytest.fixture(scope="module")
def omniglot(omniglot_dir):
    from maml_export.data import load_omniglot, split_characters
    return load_omniglot(omniglot_dir), split_characters()["test"]


def sample(omniglot, tasks, shots=1, seed=123):
    from maml_export.data import TaskSampler
    images, test = omniglot
    return TaskSampler(images, test, ways=5, shots=shots, query=15, seed=seed).sample(tasks)


def eager_logits(ckpt, x_spt, y_spt, x_qry, steps=5, dtype="float32"):
    """The reference: MAML.adapt/predict in eager Paddle, one task (T=1)."""
    model = Model.from_specs(ckpt.config.layers)
    maml = MAML(model, to_tensors(ckpt.params, dtype), ckpt.config.inner_lr, steps)
    xs, ys, xq = (paddle.to_tensor(a).unsqueeze(0) for a in (x_spt, y_spt, x_qry))
    with paddle.no_grad():
        return maml.predict(maml.adapt(xs.astype(dtype), ys), xq.astype(dtype))[0].numpy()


def assert_matches_eager(ckpt, got, x_spt, y_spt, x_qry):
    """Within RTOL of eager float32, or (a max-pool near-tie rounded the other way) of eager float64."""
    c = compare_logits(got, eager_logits(ckpt, x_spt, y_spt, x_qry))
    if not c["ok"]:
        c = compare_logits(got, eager_logits(ckpt, x_spt, y_spt, x_qry, dtype="float64"))
    assert c["ok"], c
    return c


# --- files, ops, graph, metadata -------------------------------------------------------------------------

def test_export_writes_every_file(exported):
    out, report = exported
    for name in ("model.json", "model.pdiparams", "model.onnx", "adapt.onnx", "predict.onnx", "export.json"):
        assert (out / name).stat().st_size > 0, name
    doc = json.loads((out / "export.json").read_text())
    assert doc["parity"]["passed"] and doc["steps"] == 5
    assert set(doc["versions"]) >= {"paddle", "paddle2onnx", "onnx", "onnxruntime", "maml_export"}
    assert len(doc["timings_s"]) == 6 and doc["onnx_ops"]["model"] == report.ops
    assert {"adapt → predict vs model.onnx", "each query alone vs in its batch"} <= set(doc["parity"]["results"])
    assert all(Path(f).is_file() for f in report.files.values())


def test_static_program_holds_only_convertible_ops(exported):
    from paddle2onnx.paddle2onnx_cpp2py_export import get_all_supported_operators_pir
    out, _ = exported
    ops = inspect_program(out / "model").ops
    check_ops(ops)  # raises on any offender
    assert not [op for op in ops if op.endswith("_grad") or "unpool" in op or "batch_norm" in op], ops
    assert "pd_op.conv2d" in ops and "pd_op.conv2d_transpose" in ops  # forward and hand-written backward
    assert "max_pool2d_with_index" not in ops  # the eager-only max-pool path stayed out of the graph
    assert len(get_all_supported_operators_pir()) > 100


def test_onnx_graph_is_valid_and_follows_the_contract(exported):
    out, _ = exported
    model = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)

    def sig(vi):
        t = vi.type.tensor_type
        return vi.name, t.elem_type, [d.dim_param or d.dim_value for d in t.shape.dim]

    f32, i64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    assert [sig(i) for i in model.graph.input] == [("x_spt", f32, ["S", 1, 28, 28]), ("y_spt", i64, ["S"]),
                                                  ("x_qry", f32, ["Q", 1, 28, 28])]
    assert [sig(o) for o in model.graph.output] == [("logits", f32, ["Q", 5])]
    used = {i for n in model.graph.node for i in n.input}
    assert all(t.name in used for t in model.graph.initializer)  # no unused initializer (docs/design.md#raw-export-leaves-unused-initializers)
    assert not [n for n in model.graph.node if n.op_type in ("Identity", "BatchNormalization")]
    # paddle2onnx 2.1.0 gives a pad3d's Pad an uninitialised constant: no Pad may carry a constant input
    # (F.unfold's Pads have none and pad with 0)
    assert not [n.name for n in model.graph.node if n.op_type == "Pad" and len(n.input) > 2 and n.input[2]]


def test_metadata(exported, checkpoint):
    out, _ = exported
    ckpt = deployed(checkpoint)
    meta = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert (meta["ways"], meta["steps"], meta["image_size"], meta["channels"]) == ("5", "5", "28", "1")
    assert float(meta["inner_lr"]) == ckpt.config.inner_lr
    assert meta["head_init"] == ckpt.config.head_init == Adapter(out / "model.onnx").head_init
    assert meta["config_name"] == ckpt.config.name and "ink 1.0" in meta["input_range"]
    assert json.loads(meta["config"]) == ckpt.config.to_dict()
    # the bundle's temperature was fitted on validation tasks: recorded, so deployments know its probabilities hold
    calibration = json.loads(meta["calibration"])
    assert calibration["temperature"] == float(meta["temperature"]) and calibration["split"] == "val"
    assert Adapter(out / "model.onnx").calibrated
    h = hashlib.sha256()  # the scheme the metadata states, recomputed here
    for name in sorted(ckpt.params):
        a = np.ascontiguousarray(ckpt.params[name], dtype="<f4")
        h.update(name.encode() + b"\0" + json.dumps(list(a.shape)).encode() + b"\0" + a.tobytes())
    assert meta["weights_sha256"] == h.hexdigest()


def test_onnxruntime_loads_without_a_warning(exported):
    out, _ = exported
    code = ("import onnxruntime as ort, sys\n"
            "ort.set_default_logger_severity(2)\n"
            "o = ort.SessionOptions(); o.log_severity_level = 2\n"
            f"ort.InferenceSession({str(out / 'model.onnx')!r}, o, providers=['CPUExecutionProvider'])\n"
            "print('loaded')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "loaded\n", done.stderr
    assert done.stderr == ""
    # the check can fail: the raw paddle2onnx graph does warn (one line per dead initializer)
    raw = out / "raw"
    convert(out / "model", raw.with_suffix(".onnx"), 17)
    code = code.replace(str(out / "model.onnx"), str(raw.with_suffix(".onnx")))
    assert "It is not used by any node" in subprocess.run([sys.executable, "-c", code], capture_output=True,
                                                          text=True, timeout=120).stderr


# --- parity and accuracy on real tasks -----------------------------------------------------------------

def test_export_parity_on_omniglot_tasks(exported, omniglot):
    out, report = exported
    doc = json.loads((out / "export.json").read_text())["parity"]
    assert doc["source"].startswith("Omniglot test tasks") and doc["passed"]
    for name in ("static vs eager", "onnxruntime vs eager", "onnxruntime vs static"):
        r = report.parity[name]
        assert r["ok"] and r["tasks"] == 6 and r["median_rel"] <= RTOL, (name, r)
    assert report.parity["static vs eager"]["max_rel"] <= 1e-5  # same kernels: nothing to drift


def test_accuracy_on_20_test_tasks_equals_eager(exported, omniglot, checkpoint):
    out, _ = exported
    ckpt, adapter = deployed(checkpoint), Adapter(out / "model.onnx")
    t = sample(omniglot, 20)
    acc_onnx, acc_eager = [], []
    for i in range(20):
        got = adapter.predict(t.x_spt[i], t.y_spt[i], t.x_qry[i])
        ref = eager_logits(ckpt, t.x_spt[i], t.y_spt[i], t.x_qry[i])
        c = compare_logits(got, ref)
        if not c["ok"]:  # a max-pool near-tie: the float64 run decides which rounding was right
            ref = eager_logits(ckpt, t.x_spt[i], t.y_spt[i], t.x_qry[i], dtype="float64")
            assert compare_logits(got, ref)["ok"], i
        assert (got.argmax(1) == ref.argmax(1)).all(), i
        acc_onnx.append((got.argmax(1) == t.y_qry[i]).mean())
        acc_eager.append((ref.argmax(1) == t.y_qry[i]).mean())
    assert np.mean(acc_onnx) == np.mean(acc_eager)
    if default_checkpoint().is_file():
        assert np.mean(acc_onnx) > 0.8  # trained 5-way 1-shot weights


@pytest.mark.parametrize("bundled", sorted(PRETRAINED_DIR.glob("*.npz")), ids=lambda p: p.stem)
@pytest.mark.slow
def test_bundled_weights_are_trained_for_their_ways(bundled, omniglot):
    """Every shipped checkpoint (docs/pretrained.md) says how it was made and chosen, and adapts well on real test tasks
    of its own number of ways (chance: 1/ways)."""
    from maml_export.data import TaskSampler
    ckpt = load_checkpoint(bundled.stem)  # by name, as `--checkpoint omniglot-20w1s` takes it
    assert ckpt.state["command"].startswith("python -m train")
    # the run's best on validation, or (train bundle --checkpoint) the chosen checkpoint's own validation
    assert ckpt.state.get("best_val_accuracy", ckpt.state.get("val_accuracy", 0)) > 0.9
    run = ckpt.state.get("run", ckpt.config.name)  # the run it came from: its metrics log ships beside it
    assert any(log.is_file() for log in (bundled.with_suffix(".metrics.jsonl"), bundled.parent / f"{run}.metrics.jsonl"))
    # named by what it is (its ways and shots): the name exports, maml-web and errors show
    assert bundled.stem.endswith(f"-{ckpt.config.ways}w1s") and ckpt.config.name == bundled.stem
    images, test = omniglot
    t = TaskSampler(images, test, ways=ckpt.config.ways, shots=1, query=15, seed=5).sample(4)
    accuracy = np.mean([(eager_logits(ckpt, t.x_spt[i], t.y_spt[i], t.x_qry[i]).argmax(1) == t.y_qry[i]).mean()
                        for i in range(4)])
    assert accuracy > 0.8, accuracy


@pytest.mark.slow
def test_a_meta_learned_head_exports_too(omniglot, tmp_path):
    """The bundled 5-way weights start each task's head from the support's prototypes; `maml-export --head-init
    meta` exports them with the meta-learned (here zero) head instead, validated as well, another function."""
    from maml_export.checkpoint import as_deployed
    done = run_cli("export", "--head-init", "meta", "--tasks", "3", "--data", DATA, "--out", str(tmp_path / "meta"))
    assert done.returncode == 0, done.stdout + done.stderr
    adapter = Adapter(tmp_path / "meta" / "model.onnx")
    # 3 parity lines, adapt -> predict, and (query_norm "support") each query alone
    checks = 5 if adapter.query_norm == "support" else 4
    assert sum(ln.lstrip().startswith("✓") for ln in done.stdout.splitlines()) == checks
    assert adapter.head_init == "meta"
    t = sample(omniglot, 1)
    logits = adapter.predict(t.x_spt[0], t.y_spt[0], t.x_qry[0])
    assert_matches_eager(as_deployed(load_checkpoint(default_checkpoint()), head_init="meta"), logits,
                         t.x_spt[0], t.y_spt[0], t.x_qry[0])
    bundled = load_checkpoint(default_checkpoint())
    if bundled.config.head_init == "prototypes":
        assert not np.allclose(logits, eager_logits(bundled, t.x_spt[0], t.y_spt[0], t.x_qry[0]), atol=1e-3)
    bad = run_cli("export", "--head-init", "mean", "--out", str(tmp_path / "bad"))
    assert bad.returncode != 0 and bad.stderr.strip().splitlines() == [
        "error: --head-init must be one of meta, prototypes, got 'mean'"]


def test_an_unknown_checkpoint_name_lists_the_bundled_ones():
    with pytest.raises(CheckpointError, match="does not exist .*bundled name: .*omniglot-5w1s"):
        load_checkpoint("omniglot-7w1s")


@pytest.mark.parametrize("shots,queries", [(1, [1, 7, 75]), (5, [3, 75])])
def test_dynamic_support_and_query_sizes(exported, omniglot, checkpoint, shots, queries):
    out, _ = exported
    ckpt, adapter = deployed(checkpoint), Adapter(out / "model.onnx")
    t = sample(omniglot, 1, shots=shots, seed=7)
    assert t.x_spt.shape[1] == 5 * shots
    first = []
    for q in queries:
        got = adapter.predict(t.x_spt[0], t.y_spt[0], t.x_qry[0, :q])
        assert got.shape == (q, 5) and got.dtype == np.float32
        assert_matches_eager(ckpt, got, t.x_spt[0], t.y_spt[0], t.x_qry[0, :q])
        first.append(got[0])
    # queries are normalised with the support set's statistics: the first image's logits do not depend on
    # which other images are in the batch (relative to the logits' scale, as the parity compares)
    scale = np.abs(first[-1]).max()
    assert max(np.abs(f - first[-1]).max() for f in first) <= 1e-5 * scale


@pytest.mark.slow
def test_transductive_export_makes_a_query_depend_on_its_batch(omniglot, tmp_path):
    """--query-norm transductive: the queries are normalised together, as the MAML paper's code does, so the first
    image's logits depend on which other images are in the batch; the export says so instead of checking it."""
    done = run_cli("export", "--query-norm", "transductive", "--tasks", "2", "--data", DATA, "--out",
                   str(tmp_path / "td"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "each query alone vs in its batch: not checked: --query-norm transductive" in done.stdout
    adapter = Adapter(tmp_path / "td")
    assert adapter.query_norm == "transductive"
    t = sample(omniglot, 1, seed=7)
    first = [adapter.predict(t.x_spt[0], t.y_spt[0], t.x_qry[0, :q])[0] for q in (1, 75)]
    assert np.abs(first[0] - first[1]).max() > 1e-3 * np.abs(first[1]).max()


# --- adapt once, predict many: adapt.onnx, predict.onnx, Task ---------------------------------------------

def test_split_graphs_follow_the_contract(exported):
    """adapt.onnx: x_spt, y_spt -> the state, named; predict.onnx: exactly those names + x_qry -> logits [Q, ways];
    the same metadata as model.onnx (but for which graph it is); each loads in onnxruntime without a warning."""
    out, _ = exported
    graphs = {name: onnx.load(str(out / f"{name}.onnx")) for name in ("model", "adapt", "predict")}
    adapt, predict = graphs["adapt"].graph, graphs["predict"].graph
    assert [i.name for i in adapt.input] == ["x_spt", "y_spt"]
    state = [o.name for o in adapt.output]
    assert state[:3] == ["conv1.weight", "bn1.weight", "bn1.bias"] and state[-2:] == ["bn4.mean", "bn4.var"]
    assert [i.name for i in predict.input] == state + ["x_qry"] and [o.name for o in predict.output] == ["logits"]
    dims = lambda vi: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]  # noqa: E731
    assert dims(predict.input[-1]) == ["Q", 1, 28, 28] and dims(predict.output[0]) == ["Q", 5]
    assert {o.name: dims(o) for o in adapt.output} == {i.name: dims(i) for i in predict.input[:-1]}
    assert not predict.initializer or all(t.name in {i for n in predict.node for i in n.input} for t in predict.initializer)
    meta = {name: {p.key: p.value for p in g.metadata_props} for name, g in graphs.items()}
    assert {meta[k].pop("graph") for k in meta} == {"model", "adapt", "predict"}
    assert meta["adapt"] == meta["model"] == meta["predict"] and meta["model"]["query_norm"] == "support"
    for name in ("adapt", "predict"):
        code = ("import onnxruntime as ort\no = ort.SessionOptions(); o.log_severity_level = 2\n"
                f"ort.InferenceSession({str(out / (name + '.onnx'))!r}, o, providers=['CPUExecutionProvider'])\n")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stderr == "", (name, done.stderr)


def test_adapt_once_predict_many_equals_the_fused_graph_one_query_at_a_time(exported, omniglot):
    """A task learned once classifies each query alone as model.onnx classifies the batch (relative 1e-5), with the
    plain onnxruntime recipe of the README: adapt's outputs fed into predict by name."""
    import onnxruntime as ort
    out, _ = exported
    t = sample(omniglot, 2, seed=21)
    adapt, predict = (ort.InferenceSession(str(out / f), providers=["CPUExecutionProvider"])
                      for f in ("adapt.onnx", "predict.onnx"))
    fused = Adapter(out)
    for i in range(2):
        names = [o.name for o in adapt.get_outputs()]
        state = dict(zip(names, adapt.run(None, {"x_spt": t.x_spt[i], "y_spt": t.y_spt[i]})))
        alone = np.concatenate([predict.run(["logits"], {**state, "x_qry": t.x_qry[i, q:q + 1]})[0]
                                for q in range(75)])
        want = fused.predict(t.x_spt[i], t.y_spt[i], t.x_qry[i])
        assert compare_logits(alone, want, 1e-5)["ok"] and (alone.argmax(1) == want.argmax(1)).all(), i
        task = fused.adapt(t.x_spt[i], t.y_spt[i])
        np.testing.assert_array_equal(task.predict(t.x_qry[i]), predict.run(["logits"], {**state, "x_qry": t.x_qry[i]})[0])


def test_task_save_load_and_refusal_by_another_model(exported, exported_batch, tmp_path, checkpoint):
    """Task.save -> Adapter.load_task gives the same predictions without the support set; a task learned by another
    model (other weights) is refused in one line; a task-batch export has no halves."""
    out, _ = exported
    adapter = Adapter(out)
    rng = np.random.default_rng(3)
    xs, ys, xq = rng.random((5, 1, 28, 28)) * (rng.random((5, 1, 28, 28)) > 0.8), np.arange(5), rng.random((6, 1, 28, 28))
    task = adapter.adapt(xs, ys, classes=list("abcde"))
    path = tmp_path / "task.npz"
    task.save(path)
    again = adapter.load_task(path)
    assert again.classes == list("abcde") and again.support_size == 5
    np.testing.assert_array_equal(again.predict(xq), task.predict(xq))
    p = again.predict_proba(xq)
    assert p.shape == (6, 5) and np.allclose(p.sum(1), 1, atol=1e-6)
    with np.load(path, allow_pickle=False) as data:  # plain arrays and a JSON string: no pickle
        assert "meta" in data.files and all(k == "meta" or k.startswith("state/") for k in data.files)
    # another model: the same graphs' metadata with other weights, as a second export of altered weights
    other = load_checkpoint(checkpoint)
    other.params["conv1.weight"] = other.params["conv1.weight"] * 1.01
    other_ckpt = save_checkpoint(tmp_path / "other.npz", other)
    export_model(other_ckpt, tmp_path / "other", steps=5, tasks=1, query_norm="support")
    with pytest.raises(ValueError, match="was learned by another model") as e:
        Adapter(tmp_path / "other").load_task(path)
    assert "\n" not in str(e.value)
    (tmp_path / "junk.npz").write_bytes(b"not a task")
    with pytest.raises(ValueError, match="is not a task file"):
        adapter.load_task(tmp_path / "junk.npz")
    with pytest.raises(ValueError, match="no adapt/predict halves"):
        Adapter(exported_batch[0]).adapt(np.stack([xs] * TASK_BATCH), np.stack([ys] * TASK_BATCH))
    with pytest.raises(ValueError, match="x_qry must have shape"):
        task.predict(xq[:, 0])


# --- Adapter -------------------------------------------------------------------------------------------------

def test_adapter_reads_metadata_and_rejects_bad_input(exported):
    out, _ = exported
    a = Adapter(out / "model.onnx")
    assert (a.ways, a.steps, a.image_shape) == (5, 5, (1, 28, 28))
    rng = np.random.default_rng(0)
    xs, ys, xq = rng.random((5, 1, 28, 28)), np.arange(5), rng.random((4, 1, 28, 28))
    assert a.predict(xs, ys.astype(float), xq.astype(np.float64)).shape == (4, 5)  # convertible dtypes
    p = a.predict_proba(xs, ys, xq)
    assert np.allclose(p.sum(1), 1, atol=1e-6)
    nan = xq.copy()
    nan[0, 0, 3, 3] = np.nan
    bad = {
        "must have shape [N, 1, 28, 28]": (xs[:, :, :27], ys, xq),
        "x_qry must have shape": (xs, ys, xq[:, 0]),
        "y_spt must have shape [5]": (xs, ys[:4], xq),
        "outside 0..4": (xs, np.array([0, 1, 2, 3, 5]), xq),
        "no image of class 4": (xs, np.array([0, 1, 2, 3, 3]), xq),
        "NaN or infinite": (xs, ys, nan),
        "integer labels": (xs, np.array([0, 1, 2, 3, 4.5]), xq),
        "must hold numbers": (xs.astype(str), ys, xq),
        "holds no images": (xs, ys, xq[:0]),
    }
    for message, args in bad.items():
        with pytest.raises(ValueError, match=re.escape(message)) as e:
            a.predict(*args)
        assert "\n" not in str(e.value)


def test_adapter_needs_no_paddle(exported):
    out, _ = exported
    code = (f"import sys; from maml_export.adapter import Adapter; a = Adapter({str(out / 'model.onnx')!r}); "
            "assert 'paddle' not in sys.modules, 'paddle imported'; print(a.ways)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "5", done.stderr


# --- a batch of tasks per call (--task-batch) -----------------------------------------------------------------

def test_task_batch_graph_contract_metadata_and_parity(exported, exported_batch):
    out, report = exported_batch
    model = onnx.load(str(out / "model.onnx"))
    dims = lambda vi: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]  # noqa: E731
    T = TASK_BATCH
    assert [(i.name, dims(i)) for i in model.graph.input] == [("x_spt", [T, "S", 1, 28, 28]), ("y_spt", [T, "S"]),
                                                             ("x_qry", [T, "Q", 1, 28, 28])]
    assert [(o.name, dims(o)) for o in model.graph.output] == [("logits", [T, "Q", 5])]
    meta = {p.key: p.value for p in model.metadata_props}
    single = {p.key: p.value for p in onnx.load(str(exported[0] / "model.onnx")).metadata_props}
    assert meta["task_batch"] == str(T) and single["task_batch"] == "0"
    assert meta["weights_sha256"] == single["weights_sha256"] and meta["steps"] == single["steps"] == "5"
    assert meta["input_layout"].startswith(f"x_spt [{T}, S, C, H, W]")
    # the same checks as the single-task graph: convertible ops, cleaned (no unused initializer, no Identity)
    check_ops(inspect_program(out / "model").ops)
    used = {i for n in model.graph.node for i in n.input}
    assert all(t.name in used for t in model.graph.initializer)
    assert not [n for n in model.graph.node if n.op_type in ("Identity", "BatchNormalization")]
    doc = json.loads((out / "export.json").read_text())
    assert doc["task_batch"] == T and doc["parity"]["passed"]
    for name in ("static vs eager", "onnxruntime vs eager", "onnxruntime vs static"):
        assert report.parity[name]["ok"] and report.parity[name]["tasks"] == T, name  # --tasks 2, rounded up to T
    code = ("import onnxruntime as ort\no = ort.SessionOptions(); o.log_severity_level = 2\n"
            f"ort.InferenceSession({str(out / 'model.onnx')!r}, o, providers=['CPUExecutionProvider'])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_single_task_adaptation_stops_at_a_fixed_point_task_batches_run_every_step(exported, exported_batch):
    """adapt.onnx and model.onnx nest one `If` per SGD step (maml.steps_to_fixed_point), predict.onnx has none, and
    the task-batched graph runs every step with no `If` (a CUDA graph captures none)."""
    from maml_export.onnx_convert import nested_nodes
    out, _ = exported

    def ifs(path):
        g = onnx.load(str(path)).graph
        return sum(n.op_type == "If" for n in g.node), sum(n.op_type == "If" for n in nested_nodes(g.node))

    assert ifs(out / "adapt.onnx") == ifs(out / "model.onnx") == (1, 4)  # 5 steps: one If each, nested
    assert ifs(out / "predict.onnx") == ifs(exported_batch[0] / "model.onnx") == (0, 0)
    meta = lambda path: {p.key: p.value for p in onnx.load(str(path)).metadata_props}  # noqa: E731
    assert meta(out / "adapt.onnx")["every_step"] == meta(out / "model.onnx")["every_step"] == "0"
    assert meta(exported_batch[0] / "model.onnx")["every_step"] == "1"
    assert not json.loads((out / "export.json").read_text())["every_step"]


def test_adapt_onnx_stops_at_a_fixed_point_and_only_there(exported, tmp_path):
    """The shipped weights' steps all run (their 1-shot support loss is not saturated: each step's gradient is
    not zero). The same weights with their features x16 (`train bundle --feature-scale 16`: prototype logits
    x256) saturate it exactly in onnxruntime (one-hot softmax): adapt.onnx runs no backward pass (no
    ConvTranspose) and gives the state of every step."""
    from maml_export.checkpoint import save_checkpoint
    from maml_export.data import synthetic_tasks
    from maml_export.bench.profile import executed_ops, steps_run
    out, _ = exported
    ckpt = deployed(default_checkpoint()) if default_checkpoint().is_file() else None
    if ckpt is None or ckpt.config.head_init != "prototypes":
        pytest.skip("needs the bundled prototype-head weights")
    t = synthetic_tasks(1, 5, 1, 15, seed=2)
    feeds = {"x_spt": t.x_spt[0], "y_spt": t.y_spt[0]}
    ran = executed_ops(out / "adapt.onnx", feeds)
    assert ran["ConvTranspose"] == 5 * 3, ran  # 5 steps x the input gradients of conv2..conv4
    assert steps_run(out / "adapt.onnx", feeds, ckpt.config.layers) == 5
    scaled = as_deployed(ckpt, feature_scale=16)
    save_checkpoint(tmp_path / "scaled.npz", scaled)
    export_model(tmp_path / "scaled.npz", tmp_path / "scaled", steps=5, tasks=2, data=DATA)
    ran = executed_ops(tmp_path / "scaled" / "adapt.onnx", feeds)
    assert ran["Conv"] > 0 and ran["ConvTranspose"] == 0, ran
    assert steps_run(tmp_path / "scaled" / "adapt.onnx", feeds, scaled.config.layers) == 0
    assert_matches_eager(scaled, Adapter(tmp_path / "scaled").adapt(t.x_spt[0], t.y_spt[0]).predict(t.x_qry[0]),
                         t.x_spt[0], t.y_spt[0], t.x_qry[0])


def test_every_step_export_runs_every_step_where_the_default_stops(exported, tmp_path):
    """maml-export --every-step: adapt.onnx and model.onnx without any `If`, so that the weights x16, whose
    support loss saturates (the default graphs run no step: see above), run all 5 steps, with the same result;
    recorded in the metadata and export.json, parity checked as always."""
    from maml_export.contract import every_step
    from maml_export.data import synthetic_tasks
    from maml_export.onnx_convert import nested_nodes
    from maml_export.bench.profile import steps_run
    ckpt = deployed(default_checkpoint()) if default_checkpoint().is_file() else None
    if ckpt is None or ckpt.config.head_init != "prototypes":
        pytest.skip("needs the bundled prototype-head weights")
    scaled = as_deployed(ckpt, feature_scale=16)
    save_checkpoint(tmp_path / "scaled.npz", scaled)
    data = ("--data", DATA) if DATA else ()  # parity on made-up characters where Omniglot is absent
    done = run_cli("export", "--checkpoint", str(tmp_path / "scaled.npz"), "--every-step", "--tasks", "2", *data,
                   "--out", str(tmp_path / "every"))
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "every"
    for name in ("adapt.onnx", "model.onnx"):
        model = onnx.load(str(out / name))
        assert not [n for n in list(model.graph.node) + nested_nodes(model.graph.node) if n.op_type == "If"], name
        assert every_step({p.key: p.value for p in model.metadata_props}), name
    doc = json.loads((out / "export.json").read_text())
    assert doc["every_step"] and doc["metadata"]["every_step"] == "1" and doc["parity"]["passed"]
    t = synthetic_tasks(1, 5, 1, 15, seed=2)
    assert steps_run(out / "adapt.onnx", {"x_spt": t.x_spt[0], "y_spt": t.y_spt[0]}, scaled.config.layers) == 5
    assert_matches_eager(scaled, Adapter(out).adapt(t.x_spt[0], t.y_spt[0]).predict(t.x_qry[0]),
                         t.x_spt[0], t.y_spt[0], t.x_qry[0])


def test_task_batch_logits_equal_single_task_logits(exported, exported_batch, omniglot, checkpoint):
    ckpt = deployed(checkpoint)
    single, batch = Adapter(exported[0] / "model.onnx"), Adapter(exported_batch[0] / "model.onnx")
    assert (single.task_batch, batch.task_batch) == (0, TASK_BATCH)
    t = sample(omniglot, TASK_BATCH, seed=11)
    got = batch.predict(t.x_spt, t.y_spt, t.x_qry[:, :40])  # any Q: 40 of the 75 queries
    assert got.shape == (TASK_BATCH, 40, 5) and got.dtype == np.float32
    assert np.allclose(batch.predict_proba(t.x_spt, t.y_spt, t.x_qry[:, :40]).sum(-1), 1, atol=1e-6)
    for i in range(TASK_BATCH):  # each task as if it were adapted alone, by the single-task graph and by eager
        assert compare_logits(got[i], single.predict(t.x_spt[i], t.y_spt[i], t.x_qry[i, :40]))["ok"], i
        assert_matches_eager(ckpt, got[i], t.x_spt[i], t.y_spt[i], t.x_qry[i, :40])


def test_task_batch_adapter_rejects_bad_batches(exported_batch):
    a, T = Adapter(exported_batch[0] / "model.onnx"), TASK_BATCH
    rng = np.random.default_rng(0)
    xs, ys, xq = rng.random((T, 5, 1, 28, 28)), np.tile(np.arange(5), (T, 1)), rng.random((T, 4, 1, 28, 28))
    assert a.predict(xs, ys, xq).shape == (T, 4, 5)
    missing = ys.copy()
    missing[1, 4] = 0  # task 1 lacks class 4
    nan = xs.copy()
    nan[2, 0, 0, 1, 1] = np.inf
    bad = {
        "task 1's support set has no image of class 4": (xs, missing, xq),
        f"x_spt must have shape [{T}, N, 1, 28, 28]": (xs[0], ys[0], xq[0]),  # one task to a batched graph
        f"x_qry must have shape [{T}, N, 1, 28, 28]": (xs, ys, xq[:T - 1]),
        f"y_spt must have shape [{T}, 5]": (xs, ys[:, :4], xq),
        "outside 0..4": (xs, np.where(ys == 4, 7, ys), xq),
        "NaN or infinite": (nan, ys, xq),
    }
    for message, args in bad.items():
        with pytest.raises(ValueError, match=re.escape(message)) as e:
            a.predict(*args)
        assert "\n" not in str(e.value)


# --- maml-predict ----------------------------------------------------------------------------------------------

def write_drawing(paper: np.ndarray, path: Path, mode: str) -> None:
    """A 105x105 Omniglot paper mask (True = paper) as an image file: black ink on white paper."""
    gray = np.where(paper, 255, 0).astype(np.uint8)
    image = Image.fromarray(gray)
    if mode == "RGBA":  # transparent paper: must still read as paper
        image = Image.fromarray(np.dstack([gray * 0, gray * 0, gray * 0, 255 - gray]).astype(np.uint8), "RGBA")
    elif mode != "L":
        image = image.convert(mode)
    image.save(path)


def test_maml_predict_on_a_folder_tree(exported, omniglot, tmp_path):
    from export.predict import load_image
    from maml_export.images import Preprocessing
    out, _ = exported
    images, test = omniglot
    raw = {}  # the 105x105 drawings, to write real image files from
    for half in ("background", "evaluation"):
        with np.load(os.path.join(DATA, f"images_{half}.npz")) as z:
            raw[half] = z["images"]
    drawings = np.concatenate([raw["background"], raw["evaluation"]])  # protocol numbering
    chars = test[:5]  # five test characters, unrotated
    names = ["kappa", "alpha", "zeta", "beta", "mu"]  # sorted: alpha beta kappa mu zeta
    modes = ["1", "L", "RGB", "RGBA", "P"]
    for c, name, mode in zip(chars, names, modes):
        (tmp_path / "support" / name).mkdir(parents=True)
        write_drawing(drawings[c, 0], tmp_path / "support" / name / "0.png", mode)
    (tmp_path / "query").mkdir()
    truth = {}
    for c, name in zip(chars, names):
        for d in range(1, 4):
            file = f"{name}_{d}.png"
            write_drawing(drawings[c, d], tmp_path / "query" / file, modes[d])
            truth[file] = name
    (tmp_path / "query" / "notes.txt").write_text("not an image")  # skipped

    # the files read back as the protocol's pixels, bit for bit, whatever their mode
    for c, name in zip(chars, names):
        assert np.array_equal(load_image(tmp_path / "support" / name / "0.png", Preprocessing())[0], images[c, 0])

    done = run_cli("export.predict", "--model", str(out / "model.onnx"), "--support", str(tmp_path / "support"),
                   "--query", str(tmp_path / "query"), "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["classes"] == sorted(names) and doc["support"] == {n: 1 for n in names}
    preds = {p["file"]: p for p in doc["predictions"]}
    assert sorted(preds) == sorted(truth)
    # the same as the Adapter on the protocol's pixels, labels named by the sorted folder names
    order = sorted(range(5), key=lambda i: names[i])
    x_spt = np.stack([images[chars[i], 0][None] for i in order])
    files = sorted(truth)
    x_qry = np.stack([images[chars[names.index(truth[f])], int(f[-5])][None] for f in files])
    expected = Adapter(out / "model.onnx").predict_proba(x_spt, np.arange(5), x_qry)
    for f, p in zip(files, expected):
        assert preds[f]["class"] == sorted(names)[p.argmax()]
        assert abs(preds[f]["probability"] - p.max()) < 1e-5
    if default_checkpoint().is_file():  # trained weights: the labels are right
        assert np.mean([preds[f]["class"] == truth[f] for f in files]) >= 0.8

    table = run_cli("export.predict", "--model", str(out / "model.onnx"), "--support", str(tmp_path / "support"),
                    "--query", str(tmp_path / "query"))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert len(lines) == len(files)
    for line, f in zip(lines, files):
        file, cls, prob = line.split()
        assert (file, cls) == (f, preds[f]["class"]) and abs(float(prob) - preds[f]["probability"]) < 1e-3

    # learn once (--save-task), classify later without the support images (--task): the same answers
    saved = run_cli("export.predict", "--model", str(out), "--support", str(tmp_path / "support"),
                    "--save-task", str(tmp_path / "task.npz"))
    assert saved.returncode == 0 and "saved the task (alpha, beta, kappa, mu, zeta)" in saved.stdout, saved.stderr
    later = run_cli("export.predict", "--model", str(out), "--task", str(tmp_path / "task.npz"),
                    "--query", str(tmp_path / "query"), "--json")
    assert later.returncode == 0, later.stderr
    assert [(p["file"], p["class"]) for p in json.loads(later.stdout)["predictions"]] == [
        (p["file"], p["class"]) for p in doc["predictions"]]
    unsure = run_cli("export.predict", "--model", str(out), "--task", str(tmp_path / "task.npz"),
                     "--query", str(tmp_path / "query"), "--unknown-below", "1", "--json")
    for p, q in zip(json.loads(unsure.stdout)["predictions"], doc["predictions"]):  # unknown: below the threshold
        assert p["class"] == ("unknown" if q["probability"] < 1 else q["class"]), (p, q)
    both = run_cli("export.predict", "--model", str(out), "--task", str(tmp_path / "task.npz"),
                   "--support", str(tmp_path / "support"), "--query", str(tmp_path / "query"))
    assert both.returncode == 2 and "exactly one of --support" in both.stderr and both.stderr.count("\n") == 1

    (tmp_path / "support" / "extra").mkdir()
    wrong = run_cli("export.predict", "--model", str(out / "model.onnx"), "--support", str(tmp_path / "support"),
                    "--query", str(tmp_path / "query"))
    assert wrong.returncode != 0 and wrong.stdout == ""
    assert wrong.stderr.count("\n") == 1 and wrong.stderr.startswith("error: --support")
    assert "5-way" in wrong.stderr and "Traceback" not in wrong.stderr


def test_quick_start_examples_are_written_and_classified(exported, omniglot_dir, tmp_path):
    """`maml-train examples` writes support/<class>/ and a flat query/ from Omniglot's evaluation set, and
    maml-predict, as the quick start runs it, names a class for every query image (the right one, nearly always:
    the file names tell); a query folder laid out like --support is refused saying the query folder is flat."""
    out = tmp_path / "examples"
    done = run_cli("train", "examples", "--out", str(out), "--data", omniglot_dir)
    assert done.returncode == 0, done.stderr
    classes = sorted(p.name for p in (out / "support").iterdir())
    assert len(classes) == 5 and all(len(list((out / "support" / c).glob("*.png"))) == 1 for c in classes)
    queries = sorted((out / "query").iterdir())
    assert len(queries) == 15 and all(q.suffix == ".png" and q.is_file() for q in queries)  # flat
    assert all(int(c.removeprefix("char")) >= 964 for c in classes)  # images_evaluation's characters
    predicted = run_cli("export.predict", "--model", str(exported[0]), "--support", str(out / "support"), "--query",
                        str(out / "query"), "--json")
    assert predicted.returncode == 0, predicted.stderr
    answers = {p["file"]: p["class"] for p in json.loads(predicted.stdout)["predictions"]}
    assert sorted(answers) == [q.name for q in queries] and set(answers.values()) <= set(classes)
    assert sum(answer == file.split("-")[0] for file, answer in answers.items()) >= 13, answers
    again = run_cli("train", "examples", "--out", str(out), "--data", omniglot_dir)  # never mixes two sets
    assert again.returncode == 1 and "already holds files" in again.stderr and again.stderr.count("\n") == 1
    nested = run_cli("export.predict", "--model", str(exported[0]), "--support", str(out / "support"), "--query",
                     str(out / "support"))
    assert nested.returncode == 1 and nested.stderr.count("\n") == 1, nested.stderr
    assert "must hold the images to classify themselves (flat)" in nested.stderr


# --- maml-export CLI and failure paths ----------------------------------------------------------------

@pytest.mark.slow
def test_maml_export_cli_prints_stages_and_parity(checkpoint, tmp_path):
    done = run_cli("export", "--checkpoint", str(checkpoint), "--steps", "2", "--tasks", "1",
                   "--out", str(tmp_path / "exp"))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [ln.split(" ... ")[0][:5] for ln in lines[:6]] == [f"[{i}/6]" for i in range(1, 7)]
    assert all(ln.endswith(" s)") and " done (" in ln for ln in lines[:6])
    # 3 parity lines, adapt -> predict, and (query_norm "support") each query alone
    checks = 5 if Adapter(tmp_path / "exp").query_norm == "support" else 4
    assert sum(ln.lstrip().startswith("✓") for ln in lines) == checks and "✗" not in done.stdout
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "exp" / "model.onnx")).metadata_props}
    assert meta["steps"] == "2"


@pytest.mark.slow
def test_quick_start_export_validates_without_omniglot(tmp_path):
    """README's quick start on a machine without the dataset: the bundled weights, 5 steps, parity on tasks of
    made-up characters (on random binary images the bundled weights failed it: the steps amplified float32
    rounding to 3.7e-4 from float64 Paddle)."""
    env = {k: v for k, v in ENV.items() if k != "OMNIGLOT_DIR"}
    done = subprocess.run([sys.executable, "-m", "export", "--steps", "5", "--out", str(tmp_path / "exp")],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    checks = 5 if Adapter(tmp_path / "exp").query_norm == "support" else 4
    assert sum(ln.lstrip().startswith("✓") for ln in done.stdout.splitlines()) == checks
    report = json.loads((tmp_path / "exp" / "export.json").read_text())
    assert report["parity"]["source"].startswith("synthetic drawings") and report["parity"]["passed"]


def test_maml_export_with_a_corrupt_checkpoint_is_one_line(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    done = run_cli("export", "--checkpoint", str(bad), "--out", str(tmp_path / "exp"))
    assert done.returncode != 0
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: --checkpoint"), done.stderr
    assert "corrupt" in done.stderr and "Traceback" not in done.stderr
    usage = run_cli("export", "--steps", "many")
    assert usage.returncode == 2 and usage.stderr.startswith("error:") and usage.stderr.count("\n") == 1
    zero = run_cli("export", "--checkpoint", str(bad), "--steps", "0")  # an option out of range: a usage error
    assert zero.returncode == 2 and "--steps" in zero.stderr
    shift = run_cli("export", "--support-shift", "14", "--out", str(tmp_path / "exp"))  # too large for 28x28 images
    assert shift.returncode != 0 and shift.stderr.count("\n") == 1, shift.stderr
    assert shift.stderr.startswith("error: --support-shift must be a whole number of pixels from 0 to 13")


class Unpool(paddle.nn.Layer):
    """Max-pool and unpool: `pd_op.unpool` is not in paddle2onnx's list."""

    def forward(self, x):
        y, index = F.max_pool2d(x, 2, 2, return_mask=True)
        return F.max_unpool2d(y, index, 2, 2, output_size=[4, 4])


@pytest.mark.filterwarnings("ignore:no variable in your model")
def test_unsupported_op_is_an_export_error_not_an_abort(tmp_path):
    spec = [paddle.static.InputSpec([None, 1, 4, 4], "float32", "x")]
    net = Unpool()
    net.eval()
    paddle.jit.save(paddle.jit.to_static(net, input_spec=spec, full_graph=True), str(tmp_path / "m"), input_spec=spec)
    with pytest.raises(ExportError, match="pd_op.unpool"):
        check_ops(inspect_program(tmp_path / "m").ops)
    # and if the check were skipped, paddle2onnx's abort kills only its child process
    with pytest.raises(ExportError, match="paddle2onnx failed.*unsupported operators"):
        convert(tmp_path / "m", tmp_path / "m.onnx", 17)
    assert not (tmp_path / "m.onnx").exists()


def test_view_chains_fold_to_one_reshape_or_none():
    """fold_view_chains: Unsqueeze -> Reshape back to the source's shape disappears; Unsqueeze -> Reshape to another
    static shape becomes one Reshape; a dynamic-shaped chain stays; onnxruntime gives the same values."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from maml_export.onnx_convert import fold_view_chains
    nodes = [helper.make_node("Unsqueeze", ["w", "axis0"], ["w1"]),
             helper.make_node("Reshape", ["w1", "shape_w"], ["w2"]),          # back to [4, 3]: identity
             helper.make_node("Unsqueeze", ["b", "axis0"], ["b1"]),
             helper.make_node("Reshape", ["b1", "col"], ["b2"]),              # [3] -> [3, 1]
             helper.make_node("MatMul", ["x", "w2"], ["y"]),                  # x [Q, 4] @ [4, 3]
             helper.make_node("Unsqueeze", ["y", "axis0"], ["y1"]),           # dynamic Q: stays
             helper.make_node("Squeeze", ["y1", "axis0"], ["y2"]),
             helper.make_node("MatMul", ["y2", "b2"], ["out"])]
    inits = [numpy_helper.from_array(np.array([0], np.int64), "axis0"),
             numpy_helper.from_array(np.array([4, 3], np.int64), "shape_w"),
             numpy_helper.from_array(np.array([-1, 1], np.int64), "col")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["Q", 4]),
                                           helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3]),
                                           helper.make_tensor_value_info("b", TensorProto.FLOAT, [3])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["Q", 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    rng = np.random.default_rng(0)
    feeds = {"x": rng.random((2, 4), np.float32), "w": rng.random((4, 3), np.float32), "b": rng.random(3, np.float32)}
    before = ort.InferenceSession(model.SerializeToString()).run(None, feeds)[0]
    folded = fold_view_chains(model)
    onnx.checker.check_model(folded, full_check=True)
    ops = [n.op_type for n in folded.graph.node]
    assert ops.count("Reshape") == 1 and ops.count("MatMul") == 2 and "Squeeze" in ops, ops
    np.testing.assert_array_equal(ort.InferenceSession(folded.SerializeToString()).run(None, feeds)[0], before)


# --- what a new user hit: write failures, meaningless inputs, one bad file, a run folder's checkpoint ------------

def test_maml_export_out_that_cannot_be_written_is_one_line_before_any_work(tmp_path, read_only_dir):
    (tmp_path / "a-file").write_text("")
    for out, reason in ((tmp_path / "a-file", "is a file, not a folder"), (tmp_path / "a-file" / "sub", "lies under the file"),
                        (read_only_dir, "cannot write there"), (read_only_dir / "new", "cannot write there")):
        done = run_cli("export", "--out", str(out), "--steps", "1", "--tasks", "1")
        assert done.returncode == 1, done.stderr
        assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"error: --out {out}") and reason in done.stderr
        assert "[1/6]" not in done.stdout  # refused before tracing, not after


def test_steps_above_the_stated_bound_are_refused_before_any_work(tmp_path):
    """--steps 1000 traced for 10 minutes, then died of a RecursionError: the bound is in --help, and more is one
    line naming --steps, at once."""
    from maml_export.contract import MAX_STEPS
    done = run_cli("export", "--steps", str(MAX_STEPS + 1), "--out", str(tmp_path / "exp"), timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "--steps" in done.stderr, done.stderr
    assert f"1<=x<={MAX_STEPS}" in done.stderr and done.stdout == "" and not (tmp_path / "exp").exists()
    assert f"1 to {MAX_STEPS}" in " ".join(run_cli("export", "--help").stdout.split())
    with pytest.raises(ExportError, match=f"--steps must be at most {MAX_STEPS}"):
        export_model(None, tmp_path / "exp", steps=1000)


@pytest.mark.slow
def test_an_export_at_the_steps_bound_works(tmp_path):
    """The bound is one that exports: all of maml-export at --steps MAX_STEPS (about 1.5 minutes on 2 cores)."""
    from maml_export.contract import MAX_STEPS
    done = run_cli("export", "--steps", str(MAX_STEPS), "--tasks", "1", "--out", str(tmp_path / "exp"), timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr
    assert json.loads((tmp_path / "exp" / "export.json").read_text())["steps"] == MAX_STEPS


def test_maml_export_checks_data_before_any_work_and_leaves_no_folder(tmp_path):
    """--data that does not exist is refused in one line before tracing (it was found at stage 5 of 6, after
    12 s), and the --out folder and its missing parents are not made."""
    out = tmp_path / "new" / "exp"
    done = run_cli("export", "--data", "/nonexistent", "--out", str(out), "--steps", "1", "--tasks", "1")
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: ") and "/nonexistent does not exist" in done.stderr and "--data" in done.stderr
    assert "[1/6]" not in done.stdout and not (tmp_path / "new").exists()


@pytest.mark.parametrize("existing", [False, True])
def test_a_failed_export_leaves_no_partial_folder(tmp_path, monkeypatch, existing):
    """A failure mid-export (here tracing, after it wrote a file) removes what the export made: a new --out and the
    parents made for it, or, in a folder that was there, its own files; what was there stays as it was."""
    import maml_export.export as export

    def half_written(net, specs, prefix):
        prefix.with_suffix(".json").write_text("half a program")
        raise ExportError("tracing the static graph model failed: as a test would have it")

    monkeypatch.setattr(export, "trace", half_written)
    out = tmp_path / "mine" if existing else tmp_path / "new" / "exp"
    if existing:
        out.mkdir()
        (out / "notes.txt").write_text("the user's")
        (out / "model.json").write_text("an earlier export's")
    with pytest.raises(ExportError, match="as a test would have it"):
        export_model(None, out, steps=1, tasks=1, data=None)
    if existing:
        assert sorted(p.name for p in out.iterdir()) == ["model.json", "notes.txt"]
        assert (out / "model.json").read_text() == "an earlier export's"
    else:
        assert list(tmp_path.iterdir()) == []


def test_maml_export_takes_a_run_folders_best_checkpoint(checkpoint, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "latest.npz").write_bytes(Path(checkpoint).read_bytes())
    (run / "best.npz").write_bytes(b"PK\x03\x04 not the latest: the best")  # so that reading it shows
    done = run_cli("export", "--checkpoint", str(run), "--out", str(tmp_path / "exp"))
    assert done.returncode == 1 and f"{run / 'best.npz'} is corrupt" in done.stderr, done.stderr
    (run / "best.npz").unlink()  # a run stopped before its first validation
    done = run_cli("export", "--checkpoint", str(run), "--out", str(tmp_path / "exp"))
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "no best.npz yet" in done.stderr and str(run / "latest.npz") in done.stderr
    assert "its best.npz" in " ".join(run_cli("export", "--help").stdout.split())


def synthetic_task(ways=5, shots=1, query=3, seed=0):
    from maml_export.data import synthetic_tasks
    return tuple(a[0] for a in synthetic_tasks(1, ways, shots, query, seed))


def test_adapter_refuses_inverted_blank_and_out_of_range_images(exported, exported_batch):
    a = Adapter(exported[0] / "model.onnx")
    xs, ys, xq, _ = synthetic_task()
    assert a.predict(xs, ys, xq).shape == (15, 5)
    inverted, blank, black = xq.copy(), xq.copy(), xq.copy()
    inverted[2] = 1 - inverted[2]  # white paper read as it is: ink 0, paper 1
    blank[4], black[[4, 7]] = 0, 1
    for args, message in (((xs, ys, inverted), "x_qry image 2 is inverted"),
                          ((xs, ys, blank), "x_qry image 4 is blank (every pixel 0.00: nothing drawn)"),
                          ((xs, ys, black), "x_qry image 4 is blank (every pixel 1.00: all ink) (and 1 more of 15)"),
                          ((xs * 255, ys, xq), "x_spt image 0 is outside [0, 1]"),
                          ((1 - xs, ys, xq), "x_spt image 0 is inverted")):
        with pytest.raises(ValueError, match=re.escape(message)) as e:
            a.predict(*args)
        assert "\n" not in str(e.value) and "check_pixels=False" in str(e.value)
    as_is = Adapter(exported[0] / "model.onnx", check_pixels=False)  # the override classifies them all the same
    assert np.array_equal(as_is.predict(xs, ys, inverted),
                          as_is.session.run(["logits"], {"x_spt": xs, "y_spt": ys, "x_qry": inverted})[0])
    batch = Adapter(exported_batch[0] / "model.onnx")
    xs, ys, xq = (np.stack([x] * TASK_BATCH) for x in (xs, ys, inverted))
    with pytest.raises(ValueError, match=r"x_qry task 0 image 2 is inverted \(.*\) \(and 2 more of 45\)"):
        batch.predict(xs, ys, xq)


def drawing_file(x: np.ndarray, path: Path, inverted: bool = False) -> None:
    """A [1, H, W] drawing (ink 1.0) as a PNG of dark ink on white paper (or light ink on black, inverted)."""
    ink = np.round(x[0] * 255).astype(np.uint8)
    Image.fromarray(ink if inverted else 255 - ink).save(path)


def test_maml_predict_reports_each_bad_query_file_and_classifies_the_others(exported, tmp_path):
    xs, ys, xq, yq = synthetic_task()
    for i, label in enumerate(ys):
        (tmp_path / "support" / f"class{label}").mkdir(parents=True, exist_ok=True)
        drawing_file(xs[i], tmp_path / "support" / f"class{label}" / f"{i}.png")
    good, query = tmp_path / "good", tmp_path / "query"
    good.mkdir(), query.mkdir()
    for i, x in enumerate(xq):
        drawing_file(x, good / f"q{i:02d}.png")
        drawing_file(x, query / f"q{i:02d}.png")
    drawing_file(xq[0], query / "inverted.png", inverted=True)  # white ink on black
    Image.new("L", (28, 28), 255).save(query / "blank.png")
    Image.new("L", (40, 40), 0).save(query / "black.png")
    (query / "broken.png").write_bytes(b"\x89PNG not really")
    model = ["--model", str(exported[0] / "model.onnx"), "--support", str(tmp_path / "support")]
    alone = run_cli("export.predict", *model, "--query", str(good))
    assert alone.returncode == 0, alone.stderr
    done = run_cli("export.predict", *model, "--query", str(query))
    assert done.returncode == 1 and done.stdout == alone.stdout  # the good files, classified as on their own
    errors = done.stderr.splitlines()
    assert len(errors) == 4 and all(line.startswith("error: ") for line in errors), done.stderr
    for name, reason in (("black.png", "is blank"), ("blank.png", "is blank"), ("broken.png", "cannot read image"),
                         ("inverted.png", "is inverted")):
        assert any(str(query / name) in line and reason in line for line in errors), (name, errors)
    doc = json.loads(run_cli("export.predict", *model, "--query", str(query), "--json").stdout)
    assert len(doc["predictions"]) == 15 and sorted(f["file"] for f in doc["failed"]) == [
        "black.png", "blank.png", "broken.png", "inverted.png"]
    forced = run_cli("export.predict", *model, "--query", str(query), "--no-pixel-check", "--json")
    assert forced.returncode == 1 and [f["file"] for f in json.loads(forced.stdout)["failed"]] == ["broken.png"]
    assert len(json.loads(forced.stdout)["predictions"]) == 18
    drawing_file(xs[0], tmp_path / "support" / "class0" / "0.png", inverted=True)  # a support image: no adapting
    bad = run_cli("export.predict", *model, "--query", str(good))
    assert bad.returncode == 1 and bad.stdout == "" and bad.stderr.count("\n") == 1
    assert bad.stderr.startswith(f"error: --support image {tmp_path / 'support' / 'class0' / '0.png'} is inverted")
    usage = " ".join(run_cli("export.predict", "--help").stdout.split())
    assert "the other query images are classified all the same, and the exit code is then 1" in usage


def test_evaluate_an_export_one_query_at_a_time(exported, omniglot):
    """`maml-train evaluate --export DIR`: the deployed graphs on the protocol's test tasks, each query alone; every
    query's class alone equals its class in its batch (query_norm "support"), and the JSON says how it was measured."""
    out, _ = exported
    done = subprocess.run([sys.executable, "-m", "train", "evaluate", "--export", str(out), "--tasks", "3", "--json",
                           "--data", DATA], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout.splitlines()[-1])
    assert (r["tasks"], r["ways"], r["answers"], r["query_norm"]) == (3, 5, 225, "support")
    assert r["same_class_alone_and_in_batch"] == 225 and r["accuracy"] == r["batch_accuracy"]
    assert "each query alone" in r["queries"] and 0 <= r["ece"] <= 1
    if default_checkpoint().is_file():
        assert r["accuracy"] > 0.9
