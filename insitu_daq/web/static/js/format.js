// Formatting shared by the live page and the runs page. Every function takes whatever the
// server sent (a number, null, a missing key) and returns text; a value that is not there
// shows as DASH rather than "NaN" or "undefined".

export const DASH = "—";

export function isNum(value) {
  return typeof value === "number" && Number.isFinite(value);
}

export function fixed(value, digits = 1, unit = "") {
  return isNum(value) ? `${value.toFixed(digits)}${unit}` : DASH;
}

export function signed(value, digits = 3, unit = "") {
  if (!isNum(value)) return DASH;
  const text = value.toFixed(digits);
  return `${value >= 0 ? "+" : ""}${text}${unit}`;
}

// Whole numbers with thin-space thousands separators (48 210), readable from across a room.
export function count(value) {
  if (!isNum(value)) return DASH;
  return Math.round(value).toString().replace(/\B(?=(\d{3})+(?!\d))/g, "\u2009");
}

// Run seconds as the operator reads them: "42.1 s", "12 min 05 s", "1 h 02 min".
export function duration(seconds) {
  if (!isNum(seconds)) return DASH;
  const s = Math.max(0, seconds);
  if (s < 60) return `${s.toFixed(1)} s`;
  if (s < 3600) {
    const m = Math.floor(s / 60);
    return `${m} min ${String(Math.floor(s - m * 60)).padStart(2, "0")} s`;
  }
  const h = Math.floor(s / 3600);
  return `${h} h ${String(Math.floor((s - h * 3600) / 60)).padStart(2, "0")} min`;
}

// Compact run time for plot ticks and the event log: "95.2", "12:05.0" past 10 min.
export function runTime(seconds, digits = 1) {
  if (!isNum(seconds)) return DASH;
  if (Math.abs(seconds) < 600) return `${seconds.toFixed(digits)} s`;
  const m = Math.floor(seconds / 60);
  const rest = (seconds - m * 60).toFixed(digits).padStart(digits ? digits + 3 : 2, "0");
  return `${m}:${rest}`;
}

const CURRENT_UNITS = [
  { factor: 1e-12, unit: "pA" },
  { factor: 1e-9, unit: "nA" },
  { factor: 1e-6, unit: "µA" },
  { factor: 1e-3, unit: "mA" },
  { factor: 1, unit: "A" },
];

// The current unit that shows `maxAbs` amperes with 1-3 digits before the point. Cell
// currents are pA (no contact) to ~100 nA (compliance), so nA is the usual answer.
export function currentUnit(maxAbs) {
  if (!isNum(maxAbs) || maxAbs === 0) return CURRENT_UNITS[1];
  for (let i = CURRENT_UNITS.length - 1; i >= 0; i--) {
    if (maxAbs >= CURRENT_UNITS[i].factor * 0.9995) return CURRENT_UNITS[i];
  }
  return CURRENT_UNITS[0];
}

export function current(amperes, digits = 3) {
  if (!isNum(amperes)) return DASH;
  const { factor, unit } = currentUnit(Math.abs(amperes));
  return `${(amperes / factor).toPrecision(digits)} ${unit}`;
}

// Decimal units, as disks are sold and `df -H` prints.
export function bytes(n) {
  if (!isNum(n)) return DASH;
  const units = ["B", "kB", "MB", "GB", "TB", "PB"];
  let value = n;
  let i = 0;
  while (Math.abs(value) >= 1000 && i < units.length - 1) {
    value /= 1000;
    i += 1;
  }
  return `${value.toFixed(value < 10 && i > 0 ? 1 : 0)} ${units[i]}`;
}

// An ISO string or Unix seconds (as os.stat gives) to a local date; other values as they are.
export function toDate(value) {
  if (isNum(value)) return new Date(value < 1e12 ? value * 1000 : value);
  if (typeof value === "string" && value) return new Date(value);
  return null;
}

export function dateTime(value) {
  const date = toDate(value);
  if (!date) return DASH;
  if (Number.isNaN(date.getTime())) return String(value);
  const pad = (v) => String(v).padStart(2, "0");
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())} ` +
    `${pad(date.getHours())}:${pad(date.getMinutes())}`;
}

// "phase_fractions" -> "Phase fractions"
export function humanise(name) {
  const text = String(name ?? "").replace(/_/g, " ").trim();
  return text ? text[0].toUpperCase() + text.slice(1) : "";
}

// Build an element with text content only: nothing the server sends is ever parsed as HTML.
export function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}
