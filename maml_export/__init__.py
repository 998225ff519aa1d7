"""maml-export: meta-train MAML with Paddle and export its adaptation as one static graph.

Modules, one concern each:
  layers      layers with hand-written backward in forward ops (the core trick)
  model       conv-4 and other layer sequences; flat named parameters
  maml        adaptation (inner SGD) and meta-gradients, first- or second-order
  data        Omniglot loading (npz, official zips or folders), the split, the task sampler
  config      the typed configuration every CLI fills and every checkpoint and export carries
  checkpoint  atomic, pickle-free checkpoints (weights + config + optimizer + sampler state)
  trainer     the meta-training loop behind `python -m train`
"""
import os as _os
import warnings as _warnings

# Paddle's CPU kernels use an old MKL that takes a slow generic path on AMD CPUs (this machine is an
# AMD EPYC: 36 -> 194 GFLOP/s for a 2048^3 matmul on 2 threads with this set). It must be set before
# paddle loads MKL, and it is a no-op on Intel CPUs and newer MKLs.
_os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")
# Paddle warns at import about a C++ extension cache this project never uses.
_warnings.filterwarnings("ignore", message="No ccache found")

__version__ = "0.1.0"
