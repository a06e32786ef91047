// The control page (webrtcapi.html): connect to an avatar, make it say text or chat,
// interrupt, record, speak an audio file, and watch what it says and how fast.
import { AvatarClient } from "./client.js";
import { LatencyMeter } from "./latency.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const video = /** @type {HTMLVideoElement} */ ($("video"));
const client = new AvatarClient({ video });
const meter = new LatencyMeter(client, video);
window.avatarClient = client; // handy from the console (and the browser benchmark)

const sessionControls = ["disconnect", "send", "interrupt", "record-start", "upload", "text", "audio-file"];
const store = {
  get: (k) => { try { return localStorage.getItem(`lipsync.${k}`); } catch { return null; } },
  set: (k, v) => { try { localStorage.setItem(`lipsync.${k}`, v); } catch { /* private mode */ } },
};
let recording = false;
let recordStarted = 0;
let recordTimer = 0;
let errorShown = false; // an error stays on the status line until the next action

// ---- the status line: offline | connecting | live | thinking | speaking | idle | error ----

/** @param {string} state @param {string} msg */
function status(state, msg) {
  const el = $("status");
  el.dataset.state = state;
  el.textContent = msg;
  el.className = state === "error" ? "error" : state === "live" || state === "idle" ? "ok" : "";
  errorShown = state === "error";
}

/** A message, capitalized, ending in a full stop. */
function sentence(msg) {
  const s = String(msg || "something went wrong").trim();
  return s.charAt(0).toUpperCase() + s.slice(1) + (/[.!?)]$/.test(s) ? "" : ".");
}

function idle(prefix = "") {
  if (!client.sessionid) return;
  status("idle", `${prefix}Idle. Ready for more.`);
}

// ---- rendering ----

function render() {
  const s = client.state;
  const live = !!client.sessionid;
  $("conn-state").textContent = s;
  $("conn-dot").className = `dot state-${s}`;
  $("connect").disabled = s === "connecting" || live;
  for (const id of sessionControls) $(id).disabled = !live;
  $("record-start").disabled = !live || recording;
  $("record-stop").disabled = !live || !recording;
  $("record-panel").classList.toggle("recording", recording);
  $("sessionid").textContent = client.sessionid || "";
  $("secret").textContent = client.secret || "";
  $("stage").classList.toggle("live", live);
  $("text").placeholder = !live ? "Connect first"
    : mode() === "chat" ? "Ask the avatar something. Enter sends, Shift+Enter for a new line."
      : "Type what the avatar should say. Enter sends, Shift+Enter for a new line.";
  const link = /** @type {HTMLAnchorElement} */ ($("viewer-link"));
  link.classList.toggle("hidden", !live);
  if (live) {
    const q = new URLSearchParams({ sessionid: client.sessionid, secret: client.secret || "" });
    if (client.token) q.set("token", client.token);
    link.href = `viewer.html?${q}`;
  }
}

/** @returns {"echo"|"chat"} */
function mode() {
  return /** @type {HTMLInputElement} */ (document.querySelector("input[name=mode]:checked")).value === "chat" ? "chat" : "echo";
}

// ---- the transcript: what was asked, what the avatar says ----

/** @typedef {{li: HTMLLIElement, body: HTMLElement}} Line */
/** @type {Map<string, Line>} utterance or reply id -> its line */
const lines = new Map();
/** @type {{text: string, line: Line}[]} echo lines sent from here, waiting for their `queued` event */
const awaiting = [];
const squash = (s) => String(s ?? "").replace(/\s+/g, " ").trim();

/**
 * @param {"user"|"avatar"} who
 * @param {string} text
 * @returns {Line}
 */
function addLine(who, text) {
  const li = document.createElement("li");
  li.className = `msg ${who}`;
  const name = document.createElement("span");
  name.className = "who";
  name.textContent = who === "user" ? "You" : "Avatar";
  const body = document.createElement("p");
  body.textContent = text;
  li.append(name, body);
  const list = $("transcript");
  const atEnd = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  list.append(li);
  while (list.children.length > 200) list.firstElementChild.remove();
  $("transcript-empty").classList.add("hidden");
  if (atEnd) list.scrollTop = list.scrollHeight;
  return { li, body };
}

