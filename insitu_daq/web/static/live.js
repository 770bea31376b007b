// The live page (docs/WEB.md): /api/session, then WS /ws (a snapshot, then updates), or with
// ?run=<name> a replay of that run file. This module wires the parts together; each part is
// in js/.

import { socketUrl, LiveSocket } from "./js/connection.js";
import { Controls, LoginDialog, renderSession, Session } from "./js/controls.js";
import { EventLog } from "./js/events.js";
import { isNum } from "./js/format.js";
import { ImagePanel, latencies, PhaseOverlay, RingOverlay, stats } from "./js/images.js";
import { Lightbox } from "./js/lightbox.js";
import { PlotBoard, phaseColours } from "./js/plots.js";
import { fetchReplay, ReplayController } from "./js/replay.js";
import { applyUpdate, stateFromSnapshot } from "./js/state.js";
import { alerts, liveTiles, renderHeader, replayTiles, Tiles } from "./js/status.js";

const $ = (id) => document.getElementById(id);
const runName = new URLSearchParams(window.location.search).get("run");
const ACTIVE_STATES = ["running", "paused", "aborting"];

// For tests and the bench (docs/WEB.md; bench/): read-only views of the page's own objects.
window.insituLatencies = latencies;
window.insituStats = stats;
window.insituState = null;

let state = null;
let replay = null;
let lastStatusAt = 0; // Date.now() of the newest status from the daemon (via the web process)
const STATUS_STALE_MS = 5000; // the daemon publishes it every second

// ----- parts ---------------------------------------------------------------------------------
const session = new Session({ onChange: onSession });
const login = new LoginDialog(session);
new Controls(session);
const lightbox = new Lightbox();
const phase = new PhaseOverlay();
const rings = new RingOverlay();
const eventLog = new EventLog($("event-log"), $("event-count"));
const tiles = new Tiles($("tiles"));
const board = new PlotBoard($("plots"), { xRange });
const panels = {};
for (const kind of ["hrtem", "lm", "fft"]) {
  panels[kind] = new ImagePanel(kind, { onLoaded: (meta) => imageLoaded(kind, meta) });
  const frame = $(`frame-${kind}`);
  const openFull = () => {
    const url = panels[kind].fullUrl();
    if (url) lightbox.open(url, `${kind} · ${panels[kind].caption.textContent}`);
  };
  frame.addEventListener("click", openFull);
  frame.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      openFull();
    }
  });
}

function imageLoaded(kind, meta) {
  // Rings belong to the spectrum they were measured on: drawn with it, not before.
  if (kind === "fft") rings.show(replay ? replay.ringsAt(meta.time) : meta.rings);
  panels[kind].updateCaption(runClock());
}

// ----- the live state --------------------------------------------------------------------------
function applyMessage(message) {
  if (!message || typeof message !== "object") return;
  if (message.type === "snapshot" || state === null) {
    applySnapshot(message);
    return;
  }
  stats.updates += 1;
  const changes = applyUpdate(state, message);
  if (changes.layout || board.needsRebuild(state)) {
    board.rebuild(state);
    rings.setContext(state.reflections, phaseColours(state));
  } else if (changes.series.size || changes.status) {
    board.scheduleDraw();
  }
  if (changes.events.length) eventLog.add(changes.events);
  if (changes.status) {
    lastStatusAt = Date.now();
    renderStatus();
  }
  if (changes.previews.length) showPreviews(changes.previews);
}

function applySnapshot(message) {
  // A snapshot after a reconnect may come from a restarted web process whose versions count
  // from 1 again: every image is fetched anew rather than trusted by its number.
  for (const panel of Object.values(panels)) panel.version = undefined;
  phase.version = undefined;
  state = stateFromSnapshot(message);
  window.insituState = state;
  board.rebuild(state);
  rings.setContext(state.reflections, phaseColours(state));
  eventLog.reset(state.events);
  lastStatusAt = Date.now();
  renderStatus();
  showPreviews(Object.keys(state.previews), { fromSnapshot: true });
}

// The socket can be live while the daemon is not (the web process still serves images and
// the page): say so when its status stops coming, the header's numbers being that old.
function checkStatusAge() {
  const node = $("status-age");
  const silent = Date.now() - lastStatusAt;
  const stale = !replay && state !== null && lastStatusAt > 0 && silent > STATUS_STALE_MS &&
    $("connection").classList.contains("conn-live");
  node.hidden = !stale;
  if (stale) node.textContent = `no status from the daemon for ${Math.round(silent / 1000)} s`;
}
setInterval(checkStatusAge, 1000);

function showPreviews(kinds, options = {}) {
  for (const kind of kinds) {
    if (panels[kind]) panels[kind].showPreview(state.previews[kind], options);
    if (kind === "phase") {
      phase.show(state.previews.phase);
      // The legend sets the phase colours of the fraction plot and the rings.
      board.refreshColours(state);
      rings.setContext(state.reflections, phaseColours(state));
    }
  }
}

