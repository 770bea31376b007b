// The header (run, protocol, state, step, times) and the health tiles, from the daemon's
// status (`insitu-daq status`). Every key is optional: a missing one shows "—", never an error,
// so an older or newer daemon still gets a readable page.

import { bytes, count, current, DASH, duration, el, isNum, runTime, signed } from "./format.js";
import { severity } from "./events.js";
import { TEMPERATURE_SERIES } from "./plots.js";
import { upperBound } from "./state.js";

const HOLD_WARN_MV = 10; // |V - setpoint| above this during a hold is worth a look
const HOLD_BAD_MV = 50;
const DISK_WARN_FRACTION = 0.1;
const DISK_BAD_FRACTION = 0.03;
const CAPACITY_WARN_S = 600; // if the daemon says how long the disk lasts at the frame rate

const KNOWN_STATES = ["idle", "running", "paused", "aborting", "finished", "done", "aborted", "failed"];

function text(id, value) {
  const node = document.getElementById(id);
  if (node) node.textContent = value ?? DASH;
}

// "3/9 hold — 'hold at +4.3 V'"
export function stepText(protocol) {
  if (!protocol || protocol.step_index == null) return DASH;
  const number = protocol.step_number ?? protocol.step_index + 1;
  const of = protocol.step_count ? `/${protocol.step_count}` : "";
  const kind = protocol.step_kind ? ` ${protocol.step_kind}` : "";
  const what = protocol.step_description ? ` — '${protocol.step_description}'` : "";
  return `${number}${of}${kind}${what}`;
}

export function renderHeader(state, { replay = null } = {}) {
  const status = state.status ?? {};
  const protocol = status.protocol ?? {};
  text("station", state.station ?? status.station ?? "insitu-daq");
  if (replay) {
    text("run-id", replay.name);
  } else if (status.run_id) {
    text("run-id", status.run_id);
  } else {
    text("run-id", status.last_run_id ? `${status.last_run_id} (closed)` : "no run");
  }
  text("protocol", protocol.protocol ?? replay?.protocol ?? DASH);

  const runState = replay ? replay.state ?? "replay" : protocol.state ?? "unknown";
  const stateNode = document.getElementById("run-state");
  stateNode.textContent = runState;
  const known = KNOWN_STATES.includes(runState) || runState === "replay" ? runState : "unknown";
  stateNode.className = `run-state state-${known}`;
  stateNode.dataset.state = runState;
  const showReason = ["paused", "aborting", "aborted", "failed"].includes(runState);
  text("state-reason", showReason && protocol.reason ? protocol.reason : "");

  if (replay) {
    text("step", replay.step ?? DASH);
    text("step-elapsed", DASH);
    text("step-left", DASH);
    text("run-elapsed", `${duration(replay.time)} / ${duration(replay.duration)}`);
    return;
  }
  text("step", stepText(protocol));
  text("step-elapsed", protocol.step_index == null ? DASH : duration(protocol.step_elapsed_s));
  text("step-left", duration(protocol.hold_remaining_s));
  text("run-elapsed", duration(protocol.run_elapsed_s));
}

// ---------------------------------------------------------------------------------------------
// Tiles: {id, title, value, sub, level: ok|warn|bad|idle, tip}

export class Tiles {
  constructor(container) {
    this.container = container;
    this.nodes = new Map();
  }

  render(tiles) {
    const ids = new Set(tiles.map((tile) => tile.id));
    for (const [id, node] of this.nodes) {
      if (!ids.has(id)) {
        node.root.remove();
        this.nodes.delete(id);
      }
    }
    for (const tile of tiles) {
      let node = this.nodes.get(tile.id);
      if (!node) {
        node = { root: el("div", "tile"), title: el("div", "tile-title"), value: el("div", "tile-value"),
          sub: el("div", "tile-sub") };
        node.root.id = `tile-${tile.id}`;
        node.root.append(node.title, node.value, node.sub);
        this.nodes.set(tile.id, node);
      }
      this.container.append(node.root); // keeps the given order
      node.root.className = `tile tile-${tile.level ?? "idle"}`;
      node.title.textContent = tile.title;
      node.value.textContent = tile.value ?? DASH;
      node.sub.textContent = tile.sub ?? "";
      if (tile.tip) node.root.title = tile.tip;
      else node.root.removeAttribute("title");
    }
  }
}