/** Mark a line ("interrupted", "failed", "not sent"). @param {Line} line @param {string} name */
function tag(line, name) {
  line.li.classList.remove("speaking");
  if ([...line.li.querySelectorAll(".tag")].some((t) => t.dataset.tag === name)) return;
  const t = document.createElement("span");
  t.className = "tag";
  t.dataset.tag = name;
  t.textContent = name;
  line.li.append(t);
}

/** The line an event belongs to (a chat reply's, or an utterance's), made if new. */
function lineOf(ev) {
  if (ev.reply) {
    if (!lines.has(ev.reply)) lines.set(ev.reply, addLine("avatar", ev.event === "reply_text" ? ev.text : ""));
    return lines.get(ev.reply);
  }
  if (!ev.utterance) return null;
  if (!lines.has(ev.utterance)) {
    const text = ev.text == null ? "(an audio file)" : ev.text;
    const k = awaiting.findIndex((a) => a.text === squash(text));
    const line = k >= 0 ? awaiting.splice(k, 1)[0].line : addLine("avatar", text);
    lines.set(ev.utterance, line);
  }
  return lines.get(ev.utterance);
}

client.addEventListener("message", (e) => {
  const ev = e.detail;
  switch (ev.event) {
    case "queued":
      lineOf(ev);
      break;
    case "speaking_started":
      lineOf(ev)?.li.classList.add("speaking");
      status("speaking", "Speaking…");
      break;
    case "speaking_ended": {
      const line = lineOf(ev);
      if (line && ev.interrupted) tag(line, "interrupted");
      else line?.li.classList.remove("speaking");
      if (!client.speaking && !errorShown) idle(ev.interrupted ? "Interrupted. " : "");
      break;
    }
    case "reply_text": {
      const line = lineOf(ev);
      line.body.textContent = ev.text;
      if (ev.done && ev.interrupted) tag(line, "interrupted");
      if (ev.done && ev.error) tag(line, "failed");
      if (!client.speaking && !errorShown) {
        if (!ev.done) status("thinking", "The avatar is replying…");
        else if (!ev.text) idle("The chat model sent an empty reply. ");
      }
      break;
    }
  }
});

// ---- the latency readout ----

const ms = (x) => `${Math.round(x)} ms`;
meter.addEventListener("measure", (e) => {
  const m = e.detail;
  $("latency-value").textContent = ms(m.frameMs ?? m.eventMs);
  document.querySelector("#latency .latency-label").textContent =
    m.frameMs == null ? "Send → speaking_started event" : "Send → first speaking frame";
  const parts = [];
  if (m.frameMs == null) parts.push(`event time shown: ${m.why || "no frame seen"}`);
  else parts.push(`event ${ms(m.eventMs)}`);
  if (m.serverMs != null) parts.push(`server ${ms(m.serverMs)}`);
  if (meter.history.length > 1) parts.push(`median ${ms(meter.median())} of ${meter.history.length}`);
  $("latency-detail").textContent = parts.join(" · ");
  $("latency").dataset.measured = "true";
});

// ---- client events ----

client.addEventListener("state", (e) => {
  const s = e.detail.state;
  if (s === "connecting") status("connecting", "Connecting…");
  if (s === "connected") status("live", "Live. Type something and press Enter.");
  if (s === "disconnected") {
    recording = false;
    clearInterval(recordTimer);
    $("record-time").textContent = "";
    $("unmute").classList.add("hidden");
    if (!errorShown) status("offline", "Disconnected. Press Connect to start again.");
  }
  render();
});
client.addEventListener("session", render);
client.addEventListener("speaking", (e) => {
  const on = e.detail.speaking;
  $("speaking").dataset.speaking = String(on);
  $("speaking-label").textContent = on ? "speaking" : "silent";
  if (on && !errorShown) status("speaking", "Speaking…");
  // Off by a poll or an interrupt (the WebSocket's speaking_ended says it above).
  if (!on && e.detail.source !== "ws" && !errorShown && $("status").dataset.state === "speaking") idle();
});
client.addEventListener("error", (e) => status("error", sentence(e.detail.msg)));
client.addEventListener("autoplay-muted", () => $("unmute").classList.remove("hidden"));

