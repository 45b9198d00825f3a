// vaelens serve: the latent-space page. Plain JS and canvas; every number comes from /api.
"use strict";

const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
  "#bcbd22", "#17becf"];
const $ = (id) => document.getElementById(id);

const S = {
  info: null, map: null, agg: null,
  sel: null,            // the selected sample: {index, x, reconstruction, mu, sigma, label}
  draws: [],            // z of every draw so far for the selected sample, each (d,)
  drawStats: null,      // {count, mean, std} from the server
  seed: 0,
  pointerZ: null, decoded: null, decodes: 0,
  dimX: 0, dimY: 1, hover: -1,
  view: null, base: null,
  tp: null,             // the selected sample's true posterior: {z, weights, mean, mu, sigma, mu_opt, sigma_opt, ...}
  cov2: null,           // a full run's map covariance blocks for the shown pair: {x, y, cov: [[var x, cov xy, var y]]}
  prior: null,          // a mixture prior's density over the shown pair: {x, y, u, v, density, levels, name}
};

// --- requests --------------------------------------------------------------------------------
async function api(path, body) {
  const opts = body === undefined ? {} :
    { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const r = await fetch(path, opts);
  const data = await r.json();
  if (!r.ok) throw new Error(data.error || r.statusText);
  return data;
}

function setStatus(text) { $("status").textContent = text || ""; }

// --- numbers ---------------------------------------------------------------------------------
const fmt = (v) => (v === null || v === undefined) ? "" : (Math.abs(v) >= 1000 ? v.toExponential(2) : v.toFixed(3));

function quantile(sorted, q) {
  const i = Math.min(sorted.length - 1, Math.max(0, Math.round(q * (sorted.length - 1))));
  return sorted[i];
}

// The view spans the data's mu in the two chosen dimensions and at least the prior's ±3 (a mixture
// prior: and where its density encloses 86% of its mass).
function computeView() {
  const box = priorBox();
  const ext = (j, k) => {
    const v = S.map.mu.map((m) => m[j]).sort((a, b) => a - b);
    let lo = Math.min(quantile(v, 0.002), -3), hi = Math.max(quantile(v, 0.998), 3);
    if (box) { lo = Math.min(lo, box[k][0]); hi = Math.max(hi, box[k][1]); }
    const pad = 0.05 * (hi - lo);
    return [lo - pad, hi + pad];
  };
  const c = $("map");
  S.view = { x: ext(S.dimX, 0), y: ext(S.dimY, 1), w: c.clientWidth || 560, h: c.clientHeight || 560 };
}

// [[u lo, u hi], [v lo, v hi]] of the grid cells where the shown mixture prior's density is above its
// lowest contour level; null without one
function priorBox() {
  const P = S.info.prior !== "normal" && pairIs(S.prior) ? S.prior : null;
  if (!P) return null;
  const level = Math.min(...P.levels), box = [[Infinity, -Infinity], [Infinity, -Infinity]];
  P.density.forEach((row, a) => row.forEach((d, b) => {
    if (d < level) return;
    box[0] = [Math.min(box[0][0], P.u[b]), Math.max(box[0][1], P.u[b])];
    box[1] = [Math.min(box[1][0], P.v[a]), Math.max(box[1][1], P.v[a])];
  }));
  return box[0][0] <= box[0][1] ? box : null;
}

function toScreen(u, v) {
  const V = S.view;
  return [(u - V.x[0]) / (V.x[1] - V.x[0]) * V.w, (1 - (v - V.y[0]) / (V.y[1] - V.y[0])) * V.h];
}

function toLatent(px, py) {
  const V = S.view;
  return [V.x[0] + px / V.w * (V.x[1] - V.x[0]), V.y[0] + (1 - py / V.h) * (V.y[1] - V.y[0])];
}

function labelColor(label) {
  if (label === null || label === undefined) return "#4a78b5";
  const k = S.info.labels ? S.info.labels.indexOf(label) : label;
  return PALETTE[((k % PALETTE.length) + PALETTE.length) % PALETTE.length];
}

// --- the map ---------------------------------------------------------------------------------
function setupCanvas(c, w, h) {
  const dpr = window.devicePixelRatio || 1;
  c.width = Math.round(w * dpr); c.height = Math.round(h * dpr);
  const ctx = c.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  return ctx;
}

// The points are drawn once per choice of dimensions into an offscreen layer; overlays are cheap.
function renderBase() {
  computeView();
  const V = S.view;
  const off = document.createElement("canvas");
  const ctx = setupCanvas(off, V.w, V.h);
  ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, V.w, V.h);
  ctx.strokeStyle = "#eef0f2"; ctx.fillStyle = "#8a939c"; ctx.font = "10px sans-serif"; ctx.lineWidth = 1;
  for (let t = Math.ceil(V.x[0]); t <= V.x[1]; t++) {
    const [x] = toScreen(t, 0);
    ctx.beginPath(); ctx.moveTo(x, 0); ctx.lineTo(x, V.h); ctx.stroke(); ctx.fillText(String(t), x + 2, V.h - 3);
  }
  for (let t = Math.ceil(V.y[0]); t <= V.y[1]; t++) {
    const [, y] = toScreen(0, t);
    ctx.beginPath(); ctx.moveTo(0, y); ctx.lineTo(V.w, y); ctx.stroke(); ctx.fillText(String(t), 2, y - 2);
  }
  if (S.info.prior === "normal") {  // the prior's 1 and 2 sigma circles
    ctx.setLineDash([4, 4]); ctx.strokeStyle = "#9aa3ab";
    for (const r of [1, 2]) ellipse(ctx, 0, 0, r, r);
    ctx.setLineDash([]);
  } else if (pairIs(S.prior)) {
    drawPrior(ctx, S.prior);
  }
  ctx.globalAlpha = 0.55;
  const mu = S.map.mu, lab = S.map.label;
  for (let i = 0; i < mu.length; i++) {
    const [x, y] = toScreen(mu[i][S.dimX], mu[i][S.dimY]);
    ctx.fillStyle = labelColor(lab ? lab[i] : null);
    ctx.beginPath(); ctx.arc(x, y, 2.2, 0, 2 * Math.PI); ctx.fill();
  }
  ctx.globalAlpha = 1;
  S.base = off;
}

