// The event log: newest at the top, one <li> per event, coloured by how much it matters.

import { el, runTime } from "./format.js";
import { MAX_EVENTS, upperBound } from "./state.js";

// Event kinds (core/records.py EventKind) by severity. Unknown kinds are plain.
const BAD = new Set(["compliance_trip", "error", "recording_failed"]);
const WARN = new Set(["frame_gap", "frame_duplicate", "frame_out_of_order", "stale_series",
  "malformed_message", "instrument"]);

export function severity(event) {
  const kind = String(event?.kind ?? "");
  const message = String(event?.message ?? "").toLowerCase();
  if (BAD.has(kind) || /trip|fail|error/.test(kind)) return "bad";
  if (kind === "state" && /abort|fail/.test(message)) return "bad";
  if (kind === "instrument" && /lost/.test(message)) return "bad";
  if (WARN.has(kind)) return "warn";
  if (kind === "mark") return "mark";
  if (kind === "state") return "state";
  return "info";
}

function eventItem(event) {
  const item = el("li", `event ev-${severity(event)}`);
  item.dataset.kind = event.kind ?? "";
  item.append(
    el("span", "ev-time", runTime(event.time)),
    el("span", "ev-kind", String(event.kind ?? "").replace(/_/g, " ")),
    el("span", "ev-msg", event.message ?? ""),
  );
  if (event.operator) item.append(el("span", "ev-op", event.operator));
  return item;
}

export class EventLog {
  constructor(list, counter) {
    this.list = list;
    this.counter = counter;
    this.events = [];
    this.times = null; // replay: the events' times, for the search
    this.shownCount = -1; // replay: how many of `events` are shown
  }

  // Everything anew (a snapshot).
  reset(events) {
    this.events = events;
    this.times = null;
    this.shownCount = -1;
    this.list.replaceChildren(...events.slice().reverse().map(eventItem));
    this.updateCounter(events.length);
  }

  // New events at the top. The state already holds them (state.events is `this.events`).
  add(newEvents) {
    const fragment = document.createDocumentFragment();
    for (let i = newEvents.length - 1; i >= 0; i--) fragment.append(eventItem(newEvents[i]));
    this.list.prepend(fragment);
    while (this.list.childElementCount > MAX_EVENTS) this.list.lastElementChild.remove();
    this.updateCounter(this.events.length);
  }

  // Replay: the events up to run time t (events are in time order).
  showUpTo(t) {
    this.times ??= this.events.map((event) => event.time ?? 0);
    const n = upperBound(this.times, t);
    if (n === this.shownCount) return;
    this.shownCount = n;
    this.list.replaceChildren(...this.events.slice(0, n).reverse().map(eventItem));
    this.updateCounter(n, this.events.length);
  }

  updateCounter(n, of) {
    if (!this.counter) return;
    this.counter.textContent = of === undefined ? `(${n})` : `(${n} of ${of})`;
  }
}
