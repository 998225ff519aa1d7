"""maml-export: meta-train MAML with Paddle and export its adaptation as ONNX graphs (adapt, predict, both).

Modules, one concern each:
  layers      layers with hand-written backward in forward ops (the core trick)
  model       conv-4 and other layer sequences; flat named parameters
  maml        adaptation (inner SGD) and meta-gradients, first- or second-order
  data        Omniglot loading (npz, official zips or folders), the split, the task sampler
  images      image file -> model input: the one preprocessing (channels, size, pixels, resize) training and
              prediction share (numpy + Pillow only)
  folders     your own images: image-folder and csv layouts, their split, their task sampler; open_dataset
  download    Omniglot's official zips into the cache, md5-checked (`maml-train download`)
  config      the typed configuration every CLI fills and every checkpoint and export carries
  checkpoint  atomic, pickle-free checkpoints (weights + config + optimizer + sampler state)
  optim       Adam with pickle-free state
  trainer     the meta-training loop behind `python -m train`
  distributed splitting a meta-batch over paddle.distributed ranks
  paddlerec   the PaddleRec-style reference loop (tests and benchmarks)
  contract    the exported graphs' file, input and output names and tolerances (numpy only)
  export      static graphs + ONNX export (`maml-export`): model, adapt and predict
  parity      the export's validation: eager Paddle vs static program vs onnxruntime, the halves vs the whole
  calibration the temperature that makes deployed probabilities calibrated, and their ECE (numpy only)
  adapter     running an export with onnxruntime and numpy only: Adapter, and Task (adapt once, predict many)
  runtimes    the runtimes maml-bench compares (onnxruntime, eager Paddle, the PaddleRec loop, ...)
  benchmark   adapt-then-predict latency beside the peers (`maml-bench`)
  profile     where an exported graph spends its time in onnxruntime (`python -m bench.profile`)
  outputs     checking that an output path can be written, before the long work
  cli         the console scripts' shared error handling (one `error:` line, non-zero exit)
"""
import os as _os
import warnings as _warnings

# Paddle's CPU kernels use an old MKL that takes a slow generic path on AMD CPUs (this machine is an
# AMD EPYC: 36 -> 194 GFLOP/s for a 2048^3 matmul on 2 threads with this set). It must be set before
# paddle loads MKL, and it is a no-op on Intel CPUs and newer MKLs.
_os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")


def _keep_freed_memory() -> None:
    """Make glibc reuse freed memory instead of returning it to the OS.

    Paddle's CPU allocator hands every tensor to malloc; glibc serves large blocks with mmap and
    unmaps them on free, so each new activation tensor page-faults its memory in again. With eager
    ops producing tens of MB per call, that page-faulting cost more than the arithmetic (an element-wise
    multiply of 3.8M floats: 12 ms -> 3 ms). No-op where glibc's mallopt is unavailable.
    """
    if _os.environ.get("MAML_EXPORT_KEEP_MALLOC"):
        return
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX = 0: large blocks come from the heap, which is reused
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD = 1 GiB: do not give the heap top back eagerly
    except (OSError, AttributeError):
        pass


_keep_freed_memory()
# Paddle warns at import about a C++ extension cache this project never uses.
_warnings.filterwarnings("ignore", message="No ccache found")
# Tracing `zeros_like` into a PIR program warns that the tensor has no place; harmless, and it would
# break maml-export's progress lines.
_warnings.filterwarnings("ignore", message="Tensor do not have 'place' interface")

__version__ = "0.1.0"
