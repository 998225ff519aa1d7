// Learn new classes in the browser from an export of maml-export, with onnxruntime-web (WASM): adapt.onnx
// once on a few labelled images, then predict.onnx on one image at a time (docs/deploy.md#in-a-browser).
//
//   import { load } from "./maml.mjs";
//   const model = await load("/model/");          // the folder maml-export wrote: adapt.onnx, predict.onnx
//   await model.learn(images, labels);             // images: Float32Array(size * size) each; labels 0..ways-1
//   const { label, probability, probabilities, logits, ms } = await model.predict(image);
//
// Images are the model's pixels: image_size x image_size (28 for Omniglot), row-major, ink 1.0, paper 0.0
// (pixels.mjs makes them from a drawing or an image file as the protocol does). `learn` feeds adapt.onnx's
// outputs (the fast weights and the support's batch-norm statistics) BY NAME into predict.onnx, as
// maml_export/adapter.py does; each query is normalised with the support set's statistics, so one image
// gets the class it gets in any batch. The logits are already divided by the export's calibration
// temperature: their softmax is the probability.
//
// The module imports "onnxruntime-web/wasm": a bundler resolves it from npm, a page maps it with an import
// map (index.html maps it to the copy maml-web serves, so that nothing is fetched from the network).
import * as ort from "onnxruntime-web/wasm";

// maml_export/contract.py: the graphs' names and the metadata every export carries
const SUPPORT_IMAGES = "x_spt", SUPPORT_LABELS = "y_spt", QUERY_IMAGES = "x_qry", LOGITS = "logits";
const REQUIRED_METADATA = ["ways", "steps", "inner_lr", "image_size", "channels"];
// maml_export/adapter.py `pixel_problem`: what is clearly not "[0, 1], ink 1.0, paper 0.0"
const RANGE_SLACK = 0.01, INKED = 0.75, BLANK = 0.05;

/** An export's graphs, loaded: `learn` a task, then `predict` images. */
export class Model {
  constructor(adapt, predict, metadata, loadMs) {
    this.adapt = adapt;
    this.predictor = predict;
    this.metadata = metadata;
    this.ways = Number(metadata.ways);
    this.steps = Number(metadata.steps);
    this.imageSize = Number(metadata.image_size);
    this.channels = Number(metadata.channels);
    this.loadMs = loadMs;
    // whether the probabilities mean what they say: a temperature fitted on validation tasks, recorded (exports
    // before the record: any temperature but 1 was fitted), as adapter.Adapter.calibrated
    this.calibrated = "calibration" in metadata ? metadata.calibration !== "none" : Number(metadata.temperature ?? 1) !== 1;
    this.state = null; // adapt.onnx's outputs by name, once learned
    this.stateNames = predict.inputNames.filter((n) => n !== QUERY_IMAGES);
    const missing = this.stateNames.filter((n) => !adapt.outputNames.includes(n));
    if (missing.length) throw new Error(`predict.onnx takes ${missing.join(", ")}, which adapt.onnx does not give`);
  }

  /** Adapt to a support set (adapt.onnx: the export's SGD steps, once). images: `ways` or more images
   *  (Float32Array or arrays of imageSize * imageSize pixels), labels: their classes, every one of
   *  0..ways-1 present. Returns {ms}: how long adapting took (adapt.onnx's run). */
  async learn(images, labels) {
    if (images.length !== labels.length || images.length === 0) {
      throw new Error(`learn needs one label per image and at least one image (got ${images.length} images, ${labels.length} labels)`);
    }
    const ys = labels.map((y, i) => {
      if (!Number.isInteger(y) || y < 0 || y >= this.ways) throw new Error(`label ${i} is ${y}, outside 0..${this.ways - 1}`);
      return BigInt(y);
    });
    const absent = [...Array(this.ways).keys()].filter((c) => !labels.includes(c));
    if (absent.length) throw new Error(`no image of class ${absent.join(", ")}: a ${this.ways}-way model needs every class 0..${this.ways - 1}`);
    const feeds = {
      [SUPPORT_IMAGES]: this.#batch("support image", images),
      [SUPPORT_LABELS]: new ort.Tensor("int64", BigInt64Array.from(ys), [ys.length]),
    };
    return serially(async () => {
      const start = performance.now();
      const state = await this.adapt.run(feeds);
      this.state = Object.fromEntries(this.stateNames.map((n) => [n, state[n]]));
      return { ms: performance.now() - start };
    });
  }

