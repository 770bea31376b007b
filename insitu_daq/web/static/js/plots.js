// The time-series panels (uPlot). The bias panel is fixed, a temperature panel under it when the
// station's holder has a heater (its status has `temperature`, or the run logged one); the
// analysis panels are built from
// `state.quantities` (grouped by `panel`), so a quantity the analysis declares later appears
// without a change here. Redraws are throttled: the data may arrive 20 times a second, the
// eye needs a few.

import { current, currentUnit, el, humanise, isNum, runTime } from "./format.js";
import { upperBound } from "./state.js";

const MIN_DRAW_INTERVAL_MS = 250; // at most ~4 redraws a second
const D_SPACING_PREFIX = "d_spacing_a.";
// A heating holder's series, as the run file's log declares it (runfile/layout.py TEMPERATURE:
// record "holder_temperature", columns value and setpoint, degC).
export const TEMPERATURE_SERIES = "holder_temperature";

// The phase map's colours when no phase preview has come yet (report/figure.py's).
export const DEFAULT_PHASE_COLOURS = {
  layered: "#1f77b4",
  disordered: "#ff7f0e",
  rock_salt: "#d62728",
  shared: "#a7b0bc",
};

// matplotlib's tab10, as quantities.py's Panel.colour may name them.
const TAB_COLOURS = {
  "tab:blue": "#1f77b4", "tab:orange": "#ff7f0e", "tab:green": "#2ca02c", "tab:red": "#d62728",
  "tab:purple": "#9467bd", "tab:brown": "#8c564b", "tab:pink": "#e377c2", "tab:gray": "#7f7f7f",
  "tab:grey": "#7f7f7f", "tab:olive": "#bcbd22", "tab:cyan": "#17becf",
};

// For quantities with no colour of their own: bright enough on the dark background.
const PALETTE = ["#5aa9e6", "#f4a259", "#8ddf8d", "#c39bd3", "#e5534b", "#56c8d8", "#dcd66b",
  "#e78ac3", "#d4a373", "#b0b7c3"];

// Run-time tick steps a clock reader expects (30 s, 5 min, 10 min), not 25 s or 500 s.
const TIME_INCREMENTS = [0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 20, 30, 60, 120, 300, 600, 900, 1200,
  1800, 3600, 7200, 10800, 21600, 43200, 86400];

const THEME = {
  axis: "#9aa4b1",
  grid: "rgba(255, 255, 255, 0.07)",
  tick: "rgba(255, 255, 255, 0.15)",
  cursorLine: "rgba(255, 214, 102, 0.85)",
  font: "11px system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif",
  voltage: "#f2c14e",
  setpoint: "#8b949e",
  current: "#56c8d8",
  temperature: "#e5534b",
};

function colourOf(name) {
  if (!name) return null;
  return TAB_COLOURS[name] ?? name;
}

// A lighter or darker shade of a #rrggbb colour: reflections of one phase share its hue.
function shade(hex, index) {
  const amounts = [0, 0.4, -0.3, 0.65, -0.5];
  const amount = amounts[index % amounts.length];
  const match = /^#([0-9a-f]{6})$/i.exec(hex);
  if (!match || amount === 0) return hex;
  const value = parseInt(match[1], 16);
  const channels = [value >> 16, (value >> 8) & 255, value & 255].map((c) =>
    Math.round(amount > 0 ? c + (255 - c) * amount : c * (1 + amount)));
  return `#${channels.map((c) => c.toString(16).padStart(2, "0")).join("")}`;
}

export function phaseColours(state) {
  const colours = { ...DEFAULT_PHASE_COLOURS };
  for (const entry of state.previews?.phase?.legend ?? []) {
    if (entry?.phase && entry?.colour) colours[entry.phase] = entry.colour;
  }
  return colours;
}

// ---------------------------------------------------------------------------------------------
// Panel specifications: what each plot shows, from the state's declarations.

