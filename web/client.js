// AvatarClient: the browser side of the Real-Time Lip Sync HTTP contract.
//
//   const client = new AvatarClient({ video: document.querySelector("video") });
//   client.addEventListener("speaking", (e) => console.log(e.detail.speaking));
//   const id = await client.connect();          // POST /offer, then the /humanecho WebSocket
//   client.say("Hello there", { interrupt: true });
//   client.say("What can you do?", { type: "chat", voice: "en-us" }); // the model's reply is spoken
//   await viewer.connect(undefined, { watch: id, secret }); // receive-only: watch an open session
//
// Events (CustomEvent, payload in `detail`):
//   "state"    {state}                  idle | connecting | connected | disconnected
//   "session"  {sessionid, secret, watching}  a session was opened or watched (sessionid null when it ends)
//   "speaking" {speaking, source}       the avatar started or stopped speaking
//   "error"    {code, msg}              a server error (HTTP or WebSocket) or a local failure
//   "message"  {...}                    every JSON event the WebSocket delivers, as sent (queued,
//                                       speaking_started, speaking_ended, reply_text, error, closed),
//                                       after `speaking` is brought up to date with it
//   "sent"     {text, type, t}          say() or uploadAudio() handed speech to the server (type
//                                       echo | chat | audio; t: performance.now())
//   "autoplay-muted" {}                 the browser refused sound without a click: video plays muted
//
// Options: baseUrl (default: this page's server), video (a <video> element), iceServers,
// pollIntervalMs (how often /is_speaking confirms the WebSocket's word; 0 = never),
// events ("ws": the /humanecho WebSocket, which say() also sends on; "sse": GET /events,
// listen only, say() uses POST /human).

export class ApiError extends Error {
  constructor(status, code, msg) {
    super(msg);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.msg = msg;
  }
}

const ICE_GATHER_TIMEOUT_MS = 5000;
const PEER_DISCONNECT_GRACE_MS = 5000;

export class AvatarClient extends EventTarget {
  constructor({ baseUrl = "", video = null, iceServers = [], pollIntervalMs = 500, token = null, events = "ws" } = {}) {
    super();
    this.baseUrl = baseUrl.replace(/\/+$/, "");
    // The server's token when it has one (--token): from the option, else the page's ?token=.
    this.token = token ?? new URL(location.href).searchParams.get("token");
    this.secret = null; // the session's secret, issued by /offer with the session
    this.video = video;
    this.iceServers = iceServers;
    this.pollIntervalMs = pollIntervalMs;
    this.events = events;
    this.state = "idle";
    this.sessionid = null;
    this.watching = false; // true: a receive-only viewer of someone else's session
    this.speaking = false;
    this.pc = null;
    this.ws = null;
    this.es = null; // the EventSource, with events "sse"
    this._active = new Set(); // utterances the WebSocket says are being spoken
    this._seq = 0; // bumped by every WebSocket event, so a stale poll never overrides one
    this._pollTimer = null;
    this._graceTimer = null;
    this._wsRetry = null;
    this._wsDelay = 0;
  }

  // ---- connection ----

  /**
   * Open a session (POST /offer) and its event socket. With `watch`, receive an existing
   * session's media instead (one session, several viewers; `secret` is that session's).
   * @param {string} [avatar] the avatar's name; the server's default when absent
   * @param {{watch?: string, secret?: string}} [opts]
   * @returns {Promise<string>} the session id
   */
  async connect(avatar, { watch = null, secret = null } = {}) {
    if (this.state === "connecting" || this.state === "connected") await this.disconnect();
    this._setState("connecting");
    const pc = new RTCPeerConnection({ iceServers: this.iceServers });
    this.pc = pc;
    const stream = new MediaStream();
    pc.addTransceiver("video", { direction: "recvonly" });
    pc.addTransceiver("audio", { direction: "recvonly" });
    pc.addEventListener("track", (e) => {
      stream.addTrack(e.track);
      this._attach(stream);
    });
    pc.addEventListener("connectionstatechange", () => this._onPeerState(pc));
    try {
      await pc.setLocalDescription(await pc.createOffer());
      await waitIceComplete(pc);
      const body = { sdp: pc.localDescription.sdp, type: pc.localDescription.type };
      if (avatar) body.avatar = avatar;
      if (watch) Object.assign(body, { watch: String(watch), secret });
      const answer = await this._post("/offer", body, { secret: watch ? secret : null });
      if (pc !== this.pc) throw new Error("connection cancelled");
      const watching = answer.watching ?? answer.data?.watching ?? false;
      if (watch && !watching) {
        // An older server ignores `watch` and opens a new session: close it, say why.
        throw new ApiError(501, -1, "this server cannot share a session with viewers (it has no 'watch' on /offer): update the server");
      }
      await pc.setRemoteDescription({ sdp: answer.sdp, type: answer.type });
      this.sessionid = answer.sessionid ?? answer.data?.sessionid ?? watch;
      this.secret = answer.secret ?? answer.data?.secret ?? secret ?? null;
      this.watching = !!watching;
      this._emit("session", { sessionid: this.sessionid, secret: this.secret, watching: this.watching });
      this._openSocket();
      this._startPolling();
      return this.sessionid;
    } catch (err) {
      if (pc === this.pc) {
        this._report(err);
        this._teardown();
      }
      throw err;
    }
  }