  /** Classify one image with the learned task (predict.onnx): {label, probability, probabilities, logits,
   *  ms}, probabilities and logits Float32Array [ways], ms: how long predicting took (predict.onnx's run and the
   *  softmax). */
  async predict(image) {
    if (!this.state) throw new Error("learn a task first: predict classifies with the task learned last");
    const x = this.#batch("image", [image]);
    return serially(async () => {
      const start = performance.now();
      const out = await this.predictor.run({ ...this.state, [QUERY_IMAGES]: x }, [LOGITS]);
      const logits = Float32Array.from(out[LOGITS].data);
      const probabilities = softmax(logits);
      const ms = performance.now() - start;
      let label = 0;
      for (let c = 1; c < logits.length; c++) if (logits[c] > logits[label]) label = c;
      return { label, probability: probabilities[label], probabilities, logits, ms };
    });
  }

  /** Free the WASM sessions. */
  async release() {
    await serially(() => Promise.all([this.adapt.release(), this.predictor.release()]));
  }

  #batch(what, images) {
    const n = this.channels * this.imageSize * this.imageSize;
    const data = new Float32Array(images.length * n);
    images.forEach((image, i) => {
      if (image.length !== n) throw new Error(`${what} ${i} has ${image.length} pixels, the model takes ${this.channels} x ${this.imageSize} x ${this.imageSize} = ${n}`);
      const pixels = Float32Array.from(image);
      const problem = pixelProblem(pixels);
      if (problem) throw new Error(`${what} ${i} is ${problem}: the model takes [0, 1], ink 1.0, paper 0.0`);
      data.set(pixels, i * n);
    });
    return new ort.Tensor("float32", data, [images.length, this.channels, this.imageSize, this.imageSize]);
  }
}

/** Load an export: `modelUrl` is the folder (URL) holding adapt.onnx and predict.onnx. Options: threads
 *  (onnxruntime-web's WASM threads; more than 1 needs a cross-origin isolated page, which maml-web serves),
 *  wasmPaths (where onnxruntime-web's .wasm is, if not beside its module), warmup (default true: one
 *  adapt and one predict at load time, so that the first `learn` is not the one paying WASM's first-run
 *  setup). */
export async function load(modelUrl, { threads, wasmPaths, warmup = true } = {}) {
  const start = performance.now();
  if (threads !== undefined) ort.env.wasm.numThreads = threads;
  if (wasmPaths !== undefined) ort.env.wasm.wasmPaths = wasmPaths;
  const base = modelUrl.endsWith("/") ? modelUrl : modelUrl + "/";
  const [adaptBytes, predictBytes] = await Promise.all(["adapt.onnx", "predict.onnx"].map((f) => fetchBytes(base + f)));
  const metadata = onnxMetadata(adaptBytes);
  const missing = REQUIRED_METADATA.filter((k) => !(k in metadata));
  if (missing.length) throw new Error(`${base}adapt.onnx is not a maml-export graph (no metadata ${missing.join(", ")})`);
  if (Number(metadata.task_batch || 0)) throw new Error(`${base} adapts ${metadata.task_batch} tasks per call (--task-batch): export without it`);
  if (onnxMetadata(predictBytes).weights_sha256 !== metadata.weights_sha256) {
    throw new Error(`${base}predict.onnx was exported from other weights than adapt.onnx: export again`);
  }
  const options = { executionProviders: ["wasm"], graphOptimizationLevel: "all" };
  const adapt = await serially(() => ort.InferenceSession.create(adaptBytes, options));
  const predict = await serially(() => ort.InferenceSession.create(predictBytes, options));
  const model = new Model(adapt, predict, metadata, 0);
  model.threads = ort.env.wasm.numThreads; // what onnxruntime-web chose, once a session exists
  if (warmup) await warm(model);
  model.loadMs = performance.now() - start;
  return model;
}

