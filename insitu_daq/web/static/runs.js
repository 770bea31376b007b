// The runs page: every run file in data_dir (GET /api/runs), newest first, each linked to
// its replay. `summary` is whatever the server could read from the file; the page shows the
// keys it knows in their columns and any other number or word as a summary line, and never
// fails on a key it does not know or one that is missing.

import { bytes, count, current, DASH, dateTime, duration, el, isNum, toDate } from "./js/format.js";
import { Lightbox } from "./js/lightbox.js";

const MAX_SUMMARY_ITEMS = 8;

// The summary keys that have a column of their own (first present wins).
const COLUMNS = {
  protocol: ["protocol", "protocol_name"],
  outcome: ["outcome", "state", "end_state", "final_state"],
  duration: ["duration_s", "run_elapsed_s", "bias_span_s"],
  date: ["start_time", "started", "start"],
};
// Keys shown elsewhere or not worth a line.
const SKIP = new Set(["run_id", "reason", "error", "path", "end_time", "title", "events",
  "holds", "geometry", "geometries", ...Object.values(COLUMNS).flat()]);

const lightbox = new Lightbox();

function pick(summary, keys) {
  for (const key of keys) {
    if (summary[key] !== undefined && summary[key] !== null && summary[key] !== "") return summary[key];
  }
  return undefined;
}

// A summary value as text, its unit read off the key's suffix (the daemon's naming: SI units
// spelt out, as in charge_coulomb, duration_s, size_bytes).
function formatEntry(key, value) {
  if (typeof value === "boolean") return value ? "yes" : "no";
  if (typeof value === "string") return value;
  if (!isNum(value)) return null;
  if (/_s$|_seconds$/.test(key)) return duration(value);
  if (/_bytes$/.test(key)) return bytes(value);
  if (/_amperes?$|current/.test(key)) return current(value);
  if (/_volts?$/.test(key)) return `${value.toFixed(3)} V`;
  if (/_coulombs?$/.test(key)) return `${value.toExponential(2)} C`;
  if (/expansion|fraction|_ratio$/.test(key) && Math.abs(value) <= 5) return `${(value * 100).toFixed(1)} %`;
  if (Number.isInteger(value)) return count(value);
  return value.toPrecision(4);
}

function labelOf(key) {
  return key
    .replace(/_(s|seconds|bytes|amperes?|volts?|coulombs?|ratio)$/, "")
    .replace(/_/g, " ");
}

function summaryList(summary) {
  const list = el("ul", "summary-list");
  let shown = 0;
  for (const [key, value] of Object.entries(summary)) {
    if (SKIP.has(key) || shown >= MAX_SUMMARY_ITEMS) continue;
    let text = formatEntry(key, value);
    if (text === null && value && typeof value === "object" && !Array.isArray(value)) {
      // A small table of counts (event_counts, imaging_frames): "hrtem 812, lm 203".
      const parts = Object.entries(value).filter(([, v]) => isNum(v)).map(([k, v]) => `${k} ${count(v)}`);
      text = parts.length && parts.length <= 6 ? parts.join(", ") : null;
    }
    if (text === null) continue;
    const item = el("li");
    item.append(el("span", "k", labelOf(key)), el("span", "v", text));
    list.append(item);
    shown += 1;
  }
  if (summary.reason) {
    const item = el("li");
    item.append(el("span", "k", "reason"), el("span", "v", summary.reason));
    list.append(item);
  }
  return list;
}

function figureCell(run) {
  const cell = el("td");
  const url = `/api/runs/${encodeURIComponent(run.name)}/figure.png`;
  const showThumb = () => {
    const img = document.createElement("img");
    img.className = "thumb";
    img.loading = "lazy";
    img.alt = `report figure of ${run.name}`;
    img.src = url;
    img.addEventListener("click", () => lightbox.open(url, run.name));
    img.addEventListener("error", () => cell.replaceChildren(el("span", "no-thumb", "no figure")));
    cell.replaceChildren(img);
  };
  if (run.figure === false) {
    // Not drawn yet: drawing one is seconds of matplotlib on the acquisition PC, so only when
    // asked for, not for every run in the list at once.
    const button = el("button", "btn btn-small", "Draw figure");
    button.type = "button";
    button.addEventListener("click", showThumb);
    cell.append(button);
  } else {
    showThumb();
  }
  return cell;
}

function runRow(run) {
  const summary = run.summary && typeof run.summary === "object" ? run.summary : {};
  const row = el("tr");
  row.dataset.run = run.name;

  const nameCell = el("td", "run-name");
  const link = el("a", null, run.name);
  link.href = `/?run=${encodeURIComponent(run.name)}`;
  link.title = "replay this run";
  nameCell.append(link);
  if (summary.title && summary.title !== run.name) nameCell.append(el("div", "muted", summary.title));

  const outcomeText = summary.error ? "unreadable" : pick(summary, COLUMNS.outcome);
  const outcomeCell = el("td");
  const outcome = el("span", `outcome outcome-${String(outcomeText ?? "").toLowerCase()}`, outcomeText ?? DASH);
  outcomeCell.append(outcome);
  if (summary.error) outcomeCell.append(el("div", "runs-error", summary.error));

  const durationValue = pick(summary, COLUMNS.duration);
  row.append(
    nameCell,
    el("td", null, dateTime(pick(summary, COLUMNS.date) ?? run.modified)),
    el("td", "num", bytes(run.size_bytes)),
    el("td", "num", isNum(durationValue) ? duration(durationValue) : DASH),
    el("td", null, pick(summary, COLUMNS.protocol) ?? DASH),
    outcomeCell,
    (() => {
      const cell = el("td");
      cell.append(summaryList(summary));
      return cell;
    })(),
    figureCell(run),
  );
  return row;
}

async function load() {
  const status = document.getElementById("runs-status");
  const body = document.querySelector("#runs-table tbody");
  let runs;
  try {
    const response = await fetch("/api/runs", { credentials: "same-origin", cache: "no-store" });
    if (response.status === 401) {
      status.textContent = "This station's runs need a login: log in on the live view first.";
      status.classList.add("runs-error");
      return;
    }
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    runs = (await response.json()).runs ?? [];
  } catch (error) {
    status.textContent = `Could not load the runs: ${error.message}`;
    status.classList.add("runs-error");
    return;
  }
  // Newest first, whatever order they came in (a run without a date goes last).
  const time = (run) => toDate(run.modified)?.getTime() || 0;
  runs = runs.slice().sort((a, b) => time(b) - time(a));
  body.replaceChildren(...runs.map(runRow));
  status.textContent = runs.length ? `${runs.length} run${runs.length === 1 ? "" : "s"}` : "No runs yet.";
}

load();
