// The page maml-web serves: draw or drop a few examples per class, Learn (adapt in this page), then draw or
// drop new images and see their class as you draw. Everything runs here, with maml.mjs and onnxruntime-web.
//
// `window.mamlPage` holds what the page did, for whoever drives it (tests/test_web.py): ready, error,
// examples (per class: the model pixels of each example), results (each classified file: name, pixels,
// logits, label, probability, ms), drawing (the query drawing's last prediction and its pixels), pending
// (a prediction of the drawing running or due) and timings {load, learn[], predict[]} in ms.
import { load } from "./maml.mjs";
import { DRAWING_SIZE, PEN_WIDTH, drawingInk, imageInk, inkToPixels } from "./pixels.mjs";

const $ = (id) => document.getElementById(id);
const page = (window.mamlPage = { ready: false, error: null, examples: [], results: [], drawing: null,
                                  pending: false, timings: { load: null, learn: [], predict: [] } });
let shown = null; // the prediction the bars show
let model, names = [];

function showError(error) {
  page.error = String(error?.message ?? error);
  $("error").textContent = page.error;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
}

/** A 105 x 105 drawing surface (Omniglot's size) shown larger; strokes by mouse, touch or pen. */
function drawingPad(canvas, onStroke) {
  canvas.width = canvas.height = DRAWING_SIZE;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  const clear = () => { ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, DRAWING_SIZE, DRAWING_SIZE); drawn = false; };
  let last = null, drawn = false;
  clear();
  const at = (e) => {
    const r = canvas.getBoundingClientRect();
    return [((e.clientX - r.left) * DRAWING_SIZE) / r.width, ((e.clientY - r.top) * DRAWING_SIZE) / r.height];
  };
  const line = (from, to) => {
    Object.assign(ctx, { strokeStyle: "#000", lineWidth: PEN_WIDTH, lineCap: "round", lineJoin: "round" });
    ctx.beginPath();
    ctx.moveTo(...from);
    ctx.lineTo(...to);
    ctx.stroke();
    drawn = true;
    onStroke?.();
  };
  canvas.addEventListener("pointerdown", (e) => {
    canvas.setPointerCapture(e.pointerId);
    last = at(e);
    line(last, last); // a dot
  });
  canvas.addEventListener("pointermove", (e) => {
    if (!last) return;
    const p = at(e);
    line(last, p);
    last = p;
  });
  for (const end of ["pointerup", "pointercancel"]) canvas.addEventListener(end, () => { last = null; });
  return {
    clear,
    get drawn() { return drawn; },
    /** the drawing as the model's pixels: binary ink at 105 x 105, LANCZOS to the model's size */
    pixels: () => inkToPixels(drawingInk(ctx.getImageData(0, 0, DRAWING_SIZE, DRAWING_SIZE).data),
                              DRAWING_SIZE, DRAWING_SIZE, model.imageSize),
  };
}

/** An image file as the model's pixels, as maml-predict reads it: on white paper, ink = 255 - gray. */
async function filePixels(file) {
  const bitmap = await createImageBitmap(file);
  const canvas = document.createElement("canvas");
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.fillStyle = "#fff"; // transparent pixels are paper
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.drawImage(bitmap, 0, 0);
  const rgba = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
  return inkToPixels(imageInk(rgba), canvas.width, canvas.height, model.imageSize);
}

/** Paint model pixels (ink 1.0) on a small canvas, dark ink on white. */
function paint(canvas, pixels) {
  const size = model.imageSize;
  canvas.width = canvas.height = size;
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(size, size);
  pixels.forEach((v, i) => {
    const g = Math.round(255 * (1 - Math.min(Math.max(v, 0), 1)));
    image.data.set([g, g, g, 255], 4 * i);
  });
  ctx.putImageData(image, 0, 0);
  return canvas;
}

function onFiles(target, input, handle) {
  input.addEventListener("change", async () => { await handle([...input.files]); input.value = ""; });
  target.addEventListener("dragover", (e) => { e.preventDefault(); target.classList.add("dragover"); });
  target.addEventListener("dragleave", () => target.classList.remove("dragover"));
  target.addEventListener("drop", async (e) => {
    e.preventDefault();
    target.classList.remove("dragover");
    await handle([...e.dataTransfer.files]);
  });
}

