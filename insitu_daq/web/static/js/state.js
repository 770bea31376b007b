// The page's copy of the live state (docs/WEB.md "The state object"): a snapshot, then
// updates merged into it. Series are thinned so a run of hours keeps memory flat.

export const MAX_POINTS = 20000; // per series group (every column of a group has t's length)
export const TAIL_POINTS = 5000; // the newest points stay at full resolution
export const MAX_EVENTS = 5000; // a runaway event source must not grow the page without bound

// Thinning bookkeeping per series group, kept off the group so `window.insituState.series`
// looks exactly like the server's: {start of the full-resolution part, rows merged per point}.
const thinning = new WeakMap();

// A fresh state from a snapshot (or a replay object). Unknown keys are kept, so a field the
// server adds later reaches `window.insituState` without a page change.
export function stateFromSnapshot(snapshot, { tail = TAIL_POINTS } = {}) {
  const state = { ...snapshot };
  state.mode = snapshot.mode ?? "live";
  state.quantities = Array.isArray(snapshot.quantities) ? snapshot.quantities : [];
  state.reflections = Array.isArray(snapshot.reflections) ? snapshot.reflections : [];
  state.status = snapshot.status ?? {};
  state.previews = { ...(snapshot.previews ?? {}) };
  state.events = Array.isArray(snapshot.events) ? snapshot.events.slice(-MAX_EVENTS) : [];
  state.series = {};
  for (const [name, columns] of Object.entries(snapshot.series ?? {})) {
    state.series[name] = normaliseGroup(columns);
    thinGroup(state.series[name], MAX_POINTS, tail);
  }
  return state;
}

// Merge one update into `state`. Returns what changed, so the page redraws only that.
export function applyUpdate(state, update) {
  const changes = { status: false, series: new Set(), events: [], previews: [], layout: false };
  if ("status" in update) {
    state.status = update.status ?? {};
    changes.status = true;
  }
  // A run with another reflection table or quantity list: the panels are rebuilt.
  for (const key of ["quantities", "reflections"]) {
    if (Array.isArray(update[key])) {
      state[key] = update[key];
      changes.layout = true;
    }
  }
  for (const [name, columns] of Object.entries(update.append ?? {})) {
    if (appendGroup(state.series, name, columns)) changes.series.add(name);
  }
  if (Array.isArray(update.events) && update.events.length) {
    for (const event of update.events) state.events.push(event);
    const over = state.events.length - MAX_EVENTS;
    if (over > 0) state.events.splice(0, over);
    changes.events = update.events;
  }
  for (const [kind, preview] of Object.entries(update.previews ?? {})) {
    if (preview == null) continue;
    state.previews[kind] = preview;
    changes.previews.push(kind);
  }
  return changes;
}

// Columns as arrays of equal length (t's). A column the server left short is padded with
// null, so index i is one row in every column.
function normaliseGroup(columns) {
  const group = {};
  const n = Array.isArray(columns?.t) ? columns.t.length : 0;
  for (const [key, values] of Object.entries(columns ?? {})) {
    if (!Array.isArray(values)) continue;
    const column = values.slice(0, n);
    while (column.length < n) column.push(null);
    group[key] = column;
  }
  if (!group.t) group.t = [];
  return group;
}

function appendGroup(series, name, add) {
  const n = Array.isArray(add?.t) ? add.t.length : 0;
  if (n === 0) return false;
  const group = (series[name] ??= { t: [] });
  const before = group.t.length;
  // A column this append does not carry (a quantity of the other imaging mode) gets nulls.
  for (const key of Object.keys(group)) {
    if (!Array.isArray(add[key])) pushRepeated(group[key], null, n);
  }
  for (const [key, values] of Object.entries(add)) {
    if (!Array.isArray(values)) continue;
    // A key first seen now (a quantity declared mid-run) has had no value until now.
    const column = (group[key] ??= new Array(before).fill(null));
    for (let i = 0; i < n; i++) column.push(i < values.length ? values[i] : null);
  }
  thinGroup(group);
  return true;
}

function pushRepeated(column, value, n) {
  for (let i = 0; i < n; i++) column.push(value);
}

// Rows [start, end) merged k at a time: a merged row has the first row's time and, per
// column, the first non-null value. Merging (rather than dropping every other row) keeps
// every quantity: HRTEM and low-mag results alternate rows, and dropping rows at a stride
// could drop all of one mode's rows.
export function mergeRows(column, start, end, k) {
  const out = [];
  for (let i = start; i < end; i += k) {
    let value = column[i];
    const stop = Math.min(i + k, end);
    for (let j = i + 1; value == null && j < stop; j++) value = column[j];
    out.push(value ?? null);
  }
  return out;
}

// Keep a group at most `max` rows. The newest `tail` rows stay at full resolution (what the
// operator is watching); older rows are merged at one stride for all of them, doubled each
// time they outgrow their share. The oldest data is then as dense as the rest of the old part,
// not halved again at every overflow (which would leave the start of a long run a few points).
export function thinGroup(group, max = MAX_POINTS, tail = TAIL_POINTS) {
  const n = group.t.length;
  if (n <= max) return false;
  const meta = thinning.get(group) ?? { fullStart: 0, stride: 1 };
  const fullStart = Math.min(meta.fullStart, n);
  const cut = Math.max(fullStart, n - tail);
  let oldLength = fullStart + Math.ceil((cut - fullStart) / meta.stride);
  let stride = meta.stride;
  let halvings = 0;
  while (oldLength + (n - cut) > max * 0.75 && oldLength > 1) {
    oldLength = Math.ceil(oldLength / 2);
    stride *= 2;
    halvings += 1;
  }
  for (const key of Object.keys(group)) {
    const column = group[key];
    let old = column.slice(0, fullStart).concat(mergeRows(column, fullStart, cut, meta.stride));
    for (let h = 0; h < halvings; h++) old = mergeRows(old, 0, old.length, 2);
    group[key] = old.concat(column.slice(cut));
  }
  thinning.set(group, { fullStart: group.t.length - (n - cut), stride });
  return true;
}

// The index of the first element of sorted `values` greater than `x` (so values[0..i) <= x).
export function upperBound(values, x) {
  let lo = 0;
  let hi = values.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (values[mid] <= x) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// The element of sorted `values` nearest to x (undefined for an empty array).
export function nearest(values, x) {
  if (!values?.length) return undefined;
  const i = upperBound(values, x);
  if (i === 0) return values[0];
  if (i === values.length) return values[i - 1];
  return x - values[i - 1] <= values[i] - x ? values[i - 1] : values[i];
}

// The last non-null value of `column` in rows [0, end).
export function lastValue(column, end = column?.length ?? 0) {
  if (!column) return null;
  for (let i = Math.min(end, column.length) - 1; i >= 0; i--) {
    if (column[i] != null) return column[i];
  }
  return null;
}
