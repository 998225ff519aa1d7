"""Winograd F(2x2,3x3) forward of a 3x3, pad-1 convolution in stock ONNX ops against onnxruntime's Conv with non-constant
weights (docs/benchmarks.md, every step ahead of PyTorch): times and exactness per shape, then a per-node profile of
the conv2 shape. `python bench/experiments/winograd_conv.py` (2 threads; nothing else running)."""
import collections, json, os, tempfile, time

import numpy as np, onnxruntime as ort
from onnx import helper, numpy_helper as nh, TensorProto as TP
Bt = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32)
G = np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], np.float32)
At = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)
B = Bt.T
def build(N, C, O, H):
    T = (H + 1) // 2  # tiles per side (output 2T >= H, cropped)
    # input transform as a depthwise conv: kernel for tile entry (i,j) is B[:,i] outer B[:,j]
    k = np.einsum("ai,bj->ijab", B, B).reshape(16, 1, 4, 4)
    kin = np.tile(k, (C, 1, 1, 1)).astype(np.float32)  # (C*16, 1, 4, 4)
    # pads: top/left 1; bottom/right so that (H + 1 + r - 4)/2 + 1 = T
    r = 2 * T + 2 - H - 1
    gk = np.einsum("ia,jb->abij", G, G).reshape(9, 16).astype(np.float32)  # w(O*C,9) @ gk -> U (O*C,16)
    at2 = np.einsum("pi,qj->pqij", At, At).reshape(4, 16).astype(np.float32)
    inits = [nh.from_array(kin, "kin"), nh.from_array(gk, "gk"), nh.from_array(at2, "at2"),
             nh.from_array(np.array([N, C, 16, T * T], np.int64), "s1"), nh.from_array(np.array([16, C, N * T * T], np.int64), "s2"),
             nh.from_array(np.array([O * C, 9], np.int64), "s3"), nh.from_array(np.array([O, C, 16], np.int64), "s4"),
             nh.from_array(np.array([16, -1], np.int64), "s5"), nh.from_array(np.array([4, O, N, T * T], np.int64), "s6"),
             nh.from_array(np.array([N, O * 4, T, T], np.int64), "s7"),
             nh.from_array(np.array([0, 0], np.int64), "st"), nh.from_array(np.array([H, H], np.int64), "en"), nh.from_array(np.array([2, 3], np.int64), "ax")]
    nodes = [
        helper.make_node("Conv", ["x", "kin"], ["v0"], group=C, strides=[2, 2], pads=[1, 1, r, r]),  # (N, C*16, T, T)
        helper.make_node("Reshape", ["v0", "s1"], ["v1"]),
        helper.make_node("Transpose", ["v1"], ["v2"], perm=[2, 1, 0, 3]),  # (16, C, N, T*T)
        helper.make_node("Reshape", ["v2", "s2"], ["V"]),
        helper.make_node("Reshape", ["w", "s3"], ["w2"]),
        helper.make_node("MatMul", ["w2", "gk"], ["u0"]),  # (O*C, 16)
        helper.make_node("Reshape", ["u0", "s4"], ["u1"]),
        helper.make_node("Transpose", ["u1"], ["U"], perm=[2, 0, 1]),  # (16, O, C)
        helper.make_node("MatMul", ["U", "V"], ["M"]),  # (16, O, N*T*T)
        helper.make_node("Reshape", ["M", "s5"], ["m2"]),
        helper.make_node("MatMul", ["at2", "m2"], ["y0"]),  # (4, O*N*T*T)
        helper.make_node("Reshape", ["y0", "s6"], ["y1"]),
        helper.make_node("Transpose", ["y1"], ["y2"], perm=[2, 1, 0, 3]),  # (N, O, 4, T*T)
        helper.make_node("Reshape", ["y2", "s7"], ["y3"]),
        helper.make_node("DepthToSpace", ["y3"], ["y4"], blocksize=2, mode="CRD"),  # (N, O, 2T, 2T)
    ]
    if 2 * T != H:
        nodes.append(helper.make_node("Slice", ["y4", "st", "en", "ax"], ["y"]))
    else:
        nodes[-1].output[0] = "y"
    return helper.make_model(helper.make_graph(nodes, "w", [helper.make_tensor_value_info("x", TP.FLOAT, [N, C, H, H]),
        helper.make_tensor_value_info("w", TP.FLOAT, [O, C, 3, 3])], [helper.make_tensor_value_info("y", TP.FLOAT, None)], inits),
        opset_imports=[helper.make_opsetid("", 17)])
def sess(m, threads=2):
    so = ort.SessionOptions(); so.intra_op_num_threads = threads
    return ort.InferenceSession(m.SerializeToString(), so)
def p50(s, feeds):
    for _ in range(30): s.run(None, feeds)
    ts = []
    for _ in range(300):
        t = time.perf_counter(); s.run(None, feeds); ts.append(time.perf_counter() - t)
    return np.median(ts) * 1e3
for N, H in ((5, 14), (5, 7), (25, 14), (25, 7), (5, 3)):
    C = O = 64
    x = np.random.randn(N, C, H, H).astype("float32"); w = (np.random.randn(O, C, 3, 3) * 0.05).astype("float32")
    conv = sess(helper.make_model(helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "c",
        [helper.make_tensor_value_info("x", TP.FLOAT, [N, C, H, H]), helper.make_tensor_value_info("w", TP.FLOAT, [O, C, 3, 3])],
        [helper.make_tensor_value_info("y", TP.FLOAT, None)]), opset_imports=[helper.make_opsetid("", 17)]))
    wino = sess(build(N, C, O, H))
    f = {"x": x, "w": w}
    a, b = conv.run(None, f)[0], wino.run(None, f)[0]
    rel = np.abs(a - b).max() / np.abs(a).max()
    print(f"N={N} {H}x{H}: Conv {p50(conv, f):.3f} ms, Winograd {p50(wino, f):.3f} ms, max rel diff {rel:.1e}")

# where the conv2 shape's time goes, node by node
so = ort.SessionOptions(); so.intra_op_num_threads = 2; so.enable_profiling = True
so.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "winograd")  # not in the working directory
N, H = 5, 14
s = ort.InferenceSession(build(N, 64, 64, H).SerializeToString(), so)
f = {"x": np.random.randn(N, 64, H, H).astype("float32"), "w": np.random.randn(64, 64, 3, 3).astype("float32")}
for _ in range(100): s.run(None, f)
profile = s.end_profiling()
ev = json.load(open(profile))
os.remove(profile)
d = collections.defaultdict(list)
for e in ev:
    if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
        d[e["args"]["op_name"] + " " + e["name"].split("_kernel")[0]].append(e["dur"])
for k, v in sorted(d.items(), key=lambda kv: -np.median(kv[1][20:])):
    print(f"{np.median(v[20:]):7.0f} us  {k}")
