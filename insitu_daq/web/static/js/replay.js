// Replay of a finished run (`/?run=<name>`): the whole run is fetched once, and a scrubber
// picks the time. Plots show the series up to that time with a cursor line, the event log
// the events up to then, and the images the frames nearest to it, fetched from the run file.

import { duration, isNum, runTime } from "./format.js";
import { lastValue, nearest, stateFromSnapshot, upperBound } from "./state.js";

// At most ~4 image requests a second for the three panels together: each one is a frame read
// from the run file (and an FFT) on the acquisition PC, which may be recording the next run.
const IMAGE_INTERVAL_MS = 250;
const IMAGE_KINDS = ["hrtem", "fft", "lm"]; // served in turn
const TICK_MS = 100; // playback step

const $ = (id) => document.getElementById(id);

export async function fetchReplay(name) {
  const response = await fetch(`/api/runs/${encodeURIComponent(name)}/replay`, {
    credentials: "same-origin",
  });
  if (!response.ok) {
    let detail = "";
    try {
      const body = await response.json();
      detail = body.error ?? body.detail ?? "";
    } catch {
      detail = "";
    }
    throw new Error(`HTTP ${response.status}${detail ? `: ${detail}` : ""}`);
  }
  const replay = await response.json();
  // Thinned uniformly (no full-resolution tail): the whole run is history here.
  const state = stateFromSnapshot({ ...replay, mode: "replay" }, { tail: 0 });
  state.events = state.events.slice().sort((a, b) => (a.time ?? 0) - (b.time ?? 0));
  return state;
}

export function runDuration(state) {
  let end = 0;
  for (const group of Object.values(state.series)) {
    if (group.t.length) end = Math.max(end, group.t[group.t.length - 1]);
  }
  for (const event of state.events) if (isNum(event.time)) end = Math.max(end, event.time);
  for (const times of Object.values(state.frame_times ?? {})) {
    if (times?.length) end = Math.max(end, times[times.length - 1]);
  }
  const elapsed = state.status?.protocol?.run_elapsed_s;
  if (isNum(elapsed)) end = Math.max(end, elapsed);
  return end;
}

export class ReplayController {
  // onTime(t): the page redraws what depends on the time (plots, events, header, tiles).
  constructor(name, state, { panels, rings, onTime }) {
    this.name = name;
    this.state = state;
    this.panels = panels;
    this.rings = rings;
    this.onTime = onTime;
    this.duration = runDuration(state);
    this.time = 0;
    this.playing = null;
    this.wantedImage = {}; // kind -> {url, meta}: the frame each panel should show
    this.askedImage = {}; // kind -> url last requested
    this.imageTimer = null;
    this.lastImageAt = 0;
    this.nextKind = 0;

    this.scrubber = $("scrubber");
    this.scrubber.max = String(this.duration);
    this.scrubber.step = this.duration > 600 ? "1" : "0.1";
    this.scrubber.addEventListener("input", () => this.setTime(Number(this.scrubber.value)));
    $("play-button").addEventListener("click", () => (this.playing ? this.pause() : this.play()));
    // Keyboard: space plays/pauses when the scrubber has focus (arrows move it natively).
    this.scrubber.addEventListener("keydown", (event) => {
      if (event.key === " ") {
        event.preventDefault();
        if (this.playing) this.pause();
        else this.play();
      }
    });
  }

  start() {
    // Open at the run's end: what the run came to, the way the report figure shows it.
    this.setTime(this.duration);
  }

  setTime(t) {
    this.time = Math.min(Math.max(0, t), this.duration);
    if (Number(this.scrubber.value) !== this.time) this.scrubber.value = String(this.time);
    $("scrubber-time").textContent = `${runTime(this.time)} / ${duration(this.duration)}`;
    this.requestImages();
    this.onTime(this.time);
  }

  play() {
    if (this.time >= this.duration) this.setTime(0);
    const speed = () => Number($("replay-speed").value) || 1;
    let last = performance.now();
    this.playing = setInterval(() => {
      const now = performance.now();
      const t = this.time + ((now - last) / 1000) * speed();
      last = now;
      this.setTime(t);
      if (t >= this.duration) this.pause();
    }, TICK_MS);
    $("play-button").textContent = "❚❚ Pause";
  }

