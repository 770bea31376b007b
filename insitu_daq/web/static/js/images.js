// The image panels: latest HRTEM (with the phase-map overlay), low-mag and the FFT with the
// tracked reflections' rings. An <img> gets a new src only for a new version, and only one
// load is in flight per panel: a slow viewer skips versions instead of queueing them.

import { el, isNum, runTime } from "./format.js";
import { DEFAULT_PHASE_COLOURS } from "./plots.js";

const SVG_NS = "http://www.w3.org/2000/svg";
const STALE_AFTER_S = 5; // a preview this much older than the run clock is marked old
const MAX_LATENCIES = 100000;

export const stats = { updates: 0, previewsShown: { hrtem: 0, lm: 0, fft: 0 } };
export const latencies = [];

export class ImagePanel {
  // kind: "hrtem" | "lm" | "fft"; `live`: record latencies (not for replayed frames).
  constructor(kind, { onLoaded } = {}) {
    this.kind = kind;
    this.frame = document.getElementById(`frame-${kind}`);
    this.img = document.getElementById(`img-${kind}`);
    this.caption = document.getElementById(`caption-${kind}`);
    this.scalebar = this.frame.querySelector(".scalebar");
    this.onLoaded = onLoaded ?? (() => {});
    this.version = undefined; // the newest version asked for
    this.loading = null; // {url, meta} being loaded
    this.wanted = null; // {url, meta} to load when the current load ends
    this.shown = null; // {url, meta} on screen
    this.img.addEventListener("load", () => this.loaded(true));
    this.img.addEventListener("error", () => this.loaded(false));
  }

  // A live preview entry from the state; a no-op unless its version is new.
  // `fromSnapshot`: the preview came in a snapshot, so it may have been received long before
  // this page opened; its latency entry says so, for the bench to leave it out.
  showPreview(preview, { fromSnapshot = false } = {}) {
    if (!preview?.url || preview.version === this.version) return;
    this.version = preview.version;
    this.request(preview.url, { ...preview, live: true, fromSnapshot });
  }

  // A replayed frame: `meta.time` is the frame's run time.
  showUrl(url, meta) {
    if (this.wanted?.url === url || this.loading?.url === url) return;
    if (!this.loading && this.shown?.url === url) return;
    this.request(url, meta);
  }

  request(url, meta) {
    this.wanted = { url, meta };
    if (!this.loading) this.startLoad();
  }

  startLoad() {
    this.loading = this.wanted;
    this.wanted = null;
    this.img.src = this.loading.url;
  }

  loaded(ok) {
    const done = this.loading;
    this.loading = null;
    if (done && ok) {
      this.shown = done;
      if (done.meta.live && isNum(done.meta.received_ns)) {
        // Frame-to-screen latency for the bench: the web process's receive time of the
        // frame's preview to this image being decoded and shown.
        const entry = { kind: this.kind, version: done.meta.version,
          latency_ms: Date.now() - done.meta.received_ns / 1e6 };
        if (done.meta.fromSnapshot) entry.snapshot = true;
        latencies.push(entry);
        if (latencies.length > MAX_LATENCIES) latencies.splice(0, latencies.length - MAX_LATENCIES);
      }
      if (this.kind in stats.previewsShown) stats.previewsShown[this.kind] += 1;
      this.frame.classList.add("has-image");
      const { naturalWidth: w, naturalHeight: h } = this.img;
      if (w > 0 && h > 0) this.frame.style.setProperty("--ar", String(w / h));
      this.drawScaleBar(done.meta.scale_bar);
      this.onLoaded(done.meta);
    } else if (done) {
      this.caption.textContent = `could not load the ${this.kind} image`;
      this.caption.classList.add("caption-error");
    }
    if (this.wanted) this.startLoad();
  }

  drawScaleBar(bar) {
    if (!bar || !isNum(bar.fraction) || !isNum(bar.length_nm) || bar.fraction <= 0) {
      this.scalebar.hidden = true;
      return;
    }
    this.scalebar.hidden = false;
    // A percentage of the frame, so the bar stays right when the layout resizes the image
    // (the bar itself is the box's full width, its label under it).
    this.scalebar.style.width = `${Math.min(bar.fraction, 1) * 100}%`;
    const length = bar.length_nm >= 1000 ? `${+(bar.length_nm / 1000).toFixed(2)} µm` : `${+bar.length_nm.toFixed(2)} nm`;
    this.scalebar.querySelector(".scalebar-label").textContent = length;
  }

  // The caption of what is on screen; `now` is the run clock (to say when a preview is old).
  updateCaption(now) {
    const meta = this.shown?.meta;
    if (!meta) return;
    const parts = [];
    if (isNum(meta.time)) parts.push(`t ${runTime(meta.time)}`);
    if (meta.image_id != null) parts.push(`image ${meta.image_id}`);
    if (isNum(meta.integrated_frames)) {
      parts.push(`${meta.integrated_frames} frame${meta.integrated_frames === 1 ? "" : "s"} summed`);
    }
    if (this.kind === "fft" && isNum(meta.q_max_per_nm) && meta.q_max_per_nm > 0) {
      parts.push(`edge ${(10 / meta.q_max_per_nm).toFixed(2)} Å`);
    }
    if (meta.replay) parts.push("replay");
    const age = isNum(now) && isNum(meta.time) ? now - meta.time : 0;
    const old = Boolean(meta.live) && age > STALE_AFTER_S;
    if (old) parts.push(`${age.toFixed(0)} s old`);
    this.caption.textContent = parts.join(" · ") || "—";
    this.caption.classList.toggle("caption-old", old);
    this.caption.classList.remove("caption-error");
  }