function ellipse(ctx, u, v, su, sv) {
  const [x, y] = toScreen(u, v);
  const rx = su / (S.view.x[1] - S.view.x[0]) * S.view.w, ry = sv / (S.view.y[1] - S.view.y[0]) * S.view.h;
  ctx.beginPath(); ctx.ellipse(x, y, Math.max(rx, 0.5), Math.max(ry, 0.5), 0, 0, 2 * Math.PI); ctx.stroke();
}

// The k-sigma ellipse of N((u, v), C) for a 2x2 covariance c = [var u, cov(u, v), var v], on a canvas whose
// axes scale u by sx and v by -sy (screen y points down). In screen units the covariance is D C D with
// D = diag(sx, -sy); its eigenvalues give the radii and its major eigenvector the rotation (radians,
// clockwise on screen, as ctx.ellipse takes it).
function screenEllipse(u, v, c, k, sx, sy) {
  const p = c[0] * sx * sx, q = -c[1] * sx * sy, r = c[2] * sy * sy;
  const mid = (p + r) / 2, half = Math.hypot((p - r) / 2, q);
  return { rx: k * Math.sqrt(mid + half), ry: k * Math.sqrt(Math.max(mid - half, 0)), angle: 0.5 * Math.atan2(2 * q, p - r) };
}

function covEllipse(ctx, u, v, c, k) {
  const V = S.view, [x, y] = toScreen(u, v);
  const e = screenEllipse(u, v, c, k, V.w / (V.x[1] - V.x[0]), V.h / (V.y[1] - V.y[0]));
  ctx.beginPath(); ctx.ellipse(x, y, Math.max(e.rx, 0.5), Math.max(e.ry, 0.5), e.angle, 0, 2 * Math.PI); ctx.stroke();
}

// [var x, cov xy, var y] of a full (d, d) covariance in the shown pair
const block = (C) => [C[S.dimX][S.dimX], C[S.dimX][S.dimY], C[S.dimY][S.dimY]];
const pairIs = (o) => o && o.x === S.dimX && o.y === S.dimY;

