"""maml-export: meta-train MAML with Paddle and export its adaptation as ONNX graphs (adapt, predict, both).

Importing the package changes nothing in the process; the console scripts apply `process.configure()`.

Modules, one concern each:
  layers      layers with hand-written backward in forward ops (the core trick)
  specs       layer specs: the JSON description of a network (numpy only)
  model       conv-4 and other layer sequences; flat named parameters
  maml        adaptation (inner SGD) and meta-gradients, first- or second-order
  data        Omniglot loading (npz, official zips or folders), the split, the task sampler
  protocol    the evaluation protocol's task streams (seeds) and its 95 % intervals (numpy only)
  images      image file -> model input: the one preprocessing (channels, size, pixels, resize) training and
              prediction share (numpy + Pillow only)
  folders     your own images: image-folder and csv layouts, their split, their task sampler; open_dataset
  recipe      the defaults of training on your own folder (drawings start from the shipped weights)
  suite       the robustness suite: Omniglot's drawings redrawn as people draw, and training's --augment-redraw
  download    Omniglot's official zips into the cache, md5-checked (`maml-train download`)
  config      the typed configuration every CLI fills and every checkpoint and export carries
  checkpoint  atomic, pickle-free checkpoints (weights + config + optimizer + sampler state)
  optim       Adam with pickle-free state
  trainer     the meta-training loop behind `python -m train` (`Training`: start/resume, step, validate, keep)
  distributed splitting a meta-batch over paddle.distributed ranks
  contract    the exported graphs' file, input and output names and tolerances (numpy only)
  export      static graphs + ONNX export (`maml-export`): model, adapt and predict
  parity      the export's validation: eager Paddle vs static program vs onnxruntime, the halves vs the whole
  calibration the temperature that makes deployed probabilities calibrated, and their ECE (numpy only)
  adapter     running an export with onnxruntime and numpy only: Adapter, and Task (adapt once, predict many)
  outputs     checking that an output path can be written, before the long work
  process     the process settings Paddle runs well under (applied by the CLIs; `configure()`)
  cli         the console scripts' shared error handling (one `error:` line, non-zero exit)
  bench/      the benchmark family, on top of the modules above (none of them imports it): see its docstring
"""
__version__ = "0.1.0"