  async disconnect() {
    this._teardown();
  }

  _onPeerState(pc) {
    if (pc !== this.pc) return;
    const s = pc.connectionState;
    clearTimeout(this._graceTimer);
    if (s === "connected") {
      this._setState("connected");
    } else if (s === "failed" || s === "closed") {
      const why = s === "failed" ? "the browser could not exchange media with the server (a firewall or VPN blocking UDP?)" : "it was closed";
      this._emit("error", { code: -1, msg: `the media connection ${s}: ${why}; press Connect to try again` });
      this._teardown();
    } else if (s === "disconnected") {
      // ICE may recover on its own; give it a moment before giving up.
      this._graceTimer = setTimeout(() => {
        if (pc === this.pc && pc.connectionState !== "connected") {
          this._emit("error", { code: -1, msg: "the media connection was lost (network change or server gone): press Connect to open a new session" });
          this._teardown();
        }
      }, PEER_DISCONNECT_GRACE_MS);
    }
  }

  _attach(stream) {
    const v = this.video;
    if (!v) return;
    v.playsInline = true;
    v.autoplay = true;
    if (v.srcObject === stream) return; // the second track joins the same stream
    v.srcObject = stream;
    v.play().catch((err) => {
      if (err.name !== "NotAllowedError" || v.srcObject !== stream) return;
      // Autoplay with sound was refused (no user gesture yet): play muted, let the page unmute.
      v.muted = true;
      v.play().catch(() => {});
      this._emit("autoplay-muted", {});
    });
  }