$("unmute").onclick = () => {
  video.muted = false;
  video.play().catch(() => {});
  $("unmute").classList.add("hidden");
};

// ---- connect: the avatar and voice pickers ----

async function connect() {
  $("record-link").classList.add("hidden");
  try {
    await client.connect(/** @type {HTMLSelectElement} */ ($("avatar")).value || undefined);
    if (client.state !== "connected") status("connecting", "Session opened, waiting for media…");
  } catch { /* shown by the error event */ }
  render();
}
$("connect").onclick = connect;

$("disconnect").onclick = async () => {
  if (recording) await stopRecord();
  await client.disconnect();
  status("offline", "Disconnected. Press Connect to start again.");
};

/** Fill the avatar picker from GET /avatars; ?avatar=NAME (or the last choice) preselects. */
async function loadAvatars() {
  const select = /** @type {HTMLSelectElement} */ ($("avatar"));
  const wanted = params.get("avatar") || store.get("avatar") || "";
  let data = null;
  try { data = await client.avatars(); } catch (err) {
    select.title = `the server did not list its avatars (${err.msg || err.message}): connecting uses its default`;
  }
  const options = [];
  for (const a of data?.avatars ?? []) {
    const size = a.width && a.height ? ` · ${a.width}×${a.height}` : "";
    const def = a.default && a.name !== "default" ? " (default)" : "";
    const opt = new Option(`${a.name}${def}${size}`, a.name);
    opt.title = [a.source, a.seconds && `${Number(a.seconds).toFixed(1)} s loop`, a.clips?.length && `${a.clips.length} clips`].filter(Boolean).join(" · ");
    options.push(opt);
  }
  if (!options.length) options.push(new Option("Server default", ""));
  const names = options.map((o) => o.value);
  if (wanted && !names.includes(wanted)) options.push(new Option(`${wanted} (not listed)`, wanted));
  select.replaceChildren(...options);
  select.value = wanted || data?.default || names[0];
  if (select.selectedIndex < 0) select.selectedIndex = 0;
  select.dataset.loaded = "true";
}

$("avatar").addEventListener("change", () => {
  const name = /** @type {HTMLSelectElement} */ ($("avatar")).value;
  store.set("avatar", name);
  const url = new URL(location.href);
  if (name) url.searchParams.set("avatar", name); else url.searchParams.delete("avatar");
  history.replaceState(null, "", url);
  if (client.sessionid || client.state === "connecting") connect(); // reconnect with the chosen one
});

/** Fill the voice picker from GET /voices. */
async function loadVoices() {
  const select = /** @type {HTMLSelectElement} */ ($("voice"));
  let data = null;
  try { data = await client.voices(); } catch (err) {
    select.title = `the server did not list its voices (${err.msg || err.message}): it speaks with its default`;
    select.disabled = true;
    select.dataset.loaded = "true";
    return;
  }
  const label = (v) => `${v.name || v.id}${v.language && v.language !== v.name ? ` (${v.language})` : ""}`;
  const voices = [...(data.voices ?? [])].sort((a, b) => label(a).localeCompare(label(b)));
  const def = data.default ? voices.find((v) => v.id === data.default) : null;
  const first = new Option(`Default${def ? `: ${def.name || def.id}` : data.default ? `: ${data.default}` : ""}`, "");
  select.replaceChildren(first, ...voices.map((v) => new Option(label(v), v.id)));
  select.title = data.backend ? `voices of the ${data.backend} TTS backend` : "";
  const saved = store.get("voice");
  if (saved && voices.some((v) => v.id === saved)) select.value = saved;
  select.dataset.loaded = "true";
}
$("voice").addEventListener("change", () => store.set("voice", /** @type {HTMLSelectElement} */ ($("voice")).value));

// ---- speak / chat ----