// mu ± 1 and 2 sigma: axis-aligned from sigma (a diagonal run), rotated from the 2x2 block c when given
function sampleEllipses(ctx, mu, sigma, color, width, c) {
  ctx.strokeStyle = color; ctx.lineWidth = width;
  for (const k of [1, 2]) {
    if (c) covEllipse(ctx, mu[S.dimX], mu[S.dimY], c, k);
    else ellipse(ctx, mu[S.dimX], mu[S.dimY], k * sigma[S.dimX], k * sigma[S.dimY]);
  }
  const [x, y] = toScreen(mu[S.dimX], mu[S.dimY]);
  ctx.fillStyle = color; ctx.beginPath(); ctx.arc(x, y, 3.5, 0, 2 * Math.PI); ctx.fill();
}

// A mixture prior's density over the shown pair: shaded (darker = denser), with dashed contours where it
// encloses 39% and 86% of the prior's mass, as N(0, I)'s 1- and 2-sigma circles do.
function drawPrior(ctx, P) {
  const G = P.u.length, H = P.v.length, D = P.density;
  let dmax = 0;
  for (const row of D) for (const d of row) dmax = Math.max(dmax, d);
  const img = document.createElement("canvas");
  img.width = G; img.height = H;
  const ictx = img.getContext("2d"), data = ictx.createImageData(G, H);
  for (let a = 0; a < H; a++) {
    for (let b = 0; b < G; b++) {
      const k = 4 * ((H - 1 - a) * G + b);  // image rows run down, v runs up
      data.data[k] = 90; data.data[k + 1] = 100; data.data[k + 2] = 115;
      data.data[k + 3] = Math.round(110 * D[a][b] / (dmax || 1));
    }
  }
  ictx.putImageData(data, 0, 0);
  const [x0, y0] = toScreen(P.u[0], P.v[H - 1]), [x1, y1] = toScreen(P.u[G - 1], P.v[0]);
  ctx.drawImage(img, x0, y0, x1 - x0, y1 - y0);
  ctx.setLineDash([4, 4]); ctx.strokeStyle = "#6b7580"; ctx.lineWidth = 1;
  for (const level of P.levels) contour(ctx, P, level);
  ctx.setLineDash([]);
}

// Marching squares: in each grid cell, the segment(s) where the bilinear density crosses `level`.
function contour(ctx, P, level) {
  const { u, v, density: D } = P;
  ctx.beginPath();
  for (let a = 0; a + 1 < v.length; a++) {
    for (let b = 0; b + 1 < u.length; b++) {
      const corners = [[b, a], [b + 1, a], [b + 1, a + 1], [b, a + 1]];
      const pts = [];
      for (let e = 0; e < 4; e++) {
        const [b0, a0] = corners[e], [b1, a1] = corners[(e + 1) % 4];
        const d0 = D[a0][b0] - level, d1 = D[a1][b1] - level;
        if ((d0 < 0) !== (d1 < 0)) {
          const t = d0 / (d0 - d1);
          pts.push(toScreen(u[b0] + t * (u[b1] - u[b0]), v[a0] + t * (v[a1] - v[a0])));
        }
      }
      for (let k = 0; k + 1 < pts.length; k += 2) { ctx.moveTo(pts[k][0], pts[k][1]); ctx.lineTo(pts[k + 1][0], pts[k + 1][1]); }
    }
  }
  ctx.stroke();
}

// What the shown pair needs beyond the map: a full run's covariance blocks, a mixture prior's density.
async function fetchPair() {
  const x = S.dimX, y = S.dimY, q = `?x=${x}&y=${y}`;
  if (x === y) return;
  try {
    const [cov2, prior] = await Promise.all([
      S.info.posterior === "full" ? api("/api/map_cov" + q) : null,
      S.info.prior !== "normal" ? api("/api/prior" + q) : null]);
    if (x !== S.dimX || y !== S.dimY) return;  // the dimensions changed meanwhile
    S.cov2 = cov2; S.prior = prior;
    renderBase(); renderMap();
    document.body.dataset.pair = `${x},${y}`;
  } catch (e) { setStatus(e.message); }
}