function classCard(c) {
  const card = document.createElement("div");
  card.className = "card";
  card.innerHTML = `<input class="name" value="class ${c + 1}" aria-label="name of class ${c + 1}">
    <canvas class="drawing" aria-label="draw an example of class ${c + 1}"></canvas>
    <div class="buttons"><button class="add">Add</button><button class="clear">Clear</button>
      <label class="file">files... <input type="file" accept="image/*" multiple data-class="${c}"></label></div>
    <div class="thumbs"></div><small class="count">no examples yet</small>`;
  const pad = drawingPad(card.querySelector("canvas"));
  const name = card.querySelector("input.name");
  names[c] = name.value;
  name.addEventListener("input", () => { names[c] = name.value || `class ${c + 1}`; refresh(); });
  const add = (pixels) => {
    page.examples[c].push(Array.from(pixels));
    card.querySelector(".thumbs").append(paint(document.createElement("canvas"), pixels));
    const n = page.examples[c].length;
    card.querySelector(".count").textContent = `${n} example${n > 1 ? "s" : ""}`;
    $("learn").disabled = page.examples.some((e) => e.length === 0);
  };
  card.querySelector(".add").addEventListener("click", () => {
    if (!pad.drawn) return showError(`draw an example of ${names[c]} first`);
    clearError();
    add(pad.pixels());
    pad.clear();
  });
  card.querySelector(".clear").addEventListener("click", pad.clear);
  onFiles(card, card.querySelector("input[type=file]"), async (files) => {
    clearError();
    for (const file of files) {
      try { add(await filePixels(file)); } catch (e) { showError(`${file.name}: ${e.message ?? e}`); }
    }
  });
  return card;
}

async function learn() {
  clearError();
  const images = [], labels = [];
  page.examples.forEach((examples, c) => examples.forEach((x) => { images.push(x); labels.push(c); }));
  try {
    const { ms } = await model.learn(images, labels);
    page.timings.learn.push(ms);
    $("learn-time").textContent = `learned ${images.length} examples in ${ms.toFixed(0)} ms (${model.steps} SGD steps, in this page)`;
    if (query.drawn) livePredict();
  } catch (e) {
    showError(e);
  }
}

function bars(result) {
  shown = result;
  $("top").textContent = `${names[result.label]}: ${(100 * result.probability).toFixed(1)} %`;
  $("bars").replaceChildren(...Array.from(result.probabilities, (p, c) => {
    const row = document.createElement("div");
    row.className = c === result.label ? "bar best" : "bar";
    row.innerHTML = `<span></span><span><div class="fill" style="width:${(100 * p).toFixed(1)}%"></div></span><span>${(100 * p).toFixed(1)} %</span>`;
    row.firstChild.textContent = names[c];
    return row;
  }));
  $("predict-time").textContent = `predicted in ${result.ms.toFixed(1)} ms`;
}

function refresh() {
  if (shown) bars(shown);
}

// Predict while drawing: one prediction at a time, the latest strokes next.
let busy = false, query;
async function livePredict() {
  if (!model?.state) return; // nothing learned yet: the drawing waits for Learn
  page.pending = true;
  if (busy) return; // the running loop predicts the latest strokes next
  busy = true;
  try {
    while (page.pending) {
      page.pending = false;
      const pixels = query.pixels();
      paint($("query-pixels"), pixels);
      const result = await model.predict(pixels);
      page.timings.predict.push(result.ms);
      page.drawing = { ...result, pixels: Array.from(pixels), logits: Array.from(result.logits) };
      bars(result);
    }
    clearError();
  } catch (e) {
    showError(e);
  } finally {
    busy = false;
    page.pending = false;
  }
}

async function classifyFiles(files) {
  clearError();
  if (!model.state) return showError("press Learn first");
  for (const file of files) {
    try {
      const pixels = await filePixels(file);
      const result = await model.predict(pixels);
      page.timings.predict.push(result.ms);
      page.results.push({ name: file.name, pixels: Array.from(pixels), logits: Array.from(result.logits),
                          label: result.label, probability: result.probability, ms: result.ms });
      paint($("query-pixels"), pixels);
      bars(result);
      const item = document.createElement("li");
      item.append(paint(document.createElement("canvas"), pixels), `${names[result.label]} ${(100 * result.probability).toFixed(0)} %`);
      item.firstChild.className = "pixels";
      item.title = file.name;
      $("results").append(item);
    } catch (e) {
      showError(`${file.name}: ${e.message ?? e}`);
    }
  }
}

async function main() {
  const threads = new URLSearchParams(location.search).get("threads");
  model = await load("/model/", threads ? { threads: Number(threads) } : {});
  page.model = model;
  page.timings.load = model.loadMs;
  page.examples = Array.from({ length: model.ways }, () => []);
  document.querySelectorAll(".ways").forEach((e) => { e.textContent = model.ways; });
  $("classes").replaceChildren(...Array.from({ length: model.ways }, (_, c) => classCard(c)));
  query = drawingPad($("query"), livePredict);
  $("query-clear").addEventListener("click", () => { query.clear(); });
  onFiles(document.querySelector(".predict-row"), $("query-files"), classifyFiles);
  $("learn").addEventListener("click", learn);
  const cfg = model.metadata.config_name ? `${model.metadata.config_name}, ` : "";
  $("status").textContent = `${cfg}${model.ways}-way, ${model.steps} steps; loaded in ${model.loadMs.toFixed(0)} ms ` +
    `(onnxruntime-web WASM, ${model.threads} thread${model.threads > 1 ? "s" : ""})` +
    (model.calibrated ? "" : "; its probabilities are not calibrated (temperature 1): scores, not chances");
  page.ready = true;
}

main().catch(showError);
