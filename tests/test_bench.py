"""maml-bench: the FLOP counter against docs/benchmarks.md#the-flop-floor, the timing and agreement helpers, and the CLI end
to end (real export, real runtimes, small --runs) plus its one-line errors.

The end-to-end run uses the bundled weights when they exist, else freshly initialised ones; it runs on
Omniglot test tasks when $OMNIGLOT_DIR is set (CI sets it), else on made-up characters (`data.synthetic_tasks`).
"""
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from maml_export.adapter import Adapter
from maml_export.bench.benchmark import (BenchConfig, agreement, parse_configs, same_work, time_calls,
                                         time_interleaved)
from maml_export.bench.machine import GemmWorker, count_flops, gemm_gflops, matrix_products
from maml_export.errors import ConfigError, MamlError
from maml_export.specs import conv4_specs

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
RUNTIMES = {"onnxruntime", "paddle-eager", "paddlerec-loop", "paddle-inference", "pytorch-eager"}
ROW_KEYS = {"runtime", "provider", "config", "steps", "steps_run", "support_views", "stage", "p50_ms", "p90_ms",
            "p99_ms", "mean_ms", "tasks_per_s"}
SPLIT_ROWS = ("adapt", "predict x1", "predict xQ")  # per runtime of runtimes.SPLITS: "onnxruntime adapt", ...
HAS_TORCH = importlib.util.find_spec("torch") is not None


def bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True, env=ENV, cwd=ROOT,
                          timeout=timeout)


# --- FLOPs -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ways, shots, notes", [(5, 1, 2.92), (5, 5, 8.72), (20, 1, 11.69), (20, 5, 34.88)])
def test_flop_counter_reproduces_the_notes(ways, shots, notes):
    flops = count_flops(conv4_specs(ways), support=ways * shots, query=ways * 15, steps=5)
    # docs/benchmarks.md#the-flop-floor gives two decimals; 20w5s counts 34.887 GFLOP, first written as 34.88 (truncated)
    assert abs(flops / 1e9 - notes) < 0.01, flops


def test_flop_counter_counts_the_steps_on_every_view_of_a_shifted_support_set():
    from maml_export.specs import with_head
    shifted = with_head(conv4_specs(5), support_shift=2)
    assert count_flops(shifted, support=5, query=75, steps=5) == count_flops(conv4_specs(5), support=45, query=75, steps=5)
    assert count_flops(shifted, support=0, query=75, steps=5) == count_flops(conv4_specs(5), support=0, query=75, steps=5)


def test_flop_counter_by_hand():
    specs = conv4_specs(5)
    convs = [64 * 1 * 9 * 28 * 28, 64 * 64 * 9 * 14 * 14, 64 * 64 * 9 * 7 * 7, 64 * 64 * 9 * 3 * 3]
    forward = sum(convs) + 64 * 5  # MACs per image, the head included
    assert count_flops(specs, support=0, query=1, steps=5) == 2 * forward  # query forward only
    # one step on one image: forward + weight gradients + input gradients, except the first conv's
    assert count_flops(specs, support=1, query=0, steps=1) == 2 * (3 * forward - convs[0])
    assert count_flops(specs, support=5, query=75, steps=5) == 2_922_028_800


def test_matrix_products_are_the_counted_flops_with_im2col_shapes():
    for ways, shots in ((5, 1), (20, 5)):
        specs = conv4_specs(ways)
        products = matrix_products(specs, support=ways * shots, query=ways * 15, steps=5)
        assert sum(p.flops for p in products) == count_flops(specs, ways * shots, ways * 15, 5)
    by_what = {(p.what, p.count): p for p in matrix_products(conv4_specs(5), support=5, query=75, steps=5)}
    # the second conv (14x14 out) on 75 query images, once: (64, 64*9) x (64*9, 75*196), split along n
    assert by_what["conv2 forward", 1][1:] == (64, 576, 75 * 196, 1, 75, "n")
    assert by_what["conv2 weight gradient", 5][1:] == (64, 5 * 196, 576, 5, 5, "k")  # a sum over the images
    assert ("conv1 input gradient", 5) not in by_what and ("conv2 input gradient", 5) in by_what
    assert by_what["linear5 forward", 5][1:] == (5, 64, 5, 5, 1, "")