function renderMap() {
  const c = $("map"), V = S.view;
  const ctx = setupCanvas(c, V.w, V.h);
  ctx.drawImage(S.base, 0, 0, V.w, V.h);
  if (S.hover >= 0 && (!S.sel || S.map.index[S.hover] !== S.sel.index)) {
    sampleEllipses(ctx, S.map.mu[S.hover], S.map.sigma[S.hover], "rgba(60,60,60,0.8)", 1,
      pairIs(S.cov2) ? S.cov2.cov[S.hover] : null);
  }
  if (S.sel) {
    ctx.fillStyle = "rgba(192,57,43,0.55)";
    for (const z of S.draws) {
      const [x, y] = toScreen(z[S.dimX], z[S.dimY]);
      ctx.fillRect(x - 1.5, y - 1.5, 3, 3);
    }
    sampleEllipses(ctx, S.sel.mu, S.sel.sigma, "#111", 1.6, S.sel.cov && S.dimX !== S.dimY ? block(S.sel.cov) : null);
    if (S.drawStats) {  // the running empirical mean and std (a full run: covariance) of the draws, beside mu ± sigma
      const m = S.drawStats.mean, s = S.drawStats.std;
      ctx.setLineDash([3, 3]); ctx.strokeStyle = "#c0392b"; ctx.lineWidth = 1.2;
      if (S.drawStats.cov && S.dimX !== S.dimY) covEllipse(ctx, m[S.dimX], m[S.dimY], block(S.drawStats.cov), 1);
      else ellipse(ctx, m[S.dimX], m[S.dimY], s[S.dimX], s[S.dimY]);
      ctx.setLineDash([]);
    }
  }
  if (S.pointerZ) {
    const [x, y] = toScreen(S.pointerZ[S.dimX], S.pointerZ[S.dimY]);
    ctx.strokeStyle = "#000"; ctx.lineWidth = 1.5;
    ctx.beginPath();
    ctx.moveTo(x - 7, y); ctx.lineTo(x + 7, y); ctx.moveTo(x, y - 7); ctx.lineTo(x, y + 7);
    ctx.stroke();
  }
}

function nearestPoint(px, py, maxDist) {
  let best = -1, bestD = maxDist * maxDist;
  const mu = S.map.mu;
  for (let i = 0; i < mu.length; i++) {
    const [x, y] = toScreen(mu[i][S.dimX], mu[i][S.dimY]);
    const d = (x - px) * (x - px) + (y - py) * (y - py);
    if (d < bestD) { bestD = d; best = i; }
  }
  return best;
}

// --- images and tables -----------------------------------------------------------------------
function paintImage(canvas, values) {
  const [h, w] = S.info.image_shape;
  canvas.width = w; canvas.height = h;
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(w, h);
  const [lo, hi] = S.info.value_range;
  const span = hi > lo ? hi - lo : 1;
  for (let k = 0; k < w * h; k++) {
    const g = Math.round(255 * Math.min(1, Math.max(0, (values[k] - lo) / span)));
    img.data[4 * k] = g; img.data[4 * k + 1] = g; img.data[4 * k + 2] = g; img.data[4 * k + 3] = 255;
  }
  ctx.putImageData(img, 0, 0);
}

function renderSample() {
  if (!S.sel) return;
  $("sample-label").textContent = S.sel.label === null ? "" : "label " + labelName(S.sel.label);
  if (S.info.image_shape) {
    paintImage($("img-input"), S.sel.x);
    paintImage($("img-recon"), S.sel.reconstruction);
    if (S.decoded) paintImage($("img-decoded"), S.decoded);
  } else {
    renderFeatures();
  }
  renderStats();
}

function labelName(label) {
  if (!S.info.label_names) return String(label);
  const k = S.info.labels.indexOf(label);
  return k >= 0 ? S.info.label_names[k] : String(label);
}

function renderFeatures() {
  const bar = (v, j) => {
    const lo = S.info.feature_min[j], hi = S.info.feature_max[j], span = hi > lo ? hi - lo : 1;
    return `<div data-w="${Math.round(90 * Math.min(1, Math.max(0, (v - lo) / span)))}"></div>`;
  };
  let html = "<table><thead><tr><th>feature</th><th>input x</th><th>reconstruction</th><th>decoded at pointer</th>" +
    "<th></th></tr></thead><tbody>";
  S.info.feature_names.forEach((name, j) => {
    const d = S.decoded ? S.decoded[j] : null;
    html += `<tr><td>${escapeHtml(name)}</td><td>${fmt(S.sel.x[j])}</td><td>${fmt(S.sel.reconstruction[j])}</td>` +
      `<td class="decoded">${fmt(d)}</td><td class="bar">${d === null ? "" : bar(d, j)}</td></tr>`;
  });
  $("features").innerHTML = html + "</tbody></table>";
  // widths set through the DOM, not style="" attributes: the Content-Security-Policy forbids inline styles
  $("features").querySelectorAll("[data-w]").forEach((el) => { el.style.width = el.dataset.w + "px"; });
}