function holdTile(bias, stepKind) {
  const tile = { id: "hold", title: "Hold accuracy", level: "idle", value: DASH, sub: "|V − setpoint|" };
  if (!bias) return tile;
  if (bias.output_on === false) return { ...tile, value: "output off" };
  if (!isNum(bias.voltage) || !isNum(bias.setpoint)) return tile;
  const mv = Math.abs(bias.voltage - bias.setpoint) * 1000;
  tile.value = `${mv < 10 ? mv.toFixed(2) : mv.toFixed(1)} mV`;
  const ramping = stepKind === "ramp";
  if (ramping) tile.sub += " (ramping)";
  tile.level = ramping ? "ok" : mv > HOLD_BAD_MV ? "bad" : mv > HOLD_WARN_MV ? "warn" : "ok";
  return tile;
}

function biasTile(bias) {
  if (!bias) return { id: "bias", title: "Bias", level: "idle", value: DASH };
  return {
    id: "bias",
    title: "Bias",
    level: bias.output_on === false ? "idle" : "ok",
    value: signed(bias.voltage, 3, " V"),
    sub: `set ${signed(bias.setpoint, 3, " V")} · ${current(bias.current)}`,
  };
}

// A heating holder's chip (the status's `temperature`; in a replay, its log at the cursor).
function temperatureTile(temperature) {
  const tile = { id: "temperature", title: "Temperature", level: "idle", value: DASH, sub: "" };
  if (!temperature) return tile;
  const celsius = (v) => (isNum(v) ? `${v.toFixed(1)} °C` : DASH);
  tile.value = celsius(temperature.temperature_c);
  const heater = temperature.heater_on === true ? "heater on" : temperature.heater_on === false
    ? "heater off" : null;
  tile.sub = [`set ${celsius(temperature.setpoint_c)}`, heater].filter(Boolean).join(" · ");
  if (temperature.ramping) tile.sub += " (ramping)";
  if (isNum(temperature.target_c) && temperature.heater_on) tile.tip = `target ${celsius(temperature.target_c)}`;
  tile.level = temperature.heater_on === false ? "idle" : isNum(temperature.temperature_c) ? "ok" : "idle";
  if (temperature.connected === false) return { ...tile, level: "bad", sub: "holder not answering" };
  return tile;
}

function firstNumber(object, keys) {
  for (const key of keys) if (isNum(object?.[key])) return object[key];
  return undefined;
}

function framesTile(ingest) {
  const tile = { id: "frames", title: "Frames written", level: "idle", value: DASH, sub: "lost — · malformed —" };
  if (!ingest) return tile;
  const written = firstNumber(ingest, ["frames_written_total", "frames_written"]) ??
    firstNumber(ingest.run, ["frames_written"]);
  const dropped = firstNumber(ingest, ["frames_dropped_total", "frames_dropped", "frames_lost_total"]);
  const missing = firstNumber(ingest, ["frames_missing_total", "frames_missing"]);
  const malformed = firstNumber(ingest, ["malformed_total", "malformed"]);
  const lost = isNum(dropped) || isNum(missing) ? (dropped ?? 0) + (missing ?? 0) : undefined;
  tile.value = count(written);
  tile.sub = `lost ${count(lost)} · malformed ${count(malformed)}`;
  tile.tip = `dropped ${count(dropped)}, missing image ids ${count(missing)}` +
    (isNum(ingest.records_dropped_total) ? `, records dropped ${count(ingest.records_dropped_total)}` : "");
  tile.level = "ok";
  if ((lost ?? 0) > 0 || (malformed ?? 0) > 0 || (ingest.records_dropped_total ?? 0) > 0) tile.level = "warn";
  if (ingest.alive === false) {
    tile.level = "bad";
    tile.sub = "ingest process down";
  }
  return tile;
}