def test_product_bound_times_each_product_in_its_fastest_form():
    from maml_export.bench.bound import FORMS, product_bound
    specs = conv4_specs(5, hidden=8)
    r = product_bound(specs, support=5, query=10, steps=1, threads=1, rounds=3)
    assert r["flops"] == count_flops(specs, 5, 10, 1) and len(r["products"]) == len(matrix_products(specs, 5, 10, 1))
    assert r["products_ms"] == pytest.approx(sum(p["ms"] for p in r["products"]))
    assert r["floor_ms"] == pytest.approx(r["flops"] / r["gemm_p50_gflops"] / 1e6)
    block = r["query_first_block_ms"]  # the queries' (10, 8, 28, 28) map: statistics, the faster pool
    assert set(block["pool_forms"]) == {"MaxPool", "reshape + ReduceMax"} and block["pool"] == min(block["pool_forms"].values())
    assert r["bound_ms"] == pytest.approx(r["products_ms"] + block["statistics"] + block["pool"])
    assert r["floor_multiple"] == pytest.approx(r["bound_ms"] / r["floor_ms"])
    for p in r["products"]:
        assert p["form"] in FORMS and 0 < p["ms_each"] <= p["whole_ms_each"] and p["ms"] == p["ms_each"] * p["count"]


def test_gemm_worker_multiplies_on_each_call_and_a_dead_worker_is_one_error():
    with GemmWorker(threads=1, n=256) as gemm:
        assert gemm.flops == 2 * 256 ** 3
        for _ in range(3):
            gemm()  # one line in, one product, one line back
        assert gemm.process.poll() is None  # the child stays up between calls
        assert 1 < gemm_gflops(threads=1, n=256) < 1e5  # the one-shot rate uses the same worker
        gemm.process.kill()
        gemm.process.wait()
        with pytest.raises(MamlError, match="GEMM worker .* exited with status"):
            gemm()


# --- helpers -----------------------------------------------------------------------------------------------

def test_parse_configs():
    assert parse_configs("5w1s, 20w5s,5w1s") == [BenchConfig(5, 1), BenchConfig(20, 5)]
    assert parse_configs("5w1s")[0].name == "5w1s" and parse_configs("5w1s")[0].query == 15
    for bad in ("7x1s", "5w0s", "1w1s", "5w1s,", "fast"):
        with pytest.raises(ConfigError, match="--configs"):
            parse_configs(bad)


def test_agreement_flags_class_changes_but_not_near_ties():
    ref = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 2.0 - 1e-6], [1.0, 0.0, 0.0]], np.float32)
    same = agreement(ref + 1e-6, ref)
    assert same["disagreements"] == 0 and same["same_class"] == 3 and same["max_rel_vs_eager"] < 1e-5
    tie = ref.copy()
    tie[1, 2] += 2e-6  # the top-2 margin of query 1 is a near-tie: the flip is no disagreement
    assert agreement(tie, ref)["same_class"] == 2 and agreement(tie, ref)["disagreements"] == 0
    wrong = ref[:, ::-1].copy()
    assert agreement(wrong, ref)["disagreements"] == 2  # queries 0 and 2 flip clearly
    assert agreement(np.full_like(ref, np.nan), ref)["max_rel_vs_eager"] == float("inf")


def test_time_calls_warms_up_times_each_call_and_respects_the_budget():
    calls = []
    stats, out = time_calls(lambda: calls.append(1) or len(calls), warmup=2, runs=4, max_seconds=0)
    assert len(calls) == 6 and out == 6 and stats["runs"] == 4
    stats, _ = time_calls(lambda: time.sleep(0.02), warmup=0, runs=1000, max_seconds=0.1)
    assert 3 <= stats["runs"] < 20
    assert stats["p50_ms"] >= 19 and stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"]
    assert stats["tasks_per_s"] == pytest.approx(1e3 / stats["mean_ms"])


def test_time_interleaved_calls_runtimes_round_robin_each_with_its_own_budget():
    order = []
    calls = {"fast": lambda: order.append("fast") or "f", "slow": lambda: order.append("slow") or time.sleep(0.03)}
    timed = time_interleaved(calls, warmup=1, runs=1000, max_seconds=0.1, pause=0)
    assert order[:2] == ["fast", "slow"]  # warm-up, then rounds: fast, slow, fast, slow, ...
    rounds = order[2:]
    assert rounds[:2 * timed["slow"][0]["runs"]:2] == ["fast"] * timed["slow"][0]["runs"]
    assert 3 <= timed["slow"][0]["runs"] < 10 and timed["fast"][0]["runs"] > timed["slow"][0]["runs"]
    assert timed["fast"][1] == "f" and timed["slow"][0]["p50_ms"] >= 29
    began = time.perf_counter()  # a switch of runtime waits `pause`, untimed; staying on one does not
    timed = time_interleaved({"a": lambda: None, "b": lambda: None}, warmup=0, runs=3, max_seconds=0, pause=0.05)
    assert 0.25 <= time.perf_counter() - began < 1 and timed["a"][0]["p50_ms"] < 10


# --- the CLI -----------------------------------------------------------------------------------------------