  fullUrl() {
    if (!this.shown) return null;
    const url = this.shown.url;
    return `${url}${url.includes("?") ? "&" : "?"}full=1`;
  }
}

// ---------------------------------------------------------------------------------------------
// The phase map over the HRTEM image.

export class PhaseOverlay {
  constructor() {
    this.img = document.getElementById("img-phase");
    this.toggle = document.getElementById("phase-toggle");
    this.opacity = document.getElementById("phase-opacity");
    this.legend = document.getElementById("phase-legend");
    this.preview = null;
    this.version = undefined;
    this.legendKey = "";
    this.toggle.addEventListener("change", () => this.apply());
    this.opacity.addEventListener("input", () => this.applyOpacity());
    this.applyOpacity();
  }

  setAvailable(available) {
    document.getElementById("phase-controls").hidden = !available;
    if (!available) {
      this.img.hidden = true;
      this.legend.hidden = true;
    }
  }

  show(preview) {
    this.preview = preview ?? null;
    this.apply();
  }

  apply() {
    const on = this.toggle.checked && Boolean(this.preview?.url);
    this.img.hidden = !on;
    this.legend.hidden = !on;
    // Fetched only while shown: a viewer who never opens the overlay costs no PNGs.
    if (on && this.preview.version !== this.version) {
      this.version = this.preview.version;
      this.img.src = this.preview.url;
    }
    this.drawLegend(this.preview?.legend ?? []);
  }

  applyOpacity() {
    this.img.style.opacity = this.opacity.value;
  }

  drawLegend(entries) {
    const key = JSON.stringify(entries);
    if (key === this.legendKey) return;
    this.legendKey = key;
    this.legend.replaceChildren(...entries.map((entry) => {
      const item = el("li");
      const swatch = el("span", "swatch");
      swatch.style.background = entry.colour;
      item.append(swatch, document.createTextNode(String(entry.phase ?? "").replace(/_/g, " ")));
      return item;
    }));
  }
}

// ---------------------------------------------------------------------------------------------
// The tracked reflections' rings over the FFT.

export class RingOverlay {
  constructor() {
    this.svg = document.getElementById("fft-rings");
    this.frame = document.getElementById("frame-fft");
    this.rings = [];
    this.reflections = {};
    this.colours = DEFAULT_PHASE_COLOURS;
    // Radii are in displayed pixels: redraw when the layout resizes the image.
    new ResizeObserver(() => this.draw()).observe(this.frame);
  }

  setContext(reflections, colours) {
    this.reflections = Object.fromEntries((reflections ?? []).map((r) => [r.name, r]));
    this.colours = colours;
    this.draw();
  }

  show(rings) {
    this.rings = Array.isArray(rings) ? rings : [];
    this.draw();
  }

  draw() {
    const w = this.frame.clientWidth;
    const h = this.frame.clientHeight;
    this.svg.replaceChildren();
    if (!(w > 0 && h > 0)) return;
    this.svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
    const cx = w / 2;
    const cy = h / 2;
    const drawn = [];
    for (const ring of this.rings) {
      const r = ring.radius_fraction * (w / 2);
      if (!isNum(r) || r <= 0) continue;
      const phase = this.reflections[ring.name]?.phase;
      const colour = this.colours[phase] ?? this.colours.shared ?? "#a7b0bc";
      const state = ring.detected ? "ring-detected" : "ring-undetected";
      const circle = svgNode("circle", { cx, cy, r: r.toFixed(1), stroke: colour, class: `ring ${state}` });
      circle.dataset.reflection = ring.name;
      const tip = svgNode("title");
      tip.textContent = `${ring.label ?? ring.name}: ${ring.detected ? "detected" : "not detected"}` +
        (isNum(ring.intensity) ? `, intensity ${ring.intensity.toFixed(3)}` : "");
      circle.append(tip);
      this.svg.append(circle);
      drawn.push({ ring, r, colour, state });
    }
    for (const label of placeLabels(drawn, cx, cy, w, h)) this.svg.append(label);
  }
}

function svgNode(tag, attributes = {}) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  return node;
}

const LABEL_STEP_PX = 14; // one 11 px line and a little air

// Labels on the rings' upper-right arcs, pushed apart vertically so that none overlap: the
// rings that coincide (LiNiO2 (006) and NiO (111) at 2.4 Å) or nearly do still get one
// readable label each.
function placeLabels(drawn, cx, cy, w, h) {
  const sorted = drawn.slice().sort((a, b) => b.r - a.r); // outermost first: top-most label
  const labels = [];
  let previousY = -Infinity;
  for (const { ring, r, colour, state } of sorted) {
    const y = Math.min(h - 4, Math.max(12, cy - r * Math.SQRT1_2, previousY + LABEL_STEP_PX));
    previousY = y;
    const dy = y - cy;
    let x = (Math.abs(dy) < r ? cx + Math.sqrt(r * r - dy * dy) : cx + r) + 4;
    const label = String(ring.label ?? ring.name);
    const d = isNum(ring.d_angstrom) ? String(+ring.d_angstrom.toFixed(2)) : null;
    // "Ni/Li disordered 1.95 A" already says its d.
    const words = d && !label.includes(d) ? `${label} ${d} Å` : label;
    let anchor = "start";
    if (x + words.length * 6.2 > w - 2) { // 11 px font: close enough to keep it on the image
      x = w - 4;
      anchor = "end";
    }
    const text = svgNode("text", { x: x.toFixed(1), y: (y + 4).toFixed(1), "text-anchor": anchor,
      fill: colour, class: `ring-label ${state}` });
    text.dataset.reflection = ring.name;
    text.textContent = words;
    labels.push(text);
  }
  return labels;
}
