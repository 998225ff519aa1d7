"""The benchmark family: how fast the exported graphs adapt and predict, beside their peers and the machine.

Built on the library (`maml_export`), which never imports it; the CLIs are in the repository's bench/ folder
(`maml-bench`, `python -m bench.profile`, ...).

  runtimes    the runtimes maml-bench compares (onnxruntime, eager Paddle, the PaddleRec loop, PyTorch, ...)
  benchmark   adapt-then-predict latency beside the peers, of the same work (`maml-bench`)
  machine     the machine: FLOPs of an adaptation, the GEMM rate its floor is measured against
  bound       the products of an adaptation timed alone: how far below the graph a runtime could go
  kit         a benchmark kit: the graphs and tasks for a machine without Paddle (read numpy-only)
  profile     where an exported graph spends its time in onnxruntime (`python -m bench.profile`)
  paddlerec   the PaddleRec-style reference loop (tests and benchmarks)
"""