def _export(tmp_path_factory, query_norm: str | None = None) -> Path:
    from maml_export.checkpoint import Checkpoint, default_checkpoint, save_checkpoint
    from maml_export.config import MamlConfig
    from maml_export.export import export_model
    from maml_export.model import Model
    ckpt = default_checkpoint()
    if not ckpt.is_file():
        config = MamlConfig()
        ckpt = save_checkpoint(tmp_path_factory.mktemp("ckpt") / "init.npz",
                               Checkpoint(config, Model.from_specs(config.layers).init_params(0)))
    out = tmp_path_factory.mktemp("export")
    export_model(ckpt, out, steps=5, tasks=1, query_norm=query_norm)
    return out / "model.onnx"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """The bundled weights, queries normalised together (transductive), as they were trained."""
    return _export(tmp_path_factory, query_norm="transductive")


@pytest.fixture(scope="module")
def exported_support(tmp_path_factory) -> Path:
    """The same weights with queries normalised with the support set's statistics, as new runs are."""
    return _export(tmp_path_factory, query_norm="support")


def expected_5w1s_flops(exported: Path) -> int:
    """The 5w1s FLOPs maml-bench counts for `exported`: 2.92 GFLOP (docs/benchmarks.md#the-flop-floor), the steps on
    9 views of each support image under the export's support shift."""
    shift = json.loads(Adapter(exported.parent).metadata["config"])["support_shift"]
    flops = count_flops(conv4_specs(5), support=5 * (9 if shift else 1), query=75, steps=5)
    assert shift or flops == 2_922_028_800
    return flops