function biasSpec() {
  return {
    name: "bias",
    title: "Bias",
    group: "bias",
    gaps: "break", // a null current is "not measured" (output off): a real gap
    series: [
      { key: "voltage", label: "voltage", unit: "V", scale: 1, axis: "y", colour: THEME.voltage,
        format: (v) => `${v >= 0 ? "+" : ""}${v.toFixed(4)} V` },
      { key: "setpoint", label: "setpoint", unit: "V", scale: 1, axis: "y", colour: THEME.setpoint,
        dash: [6, 4], format: (v) => `${v >= 0 ? "+" : ""}${v.toFixed(3)} V` },
      { key: "current", label: "current", unit: "A", scale: 1, axis: "y2", colour: THEME.current,
        format: (v) => current(v) },
    ],
    yLabel: "V",
    minSpan: 0.2, // V: a hold's millivolt noise is the hold-accuracy tile's, not a full-height wiggle
    y2Label: undefined, // the ticks carry the unit (nA, µA)
    y2Values: currentTicks,
  };
}

// Whether the page shows a temperature panel: the daemon reports a heater, or the run has a log.
export function hasTemperature(state) {
  return Boolean(state?.status?.temperature || state?.series?.[TEMPERATURE_SERIES]?.t?.length);
}

function temperatureSpec() {
  return {
    name: "temperature",
    title: "Temperature",
    group: TEMPERATURE_SERIES,
    gaps: "break",
    series: [
      { key: "value", label: "chip", unit: "°C", scale: 1, axis: "y", colour: THEME.temperature,
        format: (v) => `${v.toFixed(1)} °C` },
      { key: "setpoint", label: "setpoint", unit: "°C", scale: 1, axis: "y", colour: THEME.setpoint,
        dash: [6, 4], format: (v) => `${v.toFixed(1)} °C` },
    ],
    yLabel: "°C",
    minSpan: 5, // °C: a held level's tenths are the tile's, not a full-height wiggle
  };
}

// Tick labels in one current unit for the whole axis (nA usually, µA near compliance).
function currentTicks(u, splits) {
  const finite = splits.filter(isNum);
  if (!finite.length) return splits.map(() => "");
  const { factor, unit } = currentUnit(Math.max(...finite.map(Math.abs)));
  const step = finite.length > 1 ? Math.abs(finite[1] - finite[0]) / factor : 1;
  const digits = Math.max(0, Math.min(6, -Math.floor(Math.log10(step || 1))));
  return splits.map((v) => (isNum(v) ? `${(v / factor).toFixed(digits)} ${unit}` : ""));
}

// The unit of the plotted (scaled) value. quantities.py gives dimensionless quantities the unit
// "1"; expansion is one of them, shown times 100: in %.
function displayUnit(quantity) {
  const unit = quantity.unit && quantity.unit !== "1" ? quantity.unit : "";
  if (!unit && quantity.scale === 100) return "%";
  return unit;
}

function seriesLabel(quantity) {
  // The unit is in the legend's value ("4.80 Å") and on the axis, not repeated here.
  return quantity.label || quantity.key;
}

function axisLabel(quantity) {
  const text = (quantity.ylabel || "").replace(/\s*\n\s*/g, " ").trim();
  const unit = displayUnit(quantity);
  return text || (unit ? `${seriesLabel(quantity)} (${unit})` : seriesLabel(quantity));
}

// The family member a key names: "intensity.lno_003" -> "lno_003".
function memberOf(key) {
  const dot = key.indexOf(".");
  return dot >= 0 ? key.slice(dot + 1) : null;
}

// The d-spacing panel, when the quantities do not declare one: the analysis sends
// `d_spacing_a.<reflection>` (Å) beside the declared quantities.
function dSpacingQuantities(state) {
  if (state.quantities.some((q) => String(q.key).startsWith(D_SPACING_PREFIX))) return [];
  const names = new Set(state.reflections.map((r) => r.name));
  for (const key of Object.keys(state.series?.analysis ?? {})) {
    if (key.startsWith(D_SPACING_PREFIX)) names.add(key.slice(D_SPACING_PREFIX.length));
  }
  const labels = Object.fromEntries(state.reflections.map((r) => [r.name, r.label]));
  return [...names].map((name) => ({
    key: `${D_SPACING_PREFIX}${name}`, panel: "d_spacing", label: labels[name] ?? name,
    // A line like the others (uPlot draws it per pixel column; thousands of point markers
    // cost a core in software rendering); an undetected reflection is a gap in it.
    unit: "Å", scale: 1, ylabel: "measured d-spacing (Å)", title: "d-spacing",
  }));
}