function diskTile(disk) {
  const tile = { id: "disk", title: "Data disk", level: "idle", value: DASH, sub: "" };
  if (!disk) return tile;
  const free = disk.free_bytes;
  const size = disk.size_bytes;
  const fraction = isNum(free) && isNum(size) && size > 0 ? free / size : undefined;
  const capacity = firstNumber(disk, ["recording_capacity_s", "capacity_s"]);
  tile.value = isNum(free) ? `${bytes(free)} free` : DASH;
  const parts = [];
  if (isNum(fraction)) parts.push(`${(fraction * 100).toFixed(0)} % of ${bytes(size)}`);
  if (isNum(capacity)) parts.push(`~${duration(capacity)} of recording`);
  if (disk.path) parts.push(disk.path);
  tile.sub = parts.join(" · ");
  tile.level = "ok";
  if ((isNum(fraction) && fraction < DISK_WARN_FRACTION) || (isNum(capacity) && capacity < CAPACITY_WARN_S)) {
    tile.level = "warn";
  }
  if (disk.problem || disk.writable === false || (isNum(fraction) && fraction < DISK_BAD_FRACTION)) {
    tile.level = "bad";
    if (disk.problem) tile.sub = String(disk.problem);
    else if (disk.writable === false) tile.sub = "not writable";
  }
  return tile;
}

function instrumentTile(bias) {
  const tile = { id: "instrument", title: "Source meter", level: "idle", value: DASH, sub: "" };
  if (!bias) return tile;
  const output = bias.output_on === true ? "output on" : bias.output_on === false ? "output off" : "output —";
  if (bias.connected === false) return { ...tile, level: "bad", value: "DISCONNECTED", sub: output };
  if (bias.tripped) return { ...tile, level: "bad", value: "TRIPPED", sub: `compliance trip · ${output}` };
  return { ...tile, level: bias.connected ? "ok" : "idle", value: bias.connected ? "connected" : DASH, sub: output };
}

function guardianTile(guardian) {
  const tile = { id: "guardian", title: "Bias guardian", level: "idle", value: DASH, sub: "" };
  if (!guardian) return tile;
  const restarts = guardian.restarts_total;
  const sub = [guardian.pid != null ? `pid ${guardian.pid}` : null,
    isNum(restarts) ? `${restarts} restart${restarts === 1 ? "" : "s"}` : null].filter(Boolean).join(" · ");
  if (guardian.alive === false) return { ...tile, level: "bad", value: "NOT ALIVE", sub };
  if (guardian.alive !== true) return { ...tile, sub };
  return { ...tile, level: restarts > 0 ? "warn" : "ok", value: "alive", sub };
}

function analysisTile(analysis) {
  const tile = { id: "analysis", title: "Live analysis", level: "idle", value: "off", sub: "no analysis process" };
  if (!analysis) return tile;
  const errors = (analysis.errors_total ?? 0) + (analysis.malformed_total ?? 0) +
    (analysis.results_malformed_total ?? 0);
  tile.value = `${count(analysis.frames_analysed_total)} results`;
  tile.sub = `errors ${count(isNum(analysis.errors_total) ? errors : undefined)}` +
    ` · of ${count(analysis.frames_received_total)} frames`;
  tile.tip = Object.entries(analysis)
    .filter(([, v]) => isNum(v))
    .map(([k, v]) => `${k.replace(/_total$/, "").replace(/_/g, " ")}: ${count(v)}`)
    .join("\n");
  tile.level = errors > 0 ? "warn" : "ok";
  if (analysis.alive === false) {
    tile.level = "bad";
    tile.value = "down";
  }
  return tile;
}

