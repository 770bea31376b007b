// The WebSocket to the web process, reopened with backoff when it closes. The web process
// (or the network to it) may restart during a run; the run goes on regardless, and on
// reconnecting the server's first message is a fresh snapshot, so nothing is pieced together
// here from what was missed.

const FIRST_DELAY_MS = 500;
const MAX_DELAY_MS = 15000;
const STALE_AFTER_MS = 5000; // status comes at 1 Hz: five seconds of silence is worth showing

export function socketUrl(path = "/ws", where = window.location) {
  const scheme = where.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${where.host}${path}`;
}

export class LiveSocket {
  // onMessage(parsed JSON); onState({state: "connecting"|"live"|"stale"|"disconnected"|
  // "refused", retryInMs, silentMs, code})
  constructor(url, { onMessage, onState }) {
    this.url = url;
    this.onMessage = onMessage;
    this.onState = onState;
    this.socket = null;
    this.delay = FIRST_DELAY_MS;
    this.retryTimer = null;
    this.retryAt = 0;
    this.lastMessageAt = 0;
    this.stopped = true;
    this.watchdog = null;
  }

  start() {
    this.stopped = false;
    this.open();
    // One timer for both the "no data for N s" indicator and the retry countdown.
    this.watchdog ??= setInterval(() => this.tick(), 1000);
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.retryTimer);
    clearInterval(this.watchdog);
    this.watchdog = null;
    if (this.socket) this.socket.close(1000, "page closed the view");
    this.socket = null;
  }

  open() {
    clearTimeout(this.retryTimer);
    this.onState({ state: "connecting" });
    let socket;
    try {
      socket = new WebSocket(this.url);
    } catch (error) {
      this.scheduleRetry(undefined);
      return;
    }
    this.socket = socket;
    socket.addEventListener("message", (event) => {
      if (socket !== this.socket) return;
      const wasLive = this.lastMessageAt > 0;
      this.lastMessageAt = Date.now();
      this.delay = FIRST_DELAY_MS; // a message: the server is really there, back off from scratch
      let message;
      try {
        message = JSON.parse(event.data);
      } catch (error) {
        console.warn("live view: a message that is not JSON was ignored", error);
        return;
      }
      if (!wasLive) this.onState({ state: "live" });
      this.onMessage(message);
    });
    socket.addEventListener("close", (event) => {
      if (socket !== this.socket) return;
      this.socket = null;
      this.lastMessageAt = 0;
      if (this.stopped) return;
      // 1008 (policy) or 4401/4403: the server wants a login; retrying will not help until then.
      if (event.code === 1008 || event.code === 4401 || event.code === 4403) {
        this.onState({ state: "refused", code: event.code });
        return;
      }
      this.scheduleRetry(event.code);
    });
    // An error is always followed by close, which does the retry.
  }

  scheduleRetry(code) {
    const jitter = 0.8 + Math.random() * 0.4; // viewers of a restarted server do not return in step
    const wait = Math.round(this.delay * jitter);
    this.delay = Math.min(this.delay * 2, MAX_DELAY_MS);
    this.retryAt = Date.now() + wait;
    this.retryTimer = setTimeout(() => this.open(), wait);
    this.onState({ state: "disconnected", retryInMs: wait, code });
  }

  // Retry now (after a login, or when the user clicks the banner).
  reconnect() {
    if (this.socket) this.socket.close(1000, "reconnecting");
    this.socket = null;
    this.delay = FIRST_DELAY_MS;
    this.stopped = false;
    this.open();
  }

  tick() {
    if (this.stopped) return;
    if (this.socket && this.lastMessageAt) {
      const silent = Date.now() - this.lastMessageAt;
      this.onState({ state: silent > STALE_AFTER_MS ? "stale" : "live", silentMs: silent });
    } else if (!this.socket && this.retryAt > Date.now()) {
      this.onState({ state: "disconnected", retryInMs: this.retryAt - Date.now() });
    }
  }
}