export function analysisSpecs(state) {
  const quantities = state.quantities.filter((q) => q && q.key && q.panel);
  const dSpacings = dSpacingQuantities(state);
  // The d-spacing panel goes after the reflection intensities, whose lines it explains.
  const at = quantities.findLastIndex((q) => q.panel === "reflections");
  const ordered = at >= 0
    ? [...quantities.slice(0, at + 1), ...dSpacings, ...quantities.slice(at + 1)]
    : [...quantities, ...dSpacings];

  const reflections = Object.fromEntries(state.reflections.map((r) => [r.name, r]));
  const phases = phaseColours(state);
  const shadeIndex = {};
  let paletteIndex = 0;
  const colourFor = (q) => {
    const own = colourOf(q.colour);
    if (own) return own;
    const reflection = reflections[memberOf(q.key)];
    if (reflection) {
      const phase = phases[reflection.phase] ? reflection.phase : "shared";
      const index = (shadeIndex[phase] = (shadeIndex[phase] ?? -1) + 1);
      return shade(phases[phase], index);
    }
    // "<phase>_fraction": the phase map's colour, so the plot reads against its legend.
    const phase = Object.keys(phases).find((p) => q.key === p || q.key.startsWith(`${p}_`));
    if (phase) return phases[phase];
    return PALETTE[paletteIndex++ % PALETTE.length];
  };

  const panels = new Map();
  for (const q of ordered) {
    let panel = panels.get(q.panel);
    if (!panel) {
      panel = { name: q.panel, title: humanise(q.panel), group: "analysis", series: [],
        gaps: "rows", units: [], tips: [], range: null };
      panels.set(q.panel, panel);
    }
    const unit = displayUnit(q);
    // The panel's first unit is the left axis; another unit (front speed beside front
    // position) gets the right axis.
    if (!panel.units.includes(unit)) panel.units.push(unit);
    const axis = panel.units.indexOf(unit) === 0 ? "y" : "y2";
    const scale = isNum(q.scale) ? q.scale : 1;
    panel.series.push({
      key: q.key, label: seriesLabel(q), unit, scale, axis, colour: colourFor(q),
      dash: axis === "y2" ? [5, 3] : undefined,
      format: (v) => `${formatValue(v)}${unit ? ` ${unit}` : ""}`,
    });
    if (q.title) panel.title = q.title;
    panel.tips.push(axisLabel(q));
    if (Array.isArray(q.range) && q.range.length === 2) panel.range = q.range;
  }
  for (const panel of panels.values()) {
    // An axis is labelled with its unit only: the panel title and the legend (colour, name,
    // unit) say the rest, and a long label does not fit a 150 px high plot.
    panel.yLabel = panel.units[0] || undefined;
    panel.y2Label = panel.units[1] || undefined;
    panel.tip = [...new Set(panel.tips)].join(" · ");
    // Fractions are 0-1 whatever was measured so far; a fixed axis reads at a glance.
    if (!panel.range && /fraction/.test(panel.name)) panel.range = [0, 1];
  }
  return [...panels.values()];
}

function formatValue(v) {
  if (!isNum(v)) return "—";
  const magnitude = Math.abs(v);
  if (magnitude !== 0 && (magnitude < 1e-3 || magnitude >= 1e5)) return v.toExponential(2);
  return v.toPrecision(3).replace(/\.?0+$/, (m) => (m.startsWith(".") ? "" : m));
}

// ---------------------------------------------------------------------------------------------
// The board: every plot, their shared time axis and the throttled redraw.

export class PlotBoard {
  // `container`: the element the panels go in. `xRange()`: [min, max] run s for every plot.
  constructor(container, { xRange }) {
    this.container = container;
    this.xRange = xRange;
    this.plots = []; // {spec, uplot, element, observer, legendHost}
    this.state = null;
    this.limitTime = null; // replay: data up to this run time, and a cursor line there
    this.hovering = false;
    this.lastDraw = 0;
    this.timer = null;
    this.frame = null;
    this.coloursKey = "";
    this.heated = false; // a temperature panel is shown
    container.addEventListener("mouseenter", () => { this.hovering = true; });
    container.addEventListener("mouseleave", () => {
      this.hovering = false;
      this.scheduleDraw();
    });
  }

