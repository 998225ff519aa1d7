"""Process settings under which Paddle runs well here, applied explicitly: every console script applies them
(`cli.run`), and a library user who wants them calls `configure()` before anything imports Paddle.
`import maml_export` changes nothing in the process.

Example:
    >>> import maml_export.process
    >>> maml_export.process.configure()     # first, then:
    >>> from maml_export.trainer import train
"""
from __future__ import annotations

import os
import warnings


def configure() -> None:
    """Apply the settings below to this process; idempotent, and environment variables a user set win.

    - `MKL_DEBUG_CPU_TYPE=5`: Paddle's CPU kernels use an old MKL that takes a slow generic path on AMD CPUs
      (an AMD EPYC: 36 -> 194 GFLOP/s for a 2048^3 matmul on 2 threads with it). Read when Paddle loads MKL;
      a no-op on Intel CPUs and newer MKLs.
    - `GLOG_minloglevel=2`: Paddle's glog INFO/WARNING lines ("New Executor is Running", a warning from inside
      `Tensor.mean`) would break progress lines and tables; errors still show. Read when Paddle loads.
    - glibc keeps freed memory (`keep_freed_memory`).
    - Two harmless warnings are silenced: Paddle's "No ccache found" at import (a C++ extension cache this
      project never uses), and "Tensor do not have 'place' interface" when `zeros_like` is traced into a
      PIR program (it would break maml-export's progress lines).
    """
    os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")
    os.environ.setdefault("GLOG_minloglevel", "2")
    keep_freed_memory()
    warnings.filterwarnings("ignore", message="No ccache found")
    warnings.filterwarnings("ignore", message="Tensor do not have 'place' interface")


def keep_freed_memory() -> None:
    """Make glibc reuse freed memory instead of returning it to the OS.

    Paddle's CPU allocator hands every tensor to malloc; glibc serves large blocks with mmap and unmaps them
    on free, so each new activation tensor page-faults its memory in again. With eager ops producing tens of
    MB per call, that page-faulting cost more than the arithmetic (an element-wise multiply of 3.8M floats:
    12 ms -> 3 ms). Skipped when MAML_EXPORT_KEEP_MALLOC is set; a no-op where glibc's mallopt is unavailable.
    """
    if os.environ.get("MAML_EXPORT_KEEP_MALLOC"):
        return
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX = 0: large blocks come from the heap, which is reused
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD = 1 GiB: do not give the heap top back eagerly
    except (OSError, AttributeError):
        pass


def set_threads(threads: int | None) -> int:
    """Set Paddle's CPU threads (its kernels default to one) to `threads`, default every core; returns it."""
    import paddle  # here, not at the top: `configure()` must be able to run before Paddle loads

    threads = threads or os.cpu_count() or 1
    paddle.base.core.set_num_threads(threads)
    return threads