for (const radio of document.querySelectorAll("input[name=mode]")) {
  radio.addEventListener("change", () => { store.set("mode", mode()); render(); });
}
if (store.get("mode") === "chat") /** @type {HTMLInputElement} */ (document.querySelector("input[name=mode][value=chat]")).checked = true;

function hint(msg) {
  $("text-hint").textContent = msg;
  $("text-hint").classList.toggle("error", !!msg);
  $("text").setAttribute("aria-invalid", msg ? "true" : "false");
}
$("text").addEventListener("input", () => hint(""));

async function send() {
  const box = /** @type {HTMLTextAreaElement} */ ($("text"));
  const text = box.value;
  const type = mode();
  if (!text.trim()) {
    hint(type === "chat" ? "Type a message for the avatar first." : "Type something for the avatar to say first.");
    box.focus();
    return;
  }
  hint("");
  const interrupt = /** @type {HTMLInputElement} */ ($("interrupt-on-send")).checked;
  const voice = /** @type {HTMLSelectElement} */ ($("voice")).value || null;
  box.value = "";
  let pending = null;
  let asked = null;
  if (type === "chat") {
    asked = addLine("user", text);
    status("thinking", "Asking the chat model…");
  } else {
    pending = { text: squash(text), line: addLine("avatar", text) };
    awaiting.push(pending);
  }
  try {
    await client.say(text, { interrupt, type, voice });
  } catch {
    // Shown by the error event; give the text back to edit and send again.
    if (!box.value) box.value = text;
    if (pending) awaiting.splice(awaiting.indexOf(pending), 1);
    const line = pending?.line ?? asked;
    if (line) tag(line, "not sent");
  }
  box.focus();
}
$("speak").addEventListener("submit", (e) => { e.preventDefault(); send(); });
$("text").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    send();
  }
});

$("interrupt").onclick = async () => {
  try {
    await client.interrupt();
    for (const li of $("transcript").querySelectorAll("li.speaking")) li.classList.remove("speaking");
    idle("Interrupted. ");
  } catch { /* shown */ }
};

// ---- record ----

const clock = (s) => `${Math.floor(s / 60)}:${String(Math.floor(s % 60)).padStart(2, "0")}`;
$("record-start").onclick = async () => {
  try {
    await client.startRecord();
    recording = true;
    recordStarted = performance.now();
    $("record-link").classList.add("hidden");
    $("record-time").textContent = "0:00";
    recordTimer = setInterval(() => { $("record-time").textContent = clock((performance.now() - recordStarted) / 1000); }, 500);
  } catch { /* shown */ }
  render();
};

async function stopRecord() {
  clearInterval(recordTimer);
  try {
    const url = await client.stopRecord();
    if (url) {
      const link = /** @type {HTMLAnchorElement} */ ($("record-link"));
      link.href = url;
      link.download = `lipsync-${client.sessionid}.mp4`;
      link.classList.remove("hidden");
      $("record-time").textContent = `${clock((performance.now() - recordStarted) / 1000)} recorded`;
    }
  } catch { $("record-time").textContent = ""; }
  recording = false;
  render();
}
$("record-stop").onclick = stopRecord;

// ---- speak an audio file ----

$("upload").onclick = async () => {
  const file = /** @type {HTMLInputElement} */ ($("audio-file")).files[0];
  if (!file) return status("error", "Choose an audio file first.");
  $("upload").disabled = true;
  try {
    const r = await client.uploadAudio(file, { interrupt: /** @type {HTMLInputElement} */ ($("interrupt-on-send")).checked });
    const secs = r.data?.seconds;
    status("thinking", `Speaking ${file.name}${secs ? ` (${secs} s)` : ""}…`);
  } catch { /* shown */ }
  render();
};

// ---- the stage fits the avatar's own shape (portrait, square or wide) ----

const fit = () => { $("stage").style.aspectRatio = video.videoWidth ? `${video.videoWidth} / ${video.videoHeight}` : ""; };
video.addEventListener("resize", fit);
video.addEventListener("emptied", fit);
window.addEventListener("pagehide", () => client.disconnect());
render();
loadAvatars();
loadVoices();