  rebuild(state) {
    this.state = state;
    for (const plot of this.plots) {
      plot.observer.disconnect();
      plot.uplot.destroy();
    }
    this.plots = [];
    this.container.replaceChildren();
    this.coloursKey = JSON.stringify(phaseColours(state));
    this.heated = hasTemperature(state);
    const fixed = this.heated ? [biasSpec(), temperatureSpec()] : [biasSpec()];
    for (const spec of [...fixed, ...analysisSpecs(state)]) this.plots.push(this.createPlot(spec));
    this.draw();
  }

  // A heater reported after the snapshot (the status or the first readings came later).
  needsRebuild(state) {
    return hasTemperature(state) !== this.heated;
  }

  // The phase map legend arrived (or changed): the fraction lines take its colours.
  refreshColours(state) {
    const key = JSON.stringify(phaseColours(state));
    if (key !== this.coloursKey) this.rebuild(state);
  }

  createPlot(spec) {
    const panel = el("div", "plot-panel");
    panel.id = `panel-${spec.name}`;
    const head = el("div", "plot-head");
    const title = el("h2", "plot-title", spec.title);
    if (spec.tip) title.title = spec.tip;
    head.append(title);
    const legendHost = el("div", "plot-legend");
    head.append(legendHost);
    const element = el("div", "plot");
    element.id = `plot-${spec.name}`;
    panel.append(head, element);
    this.container.append(panel);

    const size = { width: Math.max(element.clientWidth, 200), height: Math.max(element.clientHeight, 80) };
    const uplot = new uPlot(this.options(spec, size, legendHost), this.emptyData(spec), element);
    // Size from the layout (the chart is absolutely placed in its box, so it cannot push it).
    const observer = new ResizeObserver(() => {
      const width = Math.floor(element.clientWidth);
      const height = Math.floor(element.clientHeight);
      if (width > 0 && height > 0 && (width !== uplot.width || height !== uplot.height)) {
        uplot.setSize({ width, height });
      }
    });
    observer.observe(element);
    return { spec, uplot, element, observer, legendHost };
  }

  options(spec, size, legendHost) {
    const axis = {
      stroke: THEME.axis,
      font: THEME.font,
      labelFont: THEME.font,
      grid: { stroke: THEME.grid, width: 1 },
      ticks: { stroke: THEME.tick, width: 1, size: 4 },
    };
    const hasY2 = spec.series.some((s) => s.axis === "y2");
    const scales = {
      x: { time: false, range: () => this.xRange() },
      y: spec.range
        ? { range: () => spec.range }
        : { range: (u, min, max) => softRange(u, min, max, spec.minSpan) },
    };
    if (hasY2) scales.y2 = { range: softRange };
    const axes = [
      { ...axis, size: 26, incrs: TIME_INCREMENTS, values: (u, splits) => splits.map((v) => tickTime(v, splits)) },
      { ...axis, scale: "y", size: 48, label: spec.yLabel, labelSize: spec.yLabel ? 14 : 0 },
    ];
    if (hasY2) {
      axes.push({ ...axis, scale: "y2", side: 1, size: 52, label: spec.y2Label,
        labelSize: spec.y2Label ? 14 : 0,
        grid: { show: false }, ...(spec.y2Values ? { values: spec.y2Values } : {}) });
    }
    const series = [
      { label: "run time", value: (u, v) => (isNum(v) ? runTime(v) : "—") },
      ...spec.series.map((s) => this.seriesOptions(spec, s)),
    ];
    return {
      width: size.width,
      height: size.height,
      scales,
      axes,
      series,
      legend: { live: true, mount: (u, table) => legendHost.append(table) },
      cursor: {
        sync: { key: "insitu-daq" },
        drag: { x: false, y: false },
        points: { size: 6 },
        // Hover snaps, per line, to its nearest measured point.
        hover: { skip: [null, undefined] },
      },
      hooks: { draw: [(u) => this.drawCursorLine(u)] },
    };
  }