function escapeHtml(s) {
  const entities = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  return String(s).replace(/[&<>"']/g, (c) => entities[c]);
}

function renderStats() {
  const d = S.info.latent_dim;
  let html = "";
  for (let j = 0; j < d; j++) {
    const active = j === S.dimX || j === S.dimY ? ' class="active"' : "";
    html += `<tr${active}><td>z${j}</td><td>${fmt(S.sel.mu[j])}</td><td>${fmt(S.sel.sigma[j])}</td>` +
      `<td class="mean">${S.drawStats ? fmt(S.drawStats.mean[j]) : ""}</td>` +
      `<td class="std">${S.drawStats ? fmt(S.drawStats.std[j]) : ""}</td>` +
      `<td>${S.pointerZ ? fmt(S.pointerZ[j]) : ""}</td></tr>`;
  }
  $("stats").querySelector("tbody").innerHTML = html;
  $("draw-count").textContent = `${S.draws.length} draw${S.draws.length === 1 ? "" : "s"}`;
  $("draw").disabled = S.draws.length >= S.info.limits.max_draws;
}

// --- actions ---------------------------------------------------------------------------------
async function select(index) {
  try {
    const s = await api(`/api/sample/${index}`);
    S.sel = s; S.draws = []; S.drawStats = null; S.tp = null;
    $("index").value = String(index);
    setStatus("");
    renderSample(); renderMap(); renderTruePosterior();
  } catch (e) { setStatus(e.message); }
}

async function drawZ() {
  if (!S.sel) return;
  const left = S.info.limits.max_draws - S.draws.length;
  const n = Math.min(parseInt($("batch").value, 10), left);
  if (n < 1) return;
  const index = S.sel.index;
  try {
    const r = await api("/api/draw", { index, n, offset: S.draws.length, seed: S.seed });
    if (!S.sel || S.sel.index !== index) return;  // another sample was selected meanwhile
    S.draws.push(...r.z);
    S.drawStats = { count: r.count, mean: r.mean, std: r.std, cov: r.cov };
    renderStats(); renderMap();
  } catch (e) { setStatus(e.message); }
}

// Decoding follows the pointer with at most one request in flight: the latest position wins.
let decodeBusy = false, decodePending = null;
function decodeAt(px, py) {
  const [u, v] = toLatent(px, py);
  const d = S.info.latent_dim;
  const z = ($("hold").value === "mu" && S.sel) ? S.sel.mu.slice() : new Array(d).fill(0);
  z[S.dimX] = u; z[S.dimY] = v;
  const lim = S.info.limits.z_limit;
  for (let j = 0; j < d; j++) z[j] = Math.max(-lim, Math.min(lim, z[j]));
  S.pointerZ = z;
  renderMap();
  if (decodeBusy) { decodePending = z; return; }
  sendDecode(z);
}

async function sendDecode(z) {
  decodeBusy = true;
  try {
    const r = await api("/api/decode", { z });
    S.decoded = r.x; S.decodes += 1;
    document.body.dataset.decodes = String(S.decodes);
    if (S.info.image_shape) paintImage($("img-decoded"), S.decoded); else if (S.sel) renderFeatures();
    if (S.sel) renderStats();
  } catch (e) { setStatus(e.message); }
  decodeBusy = false;
  if (decodePending) { const next = decodePending; decodePending = null; sendDecode(next); }
}

// --- pointer ---------------------------------------------------------------------------------
let drag = null;
function pointerPos(ev) {
  const r = $("map").getBoundingClientRect();
  return [ev.clientX - r.left, ev.clientY - r.top];
}

function bindMap() {
  const c = $("map");
  c.addEventListener("pointerdown", (ev) => {
    const [px, py] = pointerPos(ev);
    drag = { x: px, y: py, moved: false };
    c.setPointerCapture(ev.pointerId);
    decodeAt(px, py);
  });
  c.addEventListener("pointermove", (ev) => {
    const [px, py] = pointerPos(ev);
    if (drag) {
      if (Math.hypot(px - drag.x, py - drag.y) > 3) drag.moved = true;
      decodeAt(px, py);
      return;
    }
    const h = nearestPoint(px, py, 8);
    if (h !== S.hover) { S.hover = h; renderMap(); }
    if ($("hover-decode").checked) decodeAt(px, py);
  });
  c.addEventListener("pointerup", (ev) => {
    const [px, py] = pointerPos(ev);
    if (drag && !drag.moved) {
      const k = nearestPoint(px, py, 6);
      if (k >= 0) select(S.map.index[k]);
    }
    drag = null;
  });
  c.addEventListener("pointerleave", () => { if (S.hover >= 0) { S.hover = -1; renderMap(); } });
}

function bindControls() {
  const d = S.info.latent_dim;
  for (const id of ["dim-x", "dim-y"]) {
    const sel = $(id);
    for (let j = 0; j < d; j++) sel.add(new Option("z" + j, String(j)));
  }
  // the two most active latents (the server's choice, as the report's latent map)
  [S.dimX, S.dimY] = S.info.initial_dims || [0, Math.min(1, d - 1)];
  $("dim-x").value = String(S.dimX); $("dim-y").value = String(S.dimY);
  const onDims = () => {
    S.dimX = parseInt($("dim-x").value, 10); S.dimY = parseInt($("dim-y").value, 10);
    renderBase(); renderMap(); renderTruePosterior(); if (S.sel) renderStats();
    fetchPair();
  };
  $("dim-x").addEventListener("change", onDims);
  $("dim-y").addEventListener("change", onDims);
  $("index").max = String(S.info.n - 1);
  $("index").addEventListener("change", () => {
    const i = parseInt($("index").value, 10);
    if (Number.isInteger(i) && i >= 0 && i < S.info.n) select(i);
    else setStatus(`sample index must be 0..${S.info.n - 1}`);
  });
  $("random").addEventListener("click", () => select(Math.floor(Math.random() * S.info.n)));
  $("draw").addEventListener("click", drawZ);
  $("tp-run").addEventListener("click", fetchTruePosterior);
  $("reset").addEventListener("click", () => {
    S.draws = []; S.drawStats = null; S.seed += 1;  // a new seed: the next draws are fresh ones
    renderStats(); renderMap();
  });
  if (!S.info.image_shape) $("images").classList.add("hidden");
}

// --- the true posterior of the selected sample ------------------------------------------------
async function fetchTruePosterior() {
  if (!S.sel) return;
  const index = S.sel.index, k = parseInt($("tp-k").value, 10);
  $("tp-run").disabled = true; $("tp-text").textContent = "sampling…";
  try {
    const r = await api("/api/true_posterior", { index, k, seed: 0 });
    if (S.sel && S.sel.index === index) { S.tp = r; renderTruePosterior(); }
  } catch (e) { setStatus(e.message); $("tp-text").textContent = ""; }
  $("tp-run").disabled = false;
}

// Its own square view (equal scales) around the cloud and both ellipses, in the map's two dimensions.
function renderTruePosterior() {
  const c = $("tp"), W = 360, H = 360, ctx = setupCanvas(c, W, H), T = S.tp;
  ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, W, H);
  if (!T) { $("tp-text").textContent = S.sel ? "not sampled yet for this sample" : ""; return; }
  const i = S.dimX, j = S.dimY;
  const wmax = Math.max(...T.weights);
  let lo = [Infinity, Infinity], hi = [-Infinity, -Infinity];
  const grow = (u, v, su, sv) => {
    lo = [Math.min(lo[0], u - su), Math.min(lo[1], v - sv)]; hi = [Math.max(hi[0], u + su), Math.max(hi[1], v + sv)];
  };
  for (const [m, s] of [[T.mu, T.sigma], [T.mu_opt, T.sigma_opt]]) grow(m[i], m[j], 2.2 * s[i], 2.2 * s[j]);
  T.z.forEach((z, n) => { if (T.weights[n] > 1e-3 * wmax) grow(z[i], z[j], 0, 0); });
  const half = 0.55 * Math.max(hi[0] - lo[0], hi[1] - lo[1], 1e-6);
  const cu = (lo[0] + hi[0]) / 2, cv = (lo[1] + hi[1]) / 2;
  const X = (u) => (u - cu + half) / (2 * half) * W, Y = (v) => H - (v - cv + half) / (2 * half) * H;
  const R = W / (2 * half);
  const order = T.weights.map((w, n) => n).sort((a, b) => T.weights[a] - T.weights[b]);  // heavy draws on top
  for (const n of order) {
    const rel = T.weights[n] / wmax;
    ctx.fillStyle = `rgba(20,40,150,${(0.08 + 0.92 * rel).toFixed(3)})`;
    ctx.beginPath(); ctx.arc(X(T.z[n][i]), Y(T.z[n][j]), 1 + 3.5 * Math.sqrt(rel), 0, 2 * Math.PI); ctx.fill();
  }
  // the encoder's q from its full covariance for a full run (rotated); q* is diagonal
  const cq = T.cov && i !== j ? [T.cov[i][i], T.cov[i][j], T.cov[j][j]] : null;
  for (const [m, s, col, c] of [[T.mu, T.sigma, "#c0392b", cq], [T.mu_opt, T.sigma_opt, "#27ae60", null]]) {
    ctx.strokeStyle = col; ctx.lineWidth = 1.6;
    for (const k of [1, 2]) {
      ctx.setLineDash(k === 1 ? [] : [2, 3]);
      const e = c ? screenEllipse(m[i], m[j], c, k, R, R) : { rx: k * s[i] * R, ry: k * s[j] * R, angle: 0 };
      ctx.beginPath(); ctx.ellipse(X(m[i]), Y(m[j]), Math.max(e.rx, 0.5), Math.max(e.ry, 0.5),
        e.angle, 0, 2 * Math.PI); ctx.stroke();
    }
  }
  ctx.setLineDash([]);
  const [mx, my] = [X(T.mean[i]), Y(T.mean[j])];
  ctx.strokeStyle = "#000"; ctx.lineWidth = 2.2;
  ctx.beginPath(); ctx.moveTo(mx - 6, my - 6); ctx.lineTo(mx + 6, my + 6); ctx.moveTo(mx - 6, my + 6); ctx.lineTo(mx + 6, my - 6);
  ctx.stroke();
  ctx.fillStyle = "#66707a"; ctx.font = "11px sans-serif";
  ctx.fillText(`z${i} →`, W - 40, H - 6); ctx.fillText(`z${j} ↑`, 4, 12);
  const pk = T.pareto_k === null ? "n/a" : T.pareto_k.toFixed(2);
  $("tp-text").textContent = `sample ${T.index}: ESS ${T.ess.toFixed(0)} of ${T.k} · Pareto k ${pk} · ` +
    `${T.reliable ? "reliable" : "UNRELIABLE"} · E_p[z] (${fmt(T.mean[i])}, ${fmt(T.mean[j])}) · ` +
    `mu (${fmt(T.mu[i])}, ${fmt(T.mu[j])}) · q* (${fmt(T.mu_opt[i])}, ${fmt(T.mu_opt[j])}) · ` +
    `q* after ${T.steps} steps`;
  document.body.dataset.tp = String(T.index);
}

// --- the aggregate posterior -----------------------------------------------------------------
function renderAggregate() {
  const A = S.agg, box = $("aggregate");
  box.innerHTML = "";
  for (let j = 0; j < S.info.latent_dim; j++) {
    const fig = document.createElement("figure");
    const c = document.createElement("canvas");
    fig.appendChild(c);
    const cap = document.createElement("figcaption");
    cap.textContent = `z${j}${A.active[j] ? "" : " (inactive)"}: KL ${fmt(A.kl[j])} · mean ${fmt(A.mean[j])} · ` +
      `var ${fmt(A.total[j])} = ${fmt(A.between[j])} between + ${fmt(A.within[j])} within`;
    fig.appendChild(cap);
    box.appendChild(fig);
    const W = 200, H = 120, ctx = setupCanvas(c, W, H);
    const g = A.grid[j], q = A.density[j], p = A.prior[j];
    const ymax = Math.max(...q, ...p) * 1.05;
    const X = (v) => (v - g[0]) / (g[g.length - 1] - g[0]) * W, Y = (v) => H - 4 - v / ymax * (H - 8);
    ctx.fillStyle = "rgba(74,120,181,0.25)"; ctx.strokeStyle = "#4a78b5"; ctx.lineWidth = 1.5;
    ctx.beginPath(); ctx.moveTo(X(g[0]), Y(0));
    g.forEach((v, k) => ctx.lineTo(X(v), Y(q[k])));
    ctx.lineTo(X(g[g.length - 1]), Y(0)); ctx.closePath(); ctx.fill();
    ctx.beginPath(); g.forEach((v, k) => (k ? ctx.lineTo(X(v), Y(q[k])) : ctx.moveTo(X(v), Y(q[k])))); ctx.stroke();
    ctx.setLineDash([4, 3]); ctx.strokeStyle = "#333"; ctx.lineWidth = 1;
    ctx.beginPath(); g.forEach((v, k) => (k ? ctx.lineTo(X(v), Y(p[k])) : ctx.moveTo(X(v), Y(p[k])))); ctx.stroke();
    ctx.setLineDash([]);
    ctx.strokeStyle = "#ccc"; ctx.beginPath(); ctx.moveTo(X(0), 0); ctx.lineTo(X(0), H); ctx.stroke();
  }
}

function renderLegend() {
  const box = $("legend");
  if (!S.info.labels) { box.textContent = ""; return; }
  box.innerHTML = S.info.labels.map((l, k) =>
    `<span data-c="${labelColor(l)}">${escapeHtml(S.info.label_names ? S.info.label_names[k] : l)}</span>`).join("");
  box.querySelectorAll("[data-c]").forEach((el) => el.style.setProperty("--c", el.dataset.c)); // no inline styles (CSP)
}

// --- start -----------------------------------------------------------------------------------
async function main() {
  try {
    [S.info, S.map, S.agg] = await Promise.all([api("/api/info"), api("/api/map"), api("/api/aggregate")]);
  } catch (e) { setStatus("could not load: " + e.message); return; }
  const I = S.info;
  $("model-info").textContent = `${I.data} · ${I.n} samples` + (I.map_points < I.n ? ` (map: ${I.map_points})` : "") +
    ` · ${I.p} features${I.image_shape ? ` (${I.image_shape.join("×")} images)` : ""} · ${I.arch} ` +
    `${[I.p, ...I.hidden, I.latent_dim].join("-")} · ${I.likelihood} likelihood · ${I.posterior} q(z|x) · ` +
    `prior ${I.prior_name}`;
  $("prior-note").textContent = I.prior === "normal" ?
    "Dashed circles: the prior N(0, I)'s 1 and 2 standard deviations." :
    `Shaded: the prior ${I.prior_name}'s density of the two shown dimensions (the mixture of its components' ` +
    "2-d marginals); dashed: where it encloses 39% and 86% of the prior's mass, as a Gaussian's 1 and 2 sigma.";
  document.querySelectorAll(".prior-name").forEach((el) => { el.textContent = I.prior_name; });
  if (I.posterior === "full") $("ellipse-note").textContent = "from the full covariance (2×2 block of L Lᵀ), rotated";
  bindControls(); bindMap();
  renderLegend(); renderBase(); renderMap(); renderAggregate();
  await fetchPair();
  await select(S.map.index[0]);
  document.body.dataset.ready = "1";
}

// Hooks for tests and the curious: where a map point or a latent point is on the canvas.
window.vaelens = {
  state: S,
  pointOnCanvas: (k) => toScreen(S.map.mu[k][S.dimX], S.map.mu[k][S.dimY]),
  latentOnCanvas: (u, v) => toScreen(u, v),
  // the k-sigma ellipse of a 2x2 covariance [var x, cov xy, var y] centred at (u, v) as the map draws it
  ellipseOnCanvas: (u, v, c, k) => {
    const V = S.view, [x, y] = toScreen(u, v);
    return { x, y, ...screenEllipse(u, v, c, k, V.w / (V.x[1] - V.x[0]), V.h / (V.y[1] - V.y[0])) };
  },
};

main();