  _teardown() {
    const wasOpen = this.pc !== null || this.sessionid !== null;
    clearTimeout(this._graceTimer);
    clearTimeout(this._wsRetry);
    this._wsDelay = 0;
    this._stopPolling();
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      ws.onopen = ws.onclose = ws.onmessage = ws.onerror = null;
      try { ws.close(); } catch { /* already closed */ }
    }
    if (this.es) {
      this.es.close();
      this.es = null;
    }
    if (this.pc) {
      const pc = this.pc;
      this.pc = null;
      pc.getReceivers().forEach((r) => r.track && r.track.stop());
      pc.close();
    }
    if (this.video) this.video.srcObject = null;
    this._active.clear();
    this._setSpeaking(false, "local");
    if (this.sessionid !== null) {
      this.sessionid = null;
      this.secret = null;
      this.watching = false;
      this._emit("session", { sessionid: null });
    }
    if (wasOpen || this.state !== "idle") this._setState("disconnected");
  }

  // ---- the session's events: the /humanecho WebSocket, or GET /events ----

  _eventsUrl(path) {
    const url = new URL(this.baseUrl + path, location.href);
    url.searchParams.set("sessionid", this.sessionid);
    if (this.secret) url.searchParams.set("secret", this.secret);
    if (this.token) url.searchParams.set("token", this.token);
    return url;
  }

  _retrySoon() {
    this._wsDelay = Math.min((this._wsDelay || 500) * 2, 10000);
    this._wsRetry = setTimeout(() => this.sessionid && this._openSocket(), this._wsDelay);
  }

  _openSocket() {
    if (this.events === "sse") return this._openEventSource();
    const url = this._eventsUrl("/humanecho");
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(url);
    this.ws = ws;
    ws.onopen = () => { this._wsDelay = 0; };
    ws.onmessage = (e) => {
      let ev;
      try { ev = JSON.parse(e.data); } catch { return; }
      this._onEvent(ev);
    };
    ws.onclose = () => {
      if (this.ws !== ws) return;
      this.ws = null;
      // The session is still up (the peer would have told us otherwise): try again shortly;
      // meanwhile say() goes over POST /human.
      if (this.sessionid) this._retrySoon();
    };
  }

  _openEventSource() {
    const es = new EventSource(this._eventsUrl("/events"));
    this.es = es;
    es.onopen = () => { this._wsDelay = 0; };
    const onEvent = (e) => {
      if (this.es !== es || typeof e.data !== "string") return; // "error" without data: the connection's own
      let ev;
      try { ev = JSON.parse(e.data); } catch { return; }
      this._onEvent(ev);
    };
    for (const kind of ["queued", "speaking_started", "speaking_ended", "reply_text", "error", "closed", "message"]) {
      es.addEventListener(kind, onEvent);
    }
    es.addEventListener("error", () => {
      // The browser reconnects by itself unless the answer was not an event stream (a 4xx).
      if (this.es !== es || es.readyState !== EventSource.CLOSED) return;
      this.es = null;
      if (this.sessionid) this._retrySoon();
    });
  }

  _onEvent(ev) {
    this._seq++;
    // State first, then the message: a listener reading `speaking` sees this event applied.
    switch (ev.event) {
      case "speaking_started":
        this._active.add(ev.utterance);
        this._setSpeaking(true, "ws");
        break;
      case "speaking_ended":
        this._active.delete(ev.utterance);
        if (this._active.size === 0) this._setSpeaking(false, "ws");
        break;
    }
    this._emit("message", ev);
    if (ev.event === "error") this._emit("error", { code: ev.code, msg: ev.msg });
    if (ev.event === "closed") {
      this._emit("error", { code: -1, msg: "the server closed this session: press Connect to open a new one" });
      this._teardown();
    }
  }

  // ---- speaking state: WebSocket events, confirmed by polling /is_speaking ----

  _startPolling() {
    this._stopPolling();
    if (!(this.pollIntervalMs > 0)) return; // 0 turns polling off
    const tick = async () => {
      if (!this.sessionid) return;
      const seq = this._seq;
      const id = this.sessionid;
      try {
        const speaking = await this.isSpeaking();
        // Apply only if no WebSocket event arrived meanwhile (it would be newer news).
        if (id === this.sessionid && seq === this._seq && speaking !== this.speaking) {
          if (!speaking) this._active.clear();
          this._setSpeaking(speaking, "poll");
        }
      } catch (err) {
        // 404: the server no longer knows this session (it restarted or closed it).
        if (id === this.sessionid && err.status === 404) {
          this._emit("error", { code: err.code, msg: `the session ended on the server: ${err.msg}` });
          this._teardown();
          return;
        }
        /* anything else may pass (a busy or restarting server): keep polling */
      }
      if (id === this.sessionid) this._pollTimer = setTimeout(tick, this.pollIntervalMs);
    };
    this._pollTimer = setTimeout(tick, this.pollIntervalMs);
  }

  _stopPolling() {
    clearTimeout(this._pollTimer);
    this._pollTimer = null;
  }

  _setSpeaking(speaking, source) {
    if (speaking === this.speaking) return;
    this.speaking = speaking;
    this._emit("speaking", { speaking, source });
  }

  // ---- the API ----

  /**
   * Speak text (`type` "echo"), or send it to the server's chat model, whose reply is
   * spoken (`type` "chat": POST /human; the reply streams in as `reply_text` messages).
   * Echo goes over the WebSocket when it is open, else POST /human.
   * @param {string} text
   * @param {{interrupt?: boolean, type?: "echo"|"chat", voice?: string|null}} [opts]
   * @returns {Promise<object|null>} the HTTP answer (`data.utterance`, `data.reply`), null over the WebSocket
   */
  async say(text, { interrupt = false, type = "echo", voice = null } = {}) {
    this._need();
    if (!text || !text.trim()) throw this._report(new ApiError(0, -1, "nothing to say: type some text first"));
    if (interrupt) {
      this._active.clear();
      this._seq++;
      this._setSpeaking(false, "local");
    }
    const extra = voice ? { voice } : {};
    this._emit("sent", { text, type, t: performance.now() });
    if (type === "echo" && this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(interrupt || voice ? JSON.stringify({ text, interrupt, ...extra }) : text);
      return null;
    }
    return this._post("/human", { sessionid: this.sessionid, text, type, interrupt, ...extra });
  }

  /** GET /avatars: `{avatars: [{name, width, height, seconds, default, ...}], default}`. */
  async avatars() {
    return (await this._fetch("/avatars", { method: "GET" }, { quiet: true })).data;
  }

  /** GET /voices: `{backend, default, voices: [{id, name, language?}]}`. */
  async voices() {
    return (await this._fetch("/voices", { method: "GET" }, { quiet: true })).data;
  }

  async interrupt() {
    this._need();
    const r = await this._post("/interrupt_talk", { sessionid: this.sessionid });
    this._active.clear();
    this._seq++;
    this._setSpeaking(false, "local");
    return r;
  }

  async isSpeaking() {
    this._need();
    const r = await this._post("/is_speaking", { sessionid: this.sessionid }, { quiet: true });
    return r.data === true;
  }

  async startRecord() {
    this._need();
    await this._post("/record", { sessionid: this.sessionid, type: "start_record" });
  }

  // Returns the recording's download URL (absolute).
  async stopRecord() {
    this._need();
    const r = await this._post("/record", { sessionid: this.sessionid, type: "end_record" });
    const url = r.data?.url ?? r.url;
    if (!url) return null;
    const link = new URL(url, new URL(this.baseUrl + "/", location.href));
    if (this.token) link.searchParams.set("token", this.token); // a download link carries no headers
    return link.href;
  }

  async uploadAudio(file, { interrupt = false } = {}) {
    this._need();
    const form = new FormData();
    form.append("sessionid", this.sessionid);
    form.append("interrupt", interrupt ? "true" : "false");
    form.append("file", file, file.name || "audio");
    this._emit("sent", { text: file.name || "audio", type: "audio", t: performance.now() });
    return this._fetch("/humanaudio", { method: "POST", body: form });
  }

  // ---- plumbing ----

  _need() {
    if (!this.sessionid) throw this._report(new ApiError(0, -1, "not connected: press Connect first"));
  }

  _post(path, body, opts = {}) {
    return this._fetch(
      path,
      { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) },
      opts,
    );
  }

  async _fetch(path, init, { quiet = false, secret = null } = {}) {
    let resp, data;
    // The token and the session's secret go with every call (headers: never in a URL a log keeps).
    const headers = new Headers(init.headers || {});
    if (this.token) headers.set("Authorization", `Bearer ${this.token}`);
    if (secret || this.secret) headers.set("X-Session-Secret", secret || this.secret);
    try {
      resp = await fetch(this.baseUrl + path, { ...init, headers });
    } catch (err) {
      throw this._report(new ApiError(0, -1, `cannot reach the server (${path}: ${err.message}): is it running? Reload the page once it is`), quiet);
    }
    try {
      data = await resp.json();
    } catch {
      data = null;
    }
    if (!resp.ok || !data || (data.code !== undefined && data.code !== 0)) {
      const msg = data?.msg || `${path} answered HTTP ${resp.status}`;
      throw this._report(new ApiError(resp.status, data?.code ?? -1, msg), quiet);
    }
    return data;
  }

  _report(err, quiet = false) {
    if (!quiet && !err._reported) {
      err._reported = true;
      this._emit("error", { code: err.code ?? -1, msg: err.msg ?? err.message ?? String(err) });
    }
    return err;
  }

  _setState(state) {
    if (state === this.state) return;
    this.state = state;
    this._emit("state", { state });
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}

// No trickle ICE: the server wants every candidate in the offer.
function waitIceComplete(pc) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      pc.removeEventListener("icegatheringstatechange", check);
      resolve();
    };
    const check = () => pc.iceGatheringState === "complete" && done();
    // Host candidates arrive at once; a missing STUN server must not hang us forever.
    const timer = setTimeout(done, ICE_GATHER_TIMEOUT_MS);
    pc.addEventListener("icegatheringstatechange", check);
  });
}
