// The annotation page: plain JS against the service's JSON protocol (schemas/interactive.py).
// State lives here; the server only answers clicks from its cached embedding and commits.
"use strict";

const $ = (id) => document.getElementById(id);
const imageCanvas = $("image"), overlay = $("overlay");
const COLOURS = { current: [40, 120, 255], accepted: [40, 190, 80], prefill: [255, 150, 30], dropped: [150, 150, 150] };

let list = [];          // [{index, uri}]
let opened = null;      // OpenResponse of the image on screen
let prefill = [];       // [{mask: PrefillMask, bits, dropped}]
let accepted = [];      // [{mask: AcceptedMask, bits}]
let prompt = null;      // {points: [[x, y]], labels: [], box, lowRes, text, response, bits}
let history = [];       // prompts before each change, for undo
let drag = null;        // box being drawn: {x0, y0, x1, y1}
let busy = false;

// ---- COCO RLE ----------------------------------------------------------------------------------
// Compressed counts: 5-bit groups in chars offset by 48, 0x20 = more groups, 0x10 = negative;
// from the third count on, a count is stored as the difference to the one two places back.
function rleCounts(s) {
  const counts = [];
  let p = 0;
  while (p < s.length) {
    let x = 0, k = 0, more = true;
    while (more) {
      const c = s.charCodeAt(p++) - 48;
      x |= (c & 0x1f) << (5 * k);
      more = (c & 0x20) !== 0;
      k++;
      if (!more && (c & 0x10)) x |= -1 << (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  return counts;
}

// H x W row-major Uint8Array of a COCO RLE (whose runs are column-major).
function rleBits(rle) {
  const [h, w] = rle.size, bits = new Uint8Array(h * w);
  let i = 0, on = false;
  for (const n of rleCounts(rle.counts)) {
    if (on) for (let j = i; j < i + n; j++) bits[(j % h) * w + Math.floor(j / h)] = 1;
    i += n;
    on = !on;
  }
  return bits;
}

// ---- drawing ----------------------------------------------------------------------------------
function render() {
  const w = overlay.width, h = overlay.height;
  const ctx = overlay.getContext("2d");
  const data = ctx.createImageData(w, h);
  const paint = (bits, [r, g, b], alpha) => {
    for (let p = 0; p < bits.length; p++) {
      if (!bits[p]) continue;
      const o = 4 * p;
      data.data[o] = r; data.data[o + 1] = g; data.data[o + 2] = b; data.data[o + 3] = alpha;
    }
  };
  for (const m of prefill) paint(m.bits, m.dropped ? COLOURS.dropped : COLOURS.prefill, m.dropped ? 60 : 110);
  for (const m of accepted) paint(m.bits, COLOURS.accepted, 120);
  if (prompt && prompt.bits) paint(prompt.bits, COLOURS.current, 130);
  ctx.putImageData(data, 0, 0);
  if (prompt) {
    prompt.points.forEach(([x, y], i) => {
      ctx.beginPath();
      ctx.arc(x + 0.5, y + 0.5, Math.max(3, w / 150), 0, 2 * Math.PI);
      ctx.fillStyle = prompt.labels[i] ? "#22cc44" : "#ee2222";
      ctx.fill();
      ctx.strokeStyle = "#fff";
      ctx.stroke();
    });
    if (prompt.box) strokeBox(ctx, prompt.box, "#2255ff");
  }
  if (drag) strokeBox(ctx, [drag.x0, drag.y0, drag.x1, drag.y1], "#ffffff");
  // For automation and debugging: the current mask as drawn (pixels, sum of row-major indices).
  let pixels = 0, indexSum = 0;
  if (prompt && prompt.bits) prompt.bits.forEach((b, p) => { if (b) { pixels++; indexSum += p; } });
  overlay.dataset.maskPixels = pixels;
  overlay.dataset.maskIndexSum = indexSum;
  overlay.dataset.accepted = accepted.length;
}

function strokeBox(ctx, [x0, y0, x1, y1], colour) {
  ctx.lineWidth = 2;
  ctx.strokeStyle = colour;
  ctx.strokeRect(Math.min(x0, x1), Math.min(y0, y1), Math.abs(x1 - x0), Math.abs(y1 - y0));
}

function status(text) { $("status").textContent = text; }

// ---- protocol ---------------------------------------------------------------------------------
async function api(method, path, body) {
  const r = await fetch(path, {
    method, headers: body ? { "Content-Type": "application/json" } : {},
    body: body ? JSON.stringify(body) : undefined,
  });
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(`${r.status}: ${typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail)}`);
  return data;
}

async function openImage(index) {
  if (index < 0 || index >= list.length) { status("no more images"); return; }
  busy = true;
  status(`opening ${list[index].uri} …`);
  const t0 = performance.now();
  opened = await api("POST", `/api/images/${index}/open`);
  const img = new Image();
  await new Promise((resolve, reject) => {
    img.onload = resolve;
    img.onerror = () => reject(new Error(`cannot load image ${index}`));
    img.src = `/api/images/${index}/image.png`;
  });
  // Fit the stage (small images are enlarged, up to 4x); clicks map back through the CSS size.
  const stage = $("stage");
  const scale = Math.min(4, (stage.clientWidth - 16) / opened.width, (stage.clientHeight - 16) / opened.height);
  for (const c of [imageCanvas, overlay]) {
    c.width = opened.width; c.height = opened.height;
    c.style.width = `${Math.round(opened.width * scale)}px`;
    c.style.height = `${Math.round(opened.height * scale)}px`;
  }
  imageCanvas.getContext("2d").drawImage(img, 0, 0);
  prefill = opened.prefill.map((m) => ({ mask: m, bits: rleBits(m.segmentation), dropped: false }));
  accepted = []; prompt = null; history = [];
  document.querySelectorAll("#images li").forEach((li, i) => li.classList.toggle("current", i === index));
  const ms = (performance.now() - t0).toFixed(0);
  status(`${opened.uri}: ${opened.width}x${opened.height}, ${prefill.length} pre-filled` +
         (opened.encoded ? `, embedded in ${opened.encode_ms.toFixed(0)} ms` : ", embedding cached") +
         (opened.committed ? " · already in the dataset" : "") + ` (${ms} ms)`);
  busy = false;
  render();
}

async function runPrompt(next) {
  busy = true;
  history.push(prompt);
  const body = { index: opened.index, image_id: opened.image_id, points: next.points, labels: next.labels,
                 box: next.box, mask_input: next.lowRes };
  if (next.text) body.text = next.text;
  const t0 = performance.now();
  try {
    const res = await api("POST", "/api/predict", body);
    // foundBy: the words that started this object, kept through later refining clicks.
    const foundBy = next.text || (prompt && next.points.length ? prompt.foundBy : null) || null;
    prompt = { ...next, lowRes: res.low_res, response: res, bits: rleBits(res.segmentation), foundBy };
    status(`mask: ${res.area} px, predicted IoU ${res.score.toFixed(2)}, ` +
           `${(performance.now() - t0).toFixed(0)} ms (server ${res.server_ms.toFixed(0)} ms)`);
  } catch (e) {
    history.pop();
    status(`error: ${e.message}`);
  }
  busy = false;
  render();
}

function findText(text) {
  text = text.trim();
  if (!text) return;
  runPrompt({ points: [], labels: [], box: null, lowRes: null, text });  // words name a new object
}

function addPoint(x, y, label) {
  // Clicks refine the current mask through its low-res logits; the words have done their part.
  const base = prompt ? { ...prompt, text: null } : { points: [], labels: [], box: null, lowRes: null };
  runPrompt({ ...base, points: [...base.points, [x, y]], labels: [...base.labels, label] });
}

function setBox(box) {
  const base = prompt || { points: [], labels: [], box: null, lowRes: null };
  runPrompt({ ...base, box, lowRes: null, text: null });  // a new box is a new object: start from no mask
}

function accept() {
  if (!prompt || !prompt.response) return;
  const pts = prompt.points.filter((_, i) => prompt.labels[i] === 1);
  const mask = { segmentation: prompt.response.segmentation, point_coords: pts,
                 predicted_iou: prompt.response.score };
  if (prompt.foundBy) mask.text_prompt = prompt.foundBy;
  accepted.push({ mask, bits: prompt.bits });
  prompt = null; history = [];
  status(`${accepted.length} accepted`);
  render();
}

function undo() {
  if (history.length) prompt = history.pop();
  else if (accepted.length) accepted.pop();
  render();
}

async function saveAndNext() {
  if (prompt && prompt.response) accept();
  const masks = prefill.filter((m) => !m.dropped).map(({ mask: m }) => ({
    segmentation: m.segmentation, point_coords: m.point_coords, predicted_iou: m.predicted_iou,
    stability_score: m.stability_score }));
  masks.push(...accepted.map((m) => m.mask));
  try {
    const res = await api("POST", "/api/commit", { index: opened.index, image_id: opened.image_id, masks });
    document.querySelectorAll("#images li")[opened.index].classList.add("done");
    status(`saved ${res.masks} masks as ${res.stage} (dataset version ${res.version})`);
    await openImage(opened.index + 1);
  } catch (e) {
    status(`not saved: ${e.message}`);
  }
}

// ---- input ------------------------------------------------------------------------------------
function pixel(ev) {
  const r = overlay.getBoundingClientRect();
  return [Math.floor((ev.clientX - r.left) * overlay.width / r.width),
          Math.floor((ev.clientY - r.top) * overlay.height / r.height)];
}

overlay.addEventListener("contextmenu", (ev) => ev.preventDefault());
overlay.addEventListener("mousedown", (ev) => {
  if (!opened || busy) return;
  const [x, y] = pixel(ev);
  drag = { x0: x, y0: y, x1: x, y1: y, button: ev.button, shift: ev.shiftKey, alt: ev.altKey, moved: false };
});
overlay.addEventListener("mousemove", (ev) => {
  if (!drag) return;
  [drag.x1, drag.y1] = pixel(ev);
  drag.moved = drag.moved || Math.abs(drag.x1 - drag.x0) + Math.abs(drag.y1 - drag.y0) > 4;
  if (drag.moved) render();
});
overlay.addEventListener("mouseup", () => {
  if (!drag) return;
  const d = drag;
  drag = null;
  if (d.moved) {
    setBox([Math.min(d.x0, d.x1), Math.min(d.y0, d.y1), Math.max(d.x0, d.x1), Math.max(d.y0, d.y1)]);
  } else if (d.alt) {
    const p = d.y0 * overlay.width + d.x0;
    prefill.filter((m) => m.bits[p]).forEach((m) => { m.dropped = !m.dropped; });
    render();
  } else {
    addPoint(d.x0, d.y0, d.button === 2 || d.shift ? 0 : 1);
  }
});

document.addEventListener("keydown", (ev) => {
  if (!opened || busy || ev.target.tagName === "INPUT") return;  // typing words is not a shortcut
  if (ev.key === "Enter") accept();
  else if (ev.key === "u" || (ev.key === "z" && (ev.ctrlKey || ev.metaKey))) undo();
  else if (ev.key === "Escape") { if (prompt) history.push(prompt); prompt = null; render(); }
  else if (ev.key === "n") saveAndNext();
});
$("accept").onclick = accept;
$("undo").onclick = undo;
$("clear").onclick = () => { if (prompt) history.push(prompt); prompt = null; render(); };
$("next").onclick = saveAndNext;
$("skip").onclick = () => openImage(opened ? opened.index + 1 : 0);
$("textform").onsubmit = (ev) => { ev.preventDefault(); if (opened && !busy) findText($("text").value); };

// ---- start: ?image=N opens image N, &click=x,y places a first foreground click, &text=words finds
// what the words name --------------------------------------------------------------------------
(async function start() {
  try {
    const info = await api("GET", "/api/images");
    list = info.images;
    $("stagename").textContent = `${info.stage}, round ${info.round}`;
    $("textform").hidden = $("texthelp").hidden = !info.text_prompts;
    const ul = $("images");
    for (const entry of list) {
      const li = document.createElement("li");
      li.textContent = entry.uri.split("/").pop();
      li.title = entry.uri;
      li.onclick = () => { if (!busy) openImage(entry.index); };
      ul.appendChild(li);
    }
    const q = new URLSearchParams(location.search);
    await openImage(Number(q.get("image") || 0));
    if (q.get("click")) {
      const [x, y] = q.get("click").split(",").map(Number);
      await runPrompt({ points: [[x, y]], labels: [1], box: null, lowRes: null });
    } else if (q.get("text") && info.text_prompts) {
      $("text").value = q.get("text");
      findText(q.get("text"));
    }
  } catch (e) {
    status(`error: ${e.message}`);
  }
})();
