// Drawings and image files -> the model's pixels, as the protocol makes them from Omniglot's drawings.
//
// The one definition the page and Python share: an ink image (uint8, 255 = ink, 0 = paper) resized to the
// model's size with Pillow's LANCZOS and divided by 255 -- maml_export/data.py `drawing_pixels` for a drawing,
// export/predict.py `load_image` for an image file. `resizeLanczos` is Pillow's own arithmetic
// (libImaging/Resample.c, 8 bits per pixel): fixed-point taps, a horizontal pass, then a vertical pass
// reading the rounded 8-bit rows, so its bytes are Pillow's, not those of "a Lanczos filter".
// tests/test_web.py checks both against Pillow, in Node and in Chromium.
//
// A drawing on the page is what an Omniglot drawing is: a binary DRAWING_SIZE x DRAWING_SIZE image (the
// pen's anti-aliased edge cut at gray 128, as data.py `_png_paper` reads the official PNGs).
// No DOM at import time: Node imports this module too.

export const DRAWING_SIZE = 105; // Omniglot's drawings are 105 x 105
export const PAPER_FROM = 128; // gray >= 128 is paper (data.py `_png_paper`)
// Omniglot's strokes are about 5 px wide at 105 x 105 (ink runs across a stroke: median 6 px).
export const PEN_WIDTH = 5;

const PRECISION_BITS = 32 - 8 - 2; // Resample.c: 8-bit pixels times 22-bit taps fit in an int32
const SUPPORT = 3.0; // LANCZOS: a 3-lobed windowed sinc

function sinc(x) {
  if (x === 0.0) return 1.0;
  x *= Math.PI;
  return Math.sin(x) / x;
}

function lanczos(x) {
  return -3.0 <= x && x < 3.0 ? sinc(x) * sinc(x / 3.0) : 0.0;
}

/** Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for LANCZOS along one axis: for each output
 *  pixel, the first input pixel it reads (`bounds[2i]`), how many (`bounds[2i+1]`), and their 22-bit taps
 *  (`taps[i * ksize ...]`). */
export function lanczosTaps(inSize, outSize) {
  const scale = inSize / outSize;
  const filterscale = Math.max(scale, 1.0); // upscaling keeps the filter's own width
  const support = SUPPORT * filterscale;
  const ksize = Math.ceil(support) * 2 + 1;
  const bounds = new Int32Array(outSize * 2);
  const taps = new Int32Array(outSize * ksize);
  const weights = new Float64Array(ksize);
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const ss = 1.0 / filterscale;
    const xmin = Math.max(Math.trunc(center - support + 0.5), 0); // C's (int): truncation
    const count = Math.min(Math.trunc(center + support + 0.5), inSize) - xmin;
    let sum = 0.0;
    for (let x = 0; x < count; x++) {
      weights[x] = lanczos((x + xmin - center + 0.5) * ss);
      sum += weights[x];
    }
    for (let x = 0; x < count; x++) {
      const w = sum !== 0.0 ? weights[x] / sum : weights[x];
      // round half away from zero, then C's truncating (int)
      taps[xx * ksize + x] = Math.trunc(w < 0 ? -0.5 + w * 2 ** PRECISION_BITS : 0.5 + w * 2 ** PRECISION_BITS);
    }
    bounds[2 * xx] = xmin;
    bounds[2 * xx + 1] = count;
  }
  return { bounds, taps, ksize };
}

function clip8(sum) {
  if (sum >= 2 ** (PRECISION_BITS + 8)) return 255;
  if (sum <= 0) return 0;
  return sum >> PRECISION_BITS; // sum < 2^30 here: an int32 shift is exact
}

/** uint8 [h * w] -> uint8 [outH * outW], row-major: `Image.fromarray(a, "L").resize((outW, outH),
 *  Image.Resampling.LANCZOS)`. An axis whose size does not change is not filtered (as in Pillow). */
export function resizeLanczos(src, w, h, outW, outH) {
  let rows = src; // [h, w]
  if (outW !== w) {
    const { bounds, taps, ksize } = lanczosTaps(w, outW);
    rows = new Uint8Array(h * outW);
    for (let y = 0; y < h; y++) {
      for (let xx = 0; xx < outW; xx++) {
        const xmin = bounds[2 * xx], count = bounds[2 * xx + 1], k = xx * ksize;
        let sum = 1 << (PRECISION_BITS - 1); // + 0.5: the shift rounds
        for (let x = 0; x < count; x++) sum += src[y * w + xmin + x] * taps[k + x];
        rows[y * outW + xx] = clip8(sum);
      }
    }
  }
  if (outH === h) return rows === src ? Uint8Array.from(src) : rows;
  const { bounds, taps, ksize } = lanczosTaps(h, outH);
  const out = new Uint8Array(outH * outW);
  for (let yy = 0; yy < outH; yy++) {
    const ymin = bounds[2 * yy], count = bounds[2 * yy + 1], k = yy * ksize;
    for (let x = 0; x < outW; x++) {
      let sum = 1 << (PRECISION_BITS - 1);
      for (let y = 0; y < count; y++) sum += rows[(ymin + y) * outW + x] * taps[k + y];
      out[yy * outW + x] = clip8(sum);
    }
  }
  return out;
}

/** Ink uint8 [h * w] (255 = ink) -> the model's pixels, Float32Array [size * size], ink 1.0, paper 0.0. */
export function inkToPixels(ink, w, h, size) {
  const resized = resizeLanczos(ink, w, h, size, size);
  const pixels = new Float32Array(size * size);
  // float64 division rounded to float32 = float32 division (numpy's `/ float32(255)`)
  for (let i = 0; i < pixels.length; i++) pixels[i] = resized[i] / 255;
  return pixels;
}

/** Pillow's RGB -> L (ITU-R 601-2 luma in 16-bit fixed point, libImaging/Convert.c), per RGBA pixel. */
export function grayOf(rgba) {
  const gray = new Uint8Array(rgba.length / 4);
  for (let i = 0; i < gray.length; i++) {
    gray[i] = (rgba[4 * i] * 19595 + rgba[4 * i + 1] * 38470 + rgba[4 * i + 2] * 7471 + 0x8000) >> 16;
  }
  return gray;
}

/** A drawing's RGBA pixels (dark ink on white) -> binary ink, uint8 255 = ink: the pen's edge cut at gray
 *  PAPER_FROM, as data.py reads Omniglot's binary drawings. */
export function drawingInk(rgba) {
  return grayOf(rgba).map((g) => (g >= PAPER_FROM ? 0 : 255));
}

/** An image file's RGBA pixels, composited on white paper -> ink = 255 - gray, as export/predict.py
 *  `load_image` reads any image file (not binarised: a photo or scan keeps its gray levels). */
export function imageInk(rgba) {
  return grayOf(rgba).map((g) => 255 - g);
}
