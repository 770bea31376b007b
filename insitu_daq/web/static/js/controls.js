// Login, logout and the run controls. Whether a control may be used is the server's call
// (`/api/session` says `can_control`; the daemon decides whether the command makes sense
// now): the page never disables Abort because its own copy of the state says so, since that
// copy can be seconds old and Abort is the button that must always work.

const $ = (id) => document.getElementById(id);

async function postJson(url, body) {
  const response = await fetch(url, {
    method: "POST",
    credentials: "same-origin",
    // A JSON body makes a cross-site form post impossible without a CORS preflight, on top of
    // the SameSite=Strict session cookie.
    headers: { "Content-Type": "application/json", Accept: "application/json" },
    body: JSON.stringify(body ?? {}),
  });
  let reply = null;
  try {
    reply = await response.json();
  } catch {
    reply = null;
  }
  return { status: response.status, ok: response.ok, reply };
}

function replyText(reply) {
  if (!reply || typeof reply !== "object") return "";
  return reply.error ?? reply.message ?? reply.detail ?? reply.reason ?? "";
}

export class Session {
  // onChange(session) after every load (login, logout, 401 from a control).
  constructor({ onChange }) {
    this.onChange = onChange;
    this.current = { user: null, role: null, can_control: false, public_view: true };
  }

  async load() {
    try {
      const response = await fetch("/api/session", { credentials: "same-origin", cache: "no-store" });
      if (response.ok) this.current = { ...this.current, ...(await response.json()) };
    } catch (error) {
      console.warn("session: /api/session unreachable", error);
    }
    this.onChange(this.current);
    return this.current;
  }
}

export class LoginDialog {
  constructor(session) {
    this.session = session;
    this.dialog = $("login-dialog");
    this.error = $("login-error");
    $("login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.submit();
    });
    $("login-cancel").addEventListener("click", () => this.dialog.close());
    $("login-button").addEventListener("click", () => this.open());
    $("login-link").addEventListener("click", (event) => {
      event.preventDefault();
      this.open();
    });
    $("logout-button").addEventListener("click", () => this.logout());
  }

  open(message = "") {
    this.error.textContent = message;
    $("login-password").value = "";
    $("login-token").value = "";
    if (!this.dialog.open) this.dialog.showModal();
    $("login-user").focus();
  }

  async submit() {
    const token = $("login-token").value.trim();
    const body = token
      ? { token }
      : { user: $("login-user").value.trim(), password: $("login-password").value };
    this.error.textContent = "";
    $("login-submit").disabled = true;
    try {
      const { status, ok, reply } = await postJson("/api/login", body);
      if (ok) {
        this.dialog.close();
        await this.session.load();
      } else if (status === 401) {
        this.error.textContent = token ? "wrong token" : "wrong user or password";
      } else {
        this.error.textContent = replyText(reply) || `login failed (HTTP ${status})`;
      }
    } catch (error) {
      this.error.textContent = "could not reach the web server";
    } finally {
      $("login-submit").disabled = false;
      $("login-password").value = "";
    }
  }

  async logout() {
    try {
      await postJson("/api/logout", {});
    } catch (error) {
      console.warn("logout: web server unreachable", error);
    }
    await this.session.load();
  }
}

// Header and control panel from a session: who is logged in, what they may do.
export function renderSession(session, { replay = false } = {}) {
  const loggedIn = Boolean(session.user);
  $("user-name").textContent = loggedIn ? `${session.user}${session.role ? ` (${session.role})` : ""}` : "";
  $("login-button").hidden = loggedIn;
  $("logout-button").hidden = !loggedIn;
  const canControl = Boolean(session.can_control) && !replay;
  $("control-buttons").hidden = !canControl;
  for (const id of ["pause-button", "resume-button", "abort-button", "mark-button", "mark-text"]) {
    $(id).disabled = !canControl;
  }
  const hint = $("control-hint");
  hint.hidden = canControl;
  if (replay) {
    hint.textContent = "A replay: the controls act on the live run, from the live view.";
  } else if (loggedIn && !canControl) {
    hint.textContent = `Logged in as ${session.user} (${session.role ?? "viewer"}): view only.`;
  } else if (!loggedIn) {
    hint.replaceChildren();
    const link = document.createElement("a");
    link.href = "#";
    link.id = "login-link";
    link.textContent = "Log in to control";
    link.addEventListener("click", (event) => {
      event.preventDefault();
      $("login-button").click();
    });
    hint.append(link, document.createTextNode(" the run."));
  }
}

export class Controls {
  constructor(session) {
    this.session = session;
    this.message = $("control-message");
    this.pauseDialog = $("pause-dialog");
    this.abortDialog = $("abort-dialog");

    $("pause-button").addEventListener("click", () => {
      $("pause-reason").value = "";
      this.pauseDialog.showModal();
      $("pause-reason").focus();
    });
    $("pause-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.pauseDialog.close();
      this.send("pause", { reason: $("pause-reason").value.trim() || "paused from the web page" });
    });
    $("pause-cancel").addEventListener("click", () => this.pauseDialog.close());

    $("resume-button").addEventListener("click", () => this.send("resume", {}));

    $("abort-button").addEventListener("click", () => {
      $("abort-reason").value = "";
      this.abortDialog.showModal();
      // Focus on Cancel: an Enter pressed by habit must not abort a run.
      $("abort-cancel").focus();
    });
    $("abort-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.abortDialog.close();
      this.send("abort", { reason: $("abort-reason").value.trim() || "aborted from the web page" });
    });
    $("abort-cancel").addEventListener("click", () => this.abortDialog.close());

    $("mark-button").addEventListener("click", () => this.mark());
    $("mark-text").addEventListener("keydown", (event) => {
      if (event.key === "Enter") {
        event.preventDefault();
        this.mark();
      }
    });
  }

  mark() {
    const text = $("mark-text").value.trim();
    if (!text) {
      this.show("Write what to mark first.", "error");
      $("mark-text").focus();
      return;
    }
    this.send("mark", { text }).then((ok) => {
      if (ok) $("mark-text").value = "";
    });
  }

  show(text, kind) {
    this.message.textContent = text;
    this.message.className = `control-message control-${kind}`;
  }

  // POST the command; say what the daemon answered. Resolves true if it was done.
  async send(verb, body) {
    this.show(`${verb}: sending…`, "pending");
    let result;
    try {
      result = await postJson(`/api/control/${verb}`, body);
    } catch (error) {
      this.show(`${verb}: could not reach the web server (${error.message ?? error}).`, "error");
      return false;
    }
    const { status, reply } = result;
    const detail = replyText(reply);
    if (status === 401) {
      this.show(`${verb}: not logged in (or the session ended). Log in and try again.`, "error");
      this.session.load();
      return false;
    }
    if (status === 403) {
      this.show(`${verb}: refused, your account may not control the run${detail ? ` (${detail})` : ""}.`, "error");
      return false;
    }
    if (!result.ok) {
      this.show(`${verb}: failed, HTTP ${status}${detail ? `: ${detail}` : ""}.`, "error");
      return false;
    }
    if (reply && reply.ok === false) {
      this.show(`${verb}: the daemon refused${detail ? `: ${detail}` : ""}.`, "error");
      return false;
    }
    const extras = reply && typeof reply === "object"
      ? Object.entries(reply).filter(([k, v]) => k !== "ok" && v != null && typeof v !== "object")
        .map(([k, v]) => `${k} ${v}`).join(", ")
      : "";
    this.show(`${verb}: done${extras ? ` (${extras})` : ""}.`, "ok");
    return true;
  }
}