/** One adapt and one predict on made-up images (a shifted diagonal per class), then forget them. */
async function warm(model) {
  const size = model.imageSize, images = [];
  for (let c = 0; c < model.ways; c++) {
    const image = new Float32Array(model.channels * size * size);
    for (let i = 0; i < size; i++) image[(i % size) * size + ((i + c) % size)] = 1.0; // a shifted diagonal
    images.push(image);
  }
  await model.learn(images, images.map((_, c) => c));
  await model.predict(images[0]);
  model.state = null;
}

// onnxruntime-web's WASM backend must not interleave two runs, of one session or of two (seen: a page's
// warm-up running while another model learned failed with "Can't access output tensor data... non-tensor
// typed value"); every call into it goes through this queue, so that a prediction asked for while
// learning, or two models on one page, simply wait their turn.
let queue = Promise.resolve();
function serially(work) {
  const done = queue.then(work);
  queue = done.catch(() => {});
  return done;
}

async function fetchBytes(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`cannot fetch ${url}: HTTP ${response.status}`);
  return new Uint8Array(await response.arrayBuffer());
}

/** Softmax in float64, as Float32Array. */
export function softmax(logits) {
  const top = Math.max(...logits);
  const e = Array.from(logits, (v) => Math.exp(v - top));
  const sum = e.reduce((a, b) => a + b, 0);
  return Float32Array.from(e, (v) => v / sum);
}

/** What is clearly wrong with one image for "[0, 1], ink 1.0, paper 0.0" (adapter.py `pixel_problem`), or null. */
export function pixelProblem(pixels) {
  let low = Infinity, high = -Infinity, inked = 0;
  for (const v of pixels) {
    if (!Number.isFinite(v)) return "not finite (NaN or infinite values)";
    low = Math.min(low, v);
    high = Math.max(high, v);
    if (v >= 0.5) inked++;
  }
  if (low < -RANGE_SLACK || high > 1 + RANGE_SLACK) return `outside [0, 1] (values ${low} to ${high})`;
  if (high - low < BLANK) return `blank (every pixel ${low.toFixed(2)}: ${low < 0.5 ? "nothing drawn" : "all ink"})`;
  if (inked / pixels.length > INKED) return `inverted (${Math.round((100 * inked) / pixels.length)}% of its pixels are ink)`;
  return null;
}

/** An ONNX file's metadata_props (ModelProto field 14: key 1, value 2), read from its protobuf bytes:
 *  onnxruntime-web does not expose them. Only the top-level fields are walked; the graph is skipped. */
export function onnxMetadata(bytes) {
  const metadata = {};
  const decoder = new TextDecoder();
  let pos = 0;
  const varint = (end) => {
    let value = 0, shift = 1;
    for (;;) {
      if (pos >= end) throw new Error("not an ONNX file (truncated varint)");
      const b = bytes[pos++];
      value += (b & 0x7f) * shift; // plain arithmetic: lengths above 2^31 stay exact
      if (b < 0x80) return value;
      shift *= 128;
    }
  };
  const fields = (end, visit) => {
    while (pos < end) {
      const key = varint(end), field = Math.floor(key / 8), wire = key % 8;
      if (wire === 0) varint(end);
      else if (wire === 1) pos += 8;
      else if (wire === 5) pos += 4;
      else if (wire === 2) {
        const length = varint(end), stop = pos + length;
        if (stop > end) throw new Error("not an ONNX file (a field runs past the end)");
        visit(field, stop);
        pos = stop;
      } else throw new Error(`not an ONNX file (wire type ${wire})`);
    }
  };
  fields(bytes.length, (field, stop) => {
    if (field !== 14) return;
    const entry = {};
    fields(stop, (f, s) => { if (f === 1 || f === 2) entry[f] = decoder.decode(bytes.subarray(pos, s)); });
    if (entry[1] !== undefined) metadata[entry[1]] = entry[2] ?? "";
  });
  return metadata;
}
