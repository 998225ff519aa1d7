"""The hardware's floor: the FLOPs of an adaptation, and the rate this machine multiplies matrices at.

`count_flops(specs, support, query, steps)` counts 2 x multiply-adds of the convolutions and the linear
head (per SGD step on the support set: forward, weight gradients, input gradients except the first
layer's; then one forward on the query set), summed over `matrix_products`, the same work as im2col
matrix products (which `bound.product_bound` times alone). `gemm_gflops(threads)` is numpy's float32
2048^3 matmul on `threads` threads (`GemmWorker`, one matmul per call, lets `maml-bench` time it
round-robin with the rows), `gpu_gemm_gflops()` PyTorch's fp32 4096^3 one on the GPU; FLOPs / rate is
the floor `maml-bench` reports every row as a multiple of, measured in the same run as the rows.

Example:
    >>> from maml_export.specs import conv4_specs
    >>> count_flops(conv4_specs(5), support=5, query=75, steps=5) / 1e9  # 5-way 1-shot, 5 steps
    2.9220288
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from typing import NamedTuple

from ..errors import MamlError
from ..specs import support_views


def available_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one): the default thread count
    of `maml-bench` and `python -m bench.bound`."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Product(NamedTuple):
    """One matrix product of an adaptation, (m, k) x (k, n), done `count` times. A convolution's spans
    `images` images along `axis`: n for a forward or input gradient, k for a weight gradient (a sum over
    the images); a linear layer's has images 1 and no axis (one column per image, nothing to split)."""
    what: str
    m: int
    k: int
    n: int
    count: int
    images: int = 1
    axis: str = ""

    @property
    def flops(self) -> int:
        return 2 * self.m * self.k * self.n * self.count


def matrix_products(specs: list[dict], support: int, query: int, steps: int, image_size: int = 28) -> list[Product]:
    """The matrix products of `steps` SGD steps on `support` images, then one forward on `query` images,
    as im2col sees them (a convolution is (out, in*k*k) x (in*k*k, images*h*w)); per SGD step each layer's
    forward, weight gradient and input gradient, except the first layer's input gradient (the image's). Under
    the head's support_shift the steps run on 9 views of each support image (`specs.support_views`)."""
    size, layers = image_size, []  # (name, out, in, per image spatial size)
    support *= support_views(specs)
    for s in specs:
        if s["type"] == "Conv2d":
            size = (size + 2 * s["padding"] - s["kernel"]) // s["stride"] + 1
            fan_in = s["in_channels"] * s["kernel"] ** 2
            layers.append((f"conv{len(layers) + 1}", s["out_channels"], fan_in, size * size))
        elif s["type"] == "Linear":
            layers.append((f"linear{len(layers) + 1}", s["out_features"], s["in_features"], 1))
        elif s["type"] == "MaxPool2":
            size //= 2
    products = []
    for j, (name, out, fan_in, hw) in enumerate(layers):
        for images, count, gradients in ((support, steps, True), (query, 1, False)):
            if not (images and count):
                continue
            n, split = images * hw, (images, "n") if hw > 1 else ()
            products.append(Product(f"{name} forward", out, fan_in, n, count, *split))
            if gradients:
                products.append(Product(f"{name} weight gradient", out, n, fan_in, count, *(split and (images, "k"))))
                if j:
                    products.append(Product(f"{name} input gradient", fan_in, out, n, count, *split))
    return products


def count_flops(specs: list[dict], support: int, query: int, steps: int, image_size: int = 28) -> int:
    """FLOPs (2 x MACs of Conv2d and Linear layers) of `steps` SGD steps on `support` images, then one
    forward on `query` images; the first layer's input gradient (the image's) is never computed."""
    return sum(p.flops for p in matrix_products(specs, support, query, steps, image_size))


_GEMM_WORKER = """import sys, numpy as np
n = int(sys.argv[1]); a, b = (np.random.default_rng(i).standard_normal((n, n), dtype=np.float32) for i in (0, 1))
out = np.empty((n, n), np.float32)
for _ in sys.stdin:  # one line in, one matmul, one line out
    np.matmul(a, b, out=out); print(flush=True)"""


class GemmWorker:
    """numpy's float32 n^3 matmul in a child process whose OpenBLAS has `threads` threads
    (OPENBLAS_NUM_THREADS only takes effect before numpy is imported); each call multiplies once.

    A callable like the runtimes' calls, so `maml-bench` times the floor's GEMM round-robin with the
    rows it is the floor of: a burst of load on a shared machine then falls on both in the same rounds.
    (Measured once before the rows, the rate read 89-142 GFLOP/s across one day's runs on this 2-core
    machine, and every row's "x floor" moved with it.) The pipe's round trip, ~0.1 ms, is timed with the
    ~100 ms product.
    """

    def __init__(self, threads: int, n: int = 2048):
        self.flops = 2 * n ** 3
        env = {**os.environ, "OPENBLAS_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
        self.process = subprocess.Popen([sys.executable, "-c", _GEMM_WORKER, str(n)], env=env, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def __call__(self) -> None:
        try:
            self.process.stdin.write("\n")
            self.process.stdin.flush()
            done = self.process.stdout.readline()
        except BrokenPipeError:
            done = ""
        if not done:
            raise MamlError(f"the floor's GEMM worker (numpy, pid {self.process.pid}) exited with status "
                            f"{self.process.wait()}")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()  # the worker's loop ends at end of input
            self.process.wait(timeout=30)

    def __enter__(self) -> "GemmWorker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def gemm_gflops(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """numpy's float32 n^3 matmul rate on `threads` threads, best of `repeats` after a warm-up."""
    with GemmWorker(threads, n) as gemm:
        gemm()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            gemm()
            best = min(best, time.perf_counter() - start)
    return gemm.flops / best / 1e9


def machine_info(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), cpu)
    dists = [d.metadata["Name"] for d in metadata.distributions()]
    versions = {d: metadata.version(d) for d in ("maml-export", "paddlepaddle", "paddlepaddle-gpu", "onnxruntime",
                                                 "onnxruntime-gpu", "onnx", "paddle2onnx", "numpy", "torch") if d in dists}
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "python": platform.python_version(),
            "platform": platform.platform(), "versions": versions}


def gpu_name() -> str:
    """The first GPU's name, by nvidia-smi (onnxruntime cannot say), else PyTorch; "unknown GPU" without either."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
        if out:
            name, driver = (s.strip() for s in out[0].split(","))
            return f"{name} (driver {driver})"
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    try:
        import torch
        return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - no PyTorch or no device
        return "unknown GPU"


def gpu_gemm_gflops(n: int = 4096) -> float | None:
    """The GPU's fp32 (TF32 off) n^3 matmul rate by PyTorch, best of 10 after a warm-up; None without one."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    torch.backends.cuda.matmul.allow_tf32 = False
    a, b = (torch.randn(n, n, device="cuda") for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return 2 * n ** 3 / best / 1e9