def test_cli_end_to_end_writes_the_json_schema_and_all_peers_agree(exported, tmp_path):
    result = bench("--provider", "cpu", "--model", str(exported), "--configs", "5w1s", "--runs", "3", "--warmup", "1",
                   "--json", str(tmp_path / "bench.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert {"machine", "results", "flop_floor_ms", "gemm_round_robin"} <= set(doc)
    assert {"cpu", "cores", "threads", "python", "versions"} <= set(doc["machine"])
    gemm = doc["gemm_round_robin"]["5w1s"]  # the floor's GEMM, timed round-robin with the rows
    assert gemm["runs"] == 3 and 1 < gemm["p50_gflops"] <= gemm["best_gflops"] < 1e5
    flops = expected_5w1s_flops(exported)
    assert doc["models"]["5w1s"]["flops"] == flops
    assert doc["flop_floor_ms"]["5w1s"] == pytest.approx(flops / gemm["p50_gflops"] / 1e6)
    rows = {r["runtime"]: r for r in doc["results"] if r["stage"] == "adapt+predict"}  # the split rows: below
    skipped = {s["runtime"]: s["reason"] for s in doc["skipped"] if s["runtime"] in RUNTIMES}
    assert set(rows) | set(skipped) == RUNTIMES and {"onnxruntime", "paddle-eager", "paddlerec-loop"} <= set(rows)
    if not HAS_TORCH:  # the optional PyTorch peer says how to get it
        assert 'pip install "maml-export[torch]"' in skipped["pytorch-eager"]
    else:
        assert "pytorch-eager" in rows
    for name, r in rows.items():
        assert ROW_KEYS <= set(r) and r["config"] == "5w1s" and r["steps"] == 5 and r["runs"] == 3, r
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["tasks_per_s"] == pytest.approx(1e3 / r["mean_ms"])
        assert r["provider"] == "cpu" and r["floor_multiple"] > 0 and 0 <= r["steps_run"] <= 5
        # vs fastest only among the rows of the same work: a row no other row's steps match gets none
        same = [x for x in rows.values() if same_work(x, r)]
        assert r["ratio_to_fastest"] is None if len(same) == 1 else r["ratio_to_fastest"] >= 1, r
        # every runtime predicts the classes eager Paddle predicts on the same inputs (or, where a float32
        # max-pool near-tie sends adaptation another way, the classes eager Paddle in float64 predicts)
        assert r["queries"] == 75 and not r["flagged"], r
        assert np.isfinite(r["max_rel_vs_eager"]), r
    assert rows["paddlerec-loop"]["steps_run"] == 5  # PaddleRec's loop runs every step, whatever the others do
    for stopping in ("paddle-eager", "paddle-inference"):  # the graph's function, with its stop
        assert rows.get(stopping, rows["onnxruntime"])["steps_run"] == rows["onnxruntime"]["steps_run"]
    assert "5w1s" in result.stdout and "x floor" in result.stdout and "onnxruntime" in result.stdout


def test_cli_split_rows_time_adapt_once_predict_many_beside_the_pytorch_peer(exported_support, tmp_path):
    result = bench("--provider", "cpu", "--model", str(exported_support), "--configs", "5w1s", "--runs", "2",
                   "--warmup", "1", "--max-seconds", "5", "--json", str(tmp_path / "bench.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads((tmp_path / "bench.json").read_text())
    rows, model = {r["runtime"]: r for r in doc["results"]}, doc["models"]["5w1s"]
    peers = ["onnxruntime"] + ["pytorch-eager"] * HAS_TORCH
    if not HAS_TORCH:  # the split rows of the optional peer say how to get it, as its fused row does
        skipped = {s["runtime"]: s["reason"] for s in doc["skipped"]}
        assert 'pip install "maml-export[torch]"' in skipped["pytorch-eager adapt/predict"]
    for peer in peers:
        adapt, one, every = (rows[f"{peer} {stage}"] for stage in SPLIT_ROWS)
        for r in (adapt, one, every):
            assert ROW_KEYS <= set(r) and r["config"] == "5w1s" and r["runs"] == 2 and r["provider"] == "cpu", r
            assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
            # eager Paddle's classes (the fused graph's: the same function) and nearly its logits
            assert not r["flagged"] and r["max_rel_vs_eager"] < 1e-3, r
            floor = doc["flop_floor_ms"]["5w1s"] * r["flops"] / model["flops"]  # the row's own work
            assert r["floor_multiple"] == pytest.approx(r["p50_ms"] / floor)
        # the adapt row is checked by the classes its state gives the task's 75 queries
        assert adapt["stage"] == "adapt" and "queries_per_s" not in adapt and adapt["queries"] == 75
        # the fused call's work, in two; onnxruntime's single-task graphs count the steps that ran (they stop at a
        # fixed point of the SGD: its rows say so)
        assert adapt["flops"] + every["flops"] == rows[peer].get("flops", model["flops"])
        if peer == "onnxruntime" and "onnxruntime_steps_run" in model:
            ran = model["onnxruntime_steps_run"]
            assert f"{ran} of 5 steps ran" in adapt["detail"] and f"{ran} of 5 steps ran" in rows[peer]["detail"]
            assert adapt["flops"] < model["flops"] - every["flops"]
        for r, q in ((one, 1), (every, 75)):  # one query alone: the first query's row of the batch
            assert r["stage"] == "predict" and r["queries_per_call"] == q and r["queries"] == q, r
            assert r["queries_per_s"] == pytest.approx(q * 1e3 / r["mean_ms"])
    for r in doc["results"]:  # vs fastest: among the rows of the same work only (call, steps run, views)
        same = [x for x in doc["results"] if same_work(x, r)]
        if len(same) > 1:
            assert min(x["ratio_to_fastest"] for x in same) == 1, r
        else:
            assert r["ratio_to_fastest"] is None, r
    for label in ("onnxruntime adapt", "onnxruntime predict x1", "onnxruntime predict xQ (75 queries)", "queries/s"):
        assert label in result.stdout


@pytest.mark.parametrize("query_norm", ["support", "transductive"])
def test_split_runtimes_predict_what_the_fused_graph_predicts(query_norm, request):
    """Each runtime's adapt -> predict gives the fused graph's logits; under support statistics one query alone
    gives its row of the batch, as the rows `predict x1` and `predict xQ` assume."""
    from maml_export.contract import SPLIT_RTOL
    from maml_export.data import synthetic_tasks
    from maml_export.bench.runtimes import SPLITS, host, load_exported, onnxruntime, pytorch_eager
    exp = load_exported(request.getfixturevalue("exported_support" if query_norm == "support" else "exported"))
    assert exp.config.query_norm == query_norm
    t = synthetic_tasks(1, 5, 1, 4, seed=3)
    xs, ys, xq = t.x_spt[0], t.y_spt[0], t.x_qry[0]
    fused = onnxruntime(exp, "cpu", 1)(xs, ys, xq)()
    scale = np.abs(fused).max()
    if HAS_TORCH:  # the peer's one call: the same normalisation as the graph's
        assert np.abs(host(pytorch_eager(exp, "cpu", 1)(xs, ys, xq)()) - fused).max() <= 1e-4 * scale
    for name, split in SPLITS.items():
        if name == "pytorch-eager" and not HAS_TORCH:
            continue
        tol = SPLIT_RTOL if name == "onnxruntime" else 1e-4  # the same kernels as model.onnx, or another library's
        bind_adapt, bind_predict = split(exp, "cpu", 1)
        state = bind_adapt(xs, ys)()
        batch = host(bind_predict(state, xq)())
        assert batch.shape == fused.shape and np.abs(batch - fused).max() <= tol * scale, name
        assert (batch.argmax(-1) == fused.argmax(-1)).all(), name
        alone = np.concatenate([host(bind_predict(state, xq[i:i + 1])()) for i in range(len(xq))])
        if query_norm == "support":
            assert np.abs(alone - batch).max() <= tol * scale, name
        else:  # each query normalised with its own statistics: another function (the rows do not check it)
            assert np.abs(alone - batch).max() > 1e-3 * scale, name


def test_cli_task_batch_rows_time_one_batched_call_against_single_calls(exported, tmp_path):
    T = 2
    result = bench("--provider", "cpu", "--model", str(exported), "--configs", "5w1s", "--runs", "2", "--warmup", "1",
                   "--task-batch", str(T), "--json", str(tmp_path / "bench.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert doc["settings"]["task_batch"] == T
    rows = {r["runtime"]: r for r in doc["results"]}
    assert {"onnxruntime", "onnxruntime-batch", "onnxruntime-loop"} <= set(rows)
    assert "task_batch" not in rows["onnxruntime"]
    for name in ("onnxruntime-batch", "onnxruntime-loop"):
        r = rows[name]
        assert ROW_KEYS <= set(r) and r["task_batch"] == T and r["config"] == "5w1s" and r["runs"] == 2, r
        assert r["tasks_per_s"] == pytest.approx(T * 1e3 / r["mean_ms"])  # per task: a call adapts T tasks
        assert r["queries"] == T * 75 and not r["flagged"], r  # every task's classes are eager Paddle's
        assert r["floor_multiple"] == pytest.approx(r["p50_ms"] / T / doc["flop_floor_ms"]["5w1s"])
    batch, loop = rows["onnxruntime-batch"], rows["onnxruntime-loop"]
    assert batch["steps_run"] == 5 and 0 <= loop["steps_run"] <= 5  # the loop's: the mean over its tasks
    if loop["steps_run"] == 5:  # the same work
        assert batch["speedup_vs_loop"] == pytest.approx(batch["tasks_per_s"] / loop["tasks_per_s"])
    else:  # the single-task graph stopped at a fixed point on some tasks: no speed-up between other work
        assert batch["speedup_vs_loop"] is None and "not the same work" in result.stdout
    assert "onnxruntime-batch (2 tasks in one call)" in result.stdout and "--task-batch 2" in result.stdout


def test_same_work_is_the_same_call_with_the_same_steps_on_the_same_views():
    row = {"config": "5w1s", "stage": "adapt+predict", "steps_run": 5, "support_views": 9}
    assert same_work(row, dict(row))
    for other in ({"steps_run": 0}, {"support_views": 1}, {"stage": "adapt"}, {"config": "5w5s"}):
        assert not same_work(row, {**row, **other}), other
    predict = {"config": "5w1s", "stage": "predict", "steps_run": None, "support_views": None}
    assert same_work({**predict, "queries_per_call": 1}, {**predict, "queries_per_call": 1})
    assert not same_work({**predict, "queries_per_call": 1}, {**predict, "queries_per_call": 75})


@pytest.mark.slow
def test_cli_every_step_runs_every_step_in_every_runtime_and_compares_them_all(tmp_path):
    """maml-bench --every-step: the bundled weights exported without the fixed-point stop, and every runtime's
    call runs all 5 steps, so that every adapt-and-predict row is the same work and has its ratio."""
    result = bench("--every-step", "--configs", "5w1s", "--runs", "2", "--warmup", "0", "--max-seconds", "1",
                   "--json", str(tmp_path / "bench.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert doc["settings"]["every_step"] and "onnxruntime_steps_run" not in doc["models"]["5w1s"]
    fused = [r for r in doc["results"] if r["stage"] == "adapt+predict"]
    assert {"onnxruntime", "paddle-eager", "paddlerec-loop"} <= {r["runtime"] for r in fused}
    assert all(r["steps_run"] == 5 and "stops" not in r["detail"] for r in fused), fused
    assert all(r["steps_run"] in (5, None) for r in doc["results"])  # predict rows run no step
    assert all(r["ratio_to_fastest"] >= 1 for r in fused) and min(r["ratio_to_fastest"] for r in fused) == 1
    assert "every SGD step in every runtime (--every-step)" in result.stdout and " 5/5 " in result.stdout


def test_cli_every_step_with_a_model_that_stops_is_one_error_line(exported):
    result = bench("--every-step", "--model", str(exported), "--configs", "5w1s")
    assert result.returncode != 0 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --every-step: ") and "maml-export --every-step" in lines[0]


@pytest.mark.skipif(not HAS_TORCH, reason="the optional PyTorch peer")
@pytest.mark.slow
def test_pytorch_peer_stops_where_the_graphs_stop_and_runs_every_step_under_every_step(tmp_path):
    """The bundled weights x16 saturate the 1-shot support loss (test_export): the graphs run no step, and the
    PyTorch peer, its softmax exact as theirs, none either; with every_step it runs all 5, to the same logits."""
    import dataclasses
    from maml_export.checkpoint import as_deployed, default_checkpoint, load_checkpoint, save_checkpoint
    from maml_export.data import synthetic_tasks
    from maml_export.export import export_model
    from maml_export.bench.benchmark import graph_steps
    from maml_export.bench.runtimes import host, load_exported, onnxruntime, pytorch_eager
    ckpt = as_deployed(load_checkpoint(default_checkpoint()), query_norm="support")
    if ckpt.config.head_init != "prototypes":
        pytest.skip("needs the bundled prototype-head weights")
    export_model(save_checkpoint(tmp_path / "x16.npz", as_deployed(ckpt, feature_scale=16)), tmp_path / "out",
                 steps=5, tasks=1)
    exp = load_exported(tmp_path / "out" / "model.onnx")
    t = synthetic_tasks(1, 5, 1, 15, seed=2)
    feeds = (t.x_spt[0], t.y_spt[0], t.x_qry[0])
    graph = onnxruntime(exp, "cpu", 1)(*feeds)()
    assert graph_steps(exp, *feeds[:2]) == 0
    for every_step, steps in ((False, 0), (True, 5)):
        call = pytorch_eager(dataclasses.replace(exp, every_step=every_step))(*feeds)
        got = host(call())
        assert call.steps_run() == steps and np.abs(got - graph).max() <= 1e-4 * np.abs(graph).max(), every_step


def test_cli_cuda_without_the_provider_is_one_line_and_no_cpu_numbers():
    import onnxruntime
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    result = bench("--provider", "cuda", "--configs", "5w1s", "--runs", "1")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "CUDAExecutionProvider" in lines[0], result.stderr
    assert 'pip uninstall -y onnxruntime onnxruntime-gpu && pip install "onnxruntime-gpu>=1.21"' in lines[0]
    assert result.stdout == ""  # no table, no CPU figures passed off as GPU ones


NO_PADDLE = """import sys
sys.modules["paddle"] = None  # importing Paddle now fails, as on a deployment machine without it
from bench.__main__ import main
main(sys.argv[1:])
"""


def test_kit_times_the_graph_without_paddle_against_eager_paddles_logits(exported, tmp_path):
    kit = tmp_path / "kit"
    result = bench("--write-kit", str(kit), "--model", str(exported), "--configs", "5w1s", "--task-batch", "2")
    assert result.returncode == 0 and "wrote the kit" in result.stdout, result.stderr[-3000:]
    assert all((kit / "5way" / name).is_file() for name in ("model.onnx", "adapt.onnx", "predict.onnx"))
    with np.load(kit / "5w1s.npz") as z:
        assert z["x_spt"].shape == (5, 1, 28, 28) and z["x_qry"].shape == (75, 1, 28, 28)
        assert z["float32"].shape == z["float64"].shape == (75, 5)
        # the batched rows' 2 tasks, the first of them the single rows' task
        assert z["batch_x_spt"].shape == (2, 5, 1, 28, 28) and z["batch_float64"].shape == (2, 75, 5)
        assert (z["batch_x_qry"][0] == z["x_qry"]).all() and not (z["batch_x_qry"][1] == z["x_qry"]).all()
    run = subprocess.run([sys.executable, "-c", NO_PADDLE, "--kit", str(kit), "--configs", "5w1s", "--runs", "2",
                          "--task-batch", "2", "--json", str(tmp_path / "kit.json")], capture_output=True, text=True,
                         env=ENV, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads((tmp_path / "kit.json").read_text())
    rows = {r["runtime"]: r for r in doc["results"]}
    assert "onnxruntime" in rows and not {"paddle-eager", "paddlerec-loop", "paddle-inference"} & set(rows)
    r = rows["onnxruntime"]  # checked against the kit's eager Paddle logits: the same function
    assert r["queries"] == 75 and not r["flagged"] and r["max_rel_vs_eager"] < 1e-3, r
    for name in ("onnxruntime-batch", "onnxruntime-loop"):  # both tasks checked against their own logits
        assert rows[name]["queries"] == 150 and not rows[name]["flagged"] and rows[name]["task_batch"] == 2, rows[name]
    for name in ("onnxruntime adapt", "onnxruntime predict xQ"):  # the kit's halves, against the same logits
        assert rows[name]["queries"] == 75 and not rows[name]["flagged"], rows[name]
    # a transductive export's query alone is normalised with its own statistics: no reference to check it with
    assert rows["onnxruntime predict x1"]["max_rel_vs_eager"] is None and "not checked" in run.stdout
    other = bench("--kit", str(kit), "--configs", "5w1s", "--task-batch", "3")
    assert other.returncode != 0 and "holds 2 tasks a call" in other.stderr and "--task-batch 3" in other.stderr
    gemm, flops = doc["gemm_round_robin"]["5w1s"], doc["models"]["5w1s"]["flops"]
    assert flops == expected_5w1s_flops(exported)
    assert gemm["runs"] == 2 and doc["flop_floor_ms"]["5w1s"] == pytest.approx(flops / gemm["p50_gflops"] / 1e6)
    own = doc["flop_floor_ms"]["5w1s"] * r.get("flops", flops) / flops  # the work that ran
    assert r["floor_multiple"] == pytest.approx(r["p50_ms"] / own)
    missing = bench("--kit", str(kit), "--configs", "20w5s")
    assert missing.returncode != 0 and "the kit" in missing.stderr and "has no 20w5s" in missing.stderr
    (kit / "kit.json").write_text("{")
    corrupt = bench("--kit", str(kit))
    assert corrupt.returncode != 0 and len(corrupt.stderr.strip().splitlines()) == 1
    assert "not a readable benchmark kit" in corrupt.stderr and "--write-kit" in corrupt.stderr


def test_fixed_shape_copy_computes_the_same_logits(exported, tmp_path):
    import onnx
    import onnxruntime
    from maml_export.bench.runtimes import fixed_shapes
    rng = np.random.default_rng(0)
    feeds = {"x_spt": (rng.random((5, 1, 28, 28)) < 0.2).astype(np.float32), "y_spt": np.arange(5),
             "x_qry": (rng.random((10, 1, 28, 28)) < 0.2).astype(np.float32)}
    fixed = fixed_shapes(exported, feeds, tmp_path / "fixed.onnx")
    dims = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in onnx.load(str(fixed)).graph.input}
    assert dims == {"x_spt": [5, 1, 28, 28], "y_spt": [5], "x_qry": [10, 1, 28, 28]}
    a, b = (onnxruntime.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
            for p in (exported, fixed))
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(a).max())


@pytest.mark.parametrize("args, message", [
    (["--configs", "7x1s"], "--configs: '7x1s' is not a config like 5w1s"),
    (["--model", "/nonexistent/model.onnx"], "--model /nonexistent/model.onnx does not exist"),
    (["--runs", "0"], "--runs"),
])
def test_cli_bad_input_is_one_error_line(args, message):
    result = bench(*args)
    assert result.returncode != 0 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_cli_help_explains_the_options():
    result = bench("--help")
    assert result.returncode == 0
    for option in ("--provider", "--model", "--configs", "--steps", "--threads", "--warmup", "--runs", "--json",
                   "--data", "--tasks", "--task-batch", "--write-kit", "--kit", "--every-step"):
        assert option in result.stdout


# --- python -m bench.profile ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_profile_sums_steady_node_times_by_op_and_shape(tmp_path):
    from maml_export.export import export_model
    from maml_export.bench.profile import profile_graph

    export_model(out=tmp_path, steps=1, tasks=1, data=os.environ.get("OMNIGLOT_DIR"))
    report = profile_graph(tmp_path / "model.onnx", threads=1, shots=1, query=2, runs=3, warmup=1)
    ops = {r["op"]: r for r in report["by_op"]}
    assert report["nodes"] > 100 and ops["Conv"]["nodes"] >= 8 and ops["Conv"]["ms"] > 0
    assert sum(r["ms"] for r in report["by_op"]) == pytest.approx(report["total_ms"])
    assert sum(r["nodes"] for r in report["by_shape"]) == report["nodes"]
    assert any("10, 64, 14, 14" in r["shape"] for r in report["by_shape"] if r["op"] == "Conv")  # the query pass
    result = subprocess.run([sys.executable, "-m", "bench.profile", str(tmp_path), "--runs", "2", "--warmup", "2"],
                            capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert result.returncode == 1 and result.stderr.strip() == "error: runs (2) must exceed warmup (2)"
    # adapt.onnx profiles on the support set alone; predict.onnx needs a task's state: one line
    adapt = profile_graph(tmp_path / "adapt.onnx", threads=1, shots=1, query=2, runs=2, warmup=1)
    assert adapt["nodes"] > 0 and not any("10, 64, 14, 14" in r["shape"] for r in adapt["by_shape"])
    result = subprocess.run([sys.executable, "-m", "bench.profile", str(tmp_path / "predict.onnx")],
                            capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        "error: predict.onnx takes a task's state (conv1.weight, bn1.weight, bn1.bias, ...): profile model.onnx or "
        "adapt.onnx"]


@pytest.mark.parametrize("head_init", ["meta", "prototypes"])
@pytest.mark.slow
def test_peers_recover_the_weights_and_compute_the_graphs_function_for_either_head(head_init, tmp_path):
    """`load_exported` gives the Paddle peers the export's weights (a prototype head's parameters are not in the
    graph; a meta-learned head's are, here non-zero), and every peer computes the graph's logits."""
    import dataclasses
    from maml_export.checkpoint import as_deployed, default_checkpoint, load_checkpoint, save_checkpoint
    from maml_export.data import synthetic_tasks
    from maml_export.export import export_model
    from maml_export.bench.runtimes import load_exported, paddle_eager, paddlerec_loop, pytorch_eager
    # transductive and uncalibrated: the function PaddleRec's loop computes (queries normalised together, raw logits)
    ckpt = as_deployed(load_checkpoint(default_checkpoint()), head_init=head_init, query_norm="transductive",
                       temperature=1.0)
    if head_init == "meta":  # a head the graph must carry
        rng = np.random.default_rng(0)
        head = {k: (0.01 * rng.standard_normal(v.shape)).astype("float32") for k, v in ckpt.params.items() if k.startswith("fc")}
        ckpt = dataclasses.replace(ckpt, params={**ckpt.params, **head})
    export_model(save_checkpoint(tmp_path / "w.npz", ckpt), tmp_path / "out", steps=2, tasks=1)
    exp = load_exported(tmp_path / "out" / "model.onnx")
    assert exp.config.head_init == head_init and exp.params.keys() == ckpt.params.keys()
    assert all(np.array_equal(exp.params[k], v) for k, v in ckpt.params.items())
    t = synthetic_tasks(1, 5, 1, 3, seed=2)
    feeds = (t.x_spt[0], t.y_spt[0], t.x_qry[0])
    reference = paddle_eager(exp)(*feeds)()
    peers = [paddlerec_loop] + ([pytorch_eager] if importlib.util.find_spec("torch") else [])
    for peer in peers:
        got = np.asarray(peer(exp)(*feeds)())
        assert np.abs(got - reference).max() <= 1e-4 * np.abs(reference).max(), peer.__name__


def test_other_ways_use_the_bundled_checkpoint_of_those_ways(exported, tmp_path):
    """`--configs 20w1s` beside the 5-way graph times the bundled 20-way weights (whatever either's head init),
    not the 5-way backbone with a zero head."""
    from maml_export.checkpoint import PRETRAINED_DIR
    from maml_export.bench.runtimes import load_exported, reheaded
    if not (PRETRAINED_DIR / "omniglot-20w1s.npz").is_file():
        pytest.skip("no bundled 20-way checkpoint")
    got = reheaded(load_exported(exported), 20, tmp_path, None)
    assert got.source == "bundled omniglot-20w1s.npz" and got.config.ways == 20


def test_cli_json_that_cannot_be_written_is_one_line_before_the_benchmark(tmp_path, read_only_dir):
    (tmp_path / "a-file").write_text("")
    for path, reason in ((read_only_dir / "bench.json", "cannot write there"),
                         (tmp_path / "a-file" / "bench.json", "lies under the file"),
                         (tmp_path / "missing" / "bench.json", "does not exist")):
        result = bench("--configs", "5w1s", "--runs", "1", "--json", str(path))
        assert result.returncode == 1 and result.stdout == "", result.stderr  # no table: nothing was timed
        assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"error: --json {path}")
        assert reason in result.stderr


def test_stream_times_one_image_after_another_on_one_learned_task(exported_support):
    """python -m bench.stream: predict.onnx back to back on one adapted state; JSON with the per-image figures."""
    done = subprocess.run([sys.executable, "-m", "bench.stream", str(exported_support.parent), "--images", "20",
                           "--warmup", "2", "--threads", "1"], capture_output=True, text=True, env=ENV, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["images"] == 20 and 0 < doc["predict_one_p50_ms"] <= doc["predict_one_p90_ms"]
    assert doc["adapt_p50_ms"] > doc["predict_one_p50_ms"] and doc["images_per_s"] > 0


def test_a_model_with_learned_step_sizes_is_refused_not_compared(tmp_path):
    """The peers take one step size: a --learn-inner-lr model would have them do other work than its graphs, so
    the benchmark refuses it in one line, before exporting anything."""
    from maml_export.bench.runtimes import export_checkpoint
    from maml_export.checkpoint import Checkpoint, save_checkpoint
    from maml_export.config import MamlConfig
    from maml_export.errors import ConfigError
    from maml_export.maml import step_size_shapes
    from maml_export.model import Model
    config = MamlConfig(learn_inner_lr=True, inner_steps=2)
    model = Model.from_specs(config.layers)
    params = {**model.init_params(0), **{k: np.full(s, 0.1, "float32") for k, s in step_size_shapes(model, 2).items()}}
    path = save_checkpoint(tmp_path / "lslr.npz", Checkpoint(config, params))
    with pytest.raises(ConfigError, match="learned a step size per layer and step"):
        export_checkpoint(path, tmp_path / "out", 2, None, None, "test")
    assert not (tmp_path / "out").exists()