  pause() {
    clearInterval(this.playing);
    this.playing = null;
    $("play-button").textContent = "▶ Play";
  }

  // The step the run was in at t: the newest "step" event up to then.
  stepAt(t) {
    const events = this.state.events;
    for (let i = events.length - 1; i >= 0; i--) {
      if ((events[i].time ?? 0) <= t && events[i].kind === "step") return events[i].message;
    }
    return null;
  }

  // ----- images ------------------------------------------------------------------------------
  requestImages() {
    const frameTimes = this.state.frame_times ?? {};
    for (const kind of IMAGE_KINDS) {
      const times = frameTimes[kind === "fft" ? "hrtem" : kind];
      // The frame the server will pick (nearest to t): asking by its own time means moving
      // the scrubber within one frame's span asks nothing new.
      let t;
      if (Array.isArray(times)) {
        t = nearest(times, this.time);
        if (t === undefined) continue; // no frame of this mode in the run
      } else {
        t = Math.round(this.time * 10) / 10;
      }
      const url = `/api/runs/${encodeURIComponent(this.name)}/preview/${kind}?t=${t}`;
      this.wantedImage[kind] = { url, meta: { time: t, replay: true } };
    }
    this.pumpImages();
  }

  // One request per IMAGE_INTERVAL_MS, to the next panel (in turn) whose wanted frame is not
  // the one it last asked for. While the scrubber moves, each panel catches up to the newest
  // position, skipping the ones in between.
  pumpImages() {
    if (this.imageTimer !== null) return;
    const wait = Math.max(0, this.lastImageAt + IMAGE_INTERVAL_MS - performance.now());
    this.imageTimer = setTimeout(() => {
      this.imageTimer = null;
      for (let i = 0; i < IMAGE_KINDS.length; i++) {
        const kind = IMAGE_KINDS[(this.nextKind + i) % IMAGE_KINDS.length];
        const wanted = this.wantedImage[kind];
        if (!wanted || wanted.url === this.askedImage[kind]) continue;
        this.askedImage[kind] = wanted.url;
        this.lastImageAt = performance.now();
        this.nextKind = (this.nextKind + i + 1) % IMAGE_KINDS.length;
        this.panels[kind].showUrl(wanted.url, wanted.meta);
        this.pumpImages(); // the others, if they are behind too
        return;
      }
    }, wait);
  }

  // ----- rings ---------------------------------------------------------------------------------
  // The FFT's rings at time t: radii from the run's ring table (or its q range), "detected"
  // from whether the reflection's d was measured in the newest HRTEM result up to t.
  ringsAt(t) {
    const fft = this.state.previews?.fft ?? {};
    let rings = Array.isArray(fft.rings) ? fft.rings : null;
    if (!rings && isNum(fft.q_max_per_nm) && fft.q_max_per_nm > 0) {
      rings = this.state.reflections.map((r) => ({
        name: r.name, label: r.label, d_angstrom: r.d_angstrom,
        radius_fraction: 10 / r.d_angstrom / fft.q_max_per_nm, detected: false,
      }));
    }
    if (!rings) return [];
    const analysis = this.state.series.analysis;
    if (!analysis?.t?.length) return rings;
    const end = upperBound(analysis.t, t);
    const dKeys = rings.map((ring) => `d_spacing_a.${ring.name}`);
    if (!dKeys.some((key) => key in analysis)) return rings;
    // The newest HRTEM result: a row with an intensity (measured whether or not the
    // reflection is there), else one with any d.
    const intensityKeys = rings.map((ring) => `intensity.${ring.name}`).filter((key) => key in analysis);
    const rowKeys = intensityKeys.length ? intensityKeys : dKeys;
    let row = -1;
    for (let i = end - 1; i >= 0 && row < 0; i--) {
      if (rowKeys.some((key) => analysis[key]?.[i] != null)) row = i;
    }
    return rings.map((ring, k) => ({
      ...ring,
      detected: row >= 0 && analysis[dKeys[k]]?.[row] != null,
      intensity: lastValue(analysis[`intensity.${ring.name}`], end) ?? ring.intensity,
    }));
  }
}