function renderStatus() {
  renderHeader(state);
  // Paused: Resume is the button the operator is looking for.
  document.body.classList.toggle("is-paused-run", state.status?.protocol?.state === "paused");
  tiles.render(liveTiles(state.status));
  const messages = alerts(state.status);
  const banner = $("alert-banner");
  banner.hidden = messages.length === 0;
  banner.textContent = messages.join(" · ");
  for (const panel of Object.values(panels)) panel.updateCaption(runClock());
}

function runClock() {
  if (replay) return replay.time;
  return state?.status?.protocol?.run_elapsed_s;
}

// Every plot shares one time axis: the run so far (live) or the whole run (replay).
function xRange() {
  if (replay) return [0, Math.max(replay.duration, 1)];
  let lo = Infinity;
  let hi = -Infinity;
  for (const group of Object.values(state?.series ?? {})) {
    if (!group.t?.length) continue;
    lo = Math.min(lo, group.t[0]);
    hi = Math.max(hi, group.t[group.t.length - 1]);
  }
  const protocol = state?.status?.protocol;
  if (ACTIVE_STATES.includes(protocol?.state) && isNum(protocol.run_elapsed_s)) {
    hi = Math.max(hi, protocol.run_elapsed_s);
  }
  if (!Number.isFinite(lo) || !Number.isFinite(hi)) return [0, 10];
  lo = Math.min(lo, 0);
  return [lo, Math.max(hi, lo + 10)];
}

// ----- connection ------------------------------------------------------------------------------
const socket = new LiveSocket(socketUrl("/ws"), { onMessage: applyMessage, onState: showConnection });
let socketStarted = false;

function showConnection({ state: connection, retryInMs, silentMs }) {
  const indicator = $("connection");
  const banner = $("disconnected-banner");
  const labels = {
    connecting: "connecting…",
    live: "live",
    stale: `no data for ${Math.round((silentMs ?? 0) / 1000)} s`,
    disconnected: "disconnected",
    refused: "login needed",
  };
  indicator.textContent = labels[connection] ?? connection;
  indicator.className = `connection conn-${connection}`;
  document.body.classList.toggle("is-disconnected", connection === "disconnected" || connection === "refused");
  if (connection === "disconnected") {
    const seconds = Math.max(1, Math.ceil((retryInMs ?? 0) / 1000));
    banner.replaceChildren(
      document.createTextNode(`Disconnected from the live view: reconnecting in ${seconds} s. ` +
        "The run is not affected; what is shown here is as of the disconnection. "),
      reconnectButton(),
    );
    banner.hidden = false;
  } else if (connection === "refused") {
    banner.textContent = "The live view needs a login.";
    banner.hidden = false;
    login.open("This station's live view needs a login.");
  } else {
    banner.hidden = true;
  }
}

function reconnectButton() {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "btn btn-small";
  button.textContent = "Reconnect now";
  button.addEventListener("click", () => socket.reconnect());
  return button;
}

function onSession(current) {
  renderSession(current, { replay: Boolean(runName) });
  if (runName) return;
  if (!current.public_view && !current.user) {
    // Logged out of a station that is not public: stop watching, whatever the server does.
    socket.stop();
    socketStarted = false;
    showConnection({ state: "refused" });
    return;
  }
  if (!socketStarted) {
    socketStarted = true;
    socket.start();
  } else if ($("connection").classList.contains("conn-refused")) {
    socket.reconnect();
  }
}

// ----- replay ------------------------------------------------------------------------------------
async function startReplay(name) {
  document.body.classList.add("is-replay");
  $("replay-bar").hidden = false;
  $("connection").textContent = "replay";
  $("connection").className = "connection conn-replay";
  document.title = `${name} · insitu-daq replay`;
  phase.setAvailable(false); // no phase maps are kept in the run file
  try {
    state = await fetchReplay(name);
  } catch (error) {
    const banner = $("alert-banner");
    banner.textContent = `Could not load run ${name}: ${error.message}`;
    banner.hidden = false;
    return;
  }
  window.insituState = state;
  rings.setContext(state.reflections, phaseColours(state));
  eventLog.reset(state.events);
  replay = new ReplayController(name, state, { panels, rings, onTime: replayTime });
  board.rebuild(state);
  replay.start();
}

function replayTime(t) {
  board.limitTime = t;
  board.scheduleDraw();
  eventLog.showUpTo(t);
  const protocol = state.status?.protocol ?? {};
  renderHeader(state, {
    replay: { name: runName, protocol: protocol.protocol, state: protocol.state ?? "replay",
      step: replay.stepAt(t), time: t, duration: replay.duration },
  });
  tiles.render(replayTiles(state, t));
  if (panels.fft.shown) rings.show(replay.ringsAt(panels.fft.shown.meta.time ?? t));
}

// ----- start -------------------------------------------------------------------------------------
session.load();
if (runName) startReplay(runName);