  seriesOptions(spec, s) {
    const options = {
      label: s.label,
      scale: s.axis,
      stroke: s.colour,
      width: 1.5,
      // null is a gap (not measured); rows of another imaging mode are undefined (dataFor).
      spanGaps: false,
      value: (u, v) => (isNum(v) ? s.format(v) : "—"),
      points: { show: false },
    };
    if (s.dash) options.dash = s.dash;
    return options;
  }

  drawCursorLine(u) {
    if (!isNum(this.limitTime)) return;
    const x = Math.round(u.valToPos(this.limitTime, "x", true));
    const { ctx } = u;
    ctx.save();
    ctx.strokeStyle = THEME.cursorLine;
    ctx.lineWidth = Math.max(1, devicePixelRatio);
    ctx.beginPath();
    ctx.moveTo(x, u.bbox.top);
    ctx.lineTo(x, u.bbox.top + u.bbox.height);
    ctx.stroke();
    ctx.restore();
  }

  emptyData(spec) {
    return [[], ...spec.series.map(() => [])];
  }

  // The arrays one plot draws: [t, y1, y2, ...], each y scaled, rows up to limitTime.
  dataFor(spec) {
    const group = this.state?.series?.[spec.group];
    if (!group?.t?.length) return this.emptyData(spec);
    const end = isNum(this.limitTime) ? upperBound(group.t, this.limitTime) : group.t.length;
    const t = end === group.t.length ? group.t : group.t.slice(0, end);
    const columns = spec.series.map((s) => group[s.key]);
    const out = spec.series.map(() => new Array(end));
    for (let i = 0; i < end; i++) {
      // An analysis row where none of this panel's quantities has a value is another
      // imaging mode's result: undefined (uPlot draws the line across it). Within a row that
      // measured the panel, null means "not there" (a reflection not detected): a gap.
      let measured = spec.gaps !== "rows";
      if (!measured) {
        for (const column of columns) {
          if (column && column[i] != null) {
            measured = true;
            break;
          }
        }
      }
      for (let k = 0; k < columns.length; k++) {
        const value = columns[k] ? columns[k][i] : null;
        if (!measured) out[k][i] = undefined;
        else if (value == null) out[k][i] = null;
        else out[k][i] = spec.series[k].scale === 1 ? value : value * spec.series[k].scale;
      }
    }
    return [t, ...out];
  }

  // Ask for a redraw: at most one per MIN_DRAW_INTERVAL_MS, in an animation frame (so none
  // while the tab is hidden).
  scheduleDraw() {
    if (this.timer !== null || this.frame !== null) return;
    const wait = Math.max(0, this.lastDraw + MIN_DRAW_INTERVAL_MS - performance.now());
    this.timer = setTimeout(() => {
      this.timer = null;
      this.frame = requestAnimationFrame(() => {
        this.frame = null;
        this.draw();
      });
    }, wait);
  }

  draw() {
    this.lastDraw = performance.now();
    for (const plot of this.plots) {
      const data = this.dataFor(plot.spec);
      plot.uplot.setData(data);
      if (!this.hovering) showLatestInLegend(plot.uplot, data);
    }
  }
}

// Not hovering: the legend shows each line's newest value, which is what a viewer wants.
function showLatestInLegend(uplot, data) {
  const idxs = data.map((column) => {
    for (let i = column.length - 1; i >= 0; i--) if (column[i] != null) return i;
    return null;
  });
  uplot.setLegend({ idxs }, false);
}

// Auto range with a margin, never collapsing to zero height (a flat line at +4.3 V).
function softRange(u, min, max, minSpan = 0) {
  if (!isNum(min) || !isNum(max)) return [0, 1];
  if (max - min < minSpan) {
    const middle = (min + max) / 2;
    return [middle - minSpan / 2, middle + minSpan / 2];
  }
  if (min === max) {
    const pad = Math.abs(min) * 0.05 || 1e-3;
    return [min - pad, max + pad];
  }
  const pad = (max - min) * 0.08;
  return [min - pad, max + pad];
}

function tickTime(v, splits) {
  if (!isNum(v)) return "";
  const span = Math.abs(splits[splits.length - 1] - splits[0]);
  if (span >= 600) {
    const m = Math.floor(v / 60);
    return `${m}:${String(Math.round(v - m * 60)).padStart(2, "0")}`;
  }
  return `${+v.toFixed(2)} s`;
}