function recordingTile(status) {
  const tile = { id: "recording", title: "Recording", level: "idle", value: "no run", sub: "" };
  const sinkErrors = Object.entries(status.record_sink_errors ?? {}).filter(([, n]) => n);
  if (status.run_id) {
    tile.level = "ok";
    tile.value = "recording";
    tile.sub = String(status.run_file ?? status.run_id).split("/").pop();
  }
  if (sinkErrors.length) {
    tile.level = "warn";
    tile.sub = `record errors: ${sinkErrors.map(([k, n]) => `${k} ${n}`).join(", ")}`;
  }
  if (status.recording_failure) {
    tile.level = "bad";
    tile.value = "FAILED";
    tile.sub = String(status.recording_failure);
  }
  return tile;
}

export function liveTiles(status) {
  const bias = status.bias ?? null;
  return [
    holdTile(bias, status.protocol?.step_kind),
    biasTile(bias),
    ...(status.temperature ? [temperatureTile(status.temperature)] : []),
    framesTile(status.ingest ?? null),
    diskTile(status.data_disk ?? null),
    instrumentTile(bias),
    guardianTile(status.guardian ?? null),
    analysisTile(status.analysis ?? null),
    recordingTile(status),
  ];
}

// What stops the show: said in a banner across the page, not only in a tile.
export function alerts(status) {
  const out = [];
  if (status.recording_failure) out.push(`Recording failed: ${status.recording_failure}`);
  if (status.bias?.tripped) out.push("Compliance trip: the source meter tripped");
  if (status.bias?.connected === false) out.push("The source meter is disconnected");
  if (status.guardian?.alive === false) out.push("The bias guardian is not alive");
  if (status.data_disk?.problem) out.push(`Data disk: ${status.data_disk.problem}`);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Replay: the same questions, asked of the run file at the scrubber's time.

function biasAt(series, t) {
  const group = series?.bias;
  if (!group?.t?.length) return null;
  const i = upperBound(group.t, t) - 1;
  if (i < 0) return null;
  return { voltage: group.voltage?.[i], setpoint: group.setpoint?.[i], current: group.current?.[i] };
}

function temperatureAt(series, t) {
  const group = series?.[TEMPERATURE_SERIES];
  if (!group?.t?.length) return null;
  const i = upperBound(group.t, t) - 1;
  if (i < 0) return null;
  return { temperature_c: group.value?.[i], setpoint_c: group.setpoint?.[i] };
}

export function replayTiles(state, t) {
  const bias = biasAt(state.series, t);
  const heated = Boolean(state.series?.[TEMPERATURE_SERIES]?.t?.length);
  const perMode = Object.entries(state.frame_times ?? {}).map(([mode, times]) =>
    [mode, upperBound(times ?? [], t)]);
  const total = perMode.reduce((sum, [, n]) => sum + n, 0);
  const events = state.events.filter((event) => (event.time ?? 0) <= t);
  const bad = events.filter((event) => severity(event) === "bad").length;
  return [
    { id: "time", title: "Cursor", level: "ok", value: runTime(t), sub: "run time" },
    holdTile(bias, null),
    biasTile(bias),
    ...(heated ? [{ ...temperatureTile(temperatureAt(state.series, t)), level: "ok" }] : []),
    { id: "frames", title: "Frames so far", level: perMode.length ? "ok" : "idle",
      value: perMode.length ? count(total) : DASH,
      sub: perMode.map(([mode, n]) => `${mode} ${count(n)}`).join(" · ") },
    { id: "events", title: "Events so far", level: bad ? "warn" : "ok", value: count(events.length),
      sub: `${bad} trip${bad === 1 ? "" : "s"}/error${bad === 1 ? "" : "s"}` },
  ];
}
