// AvatarClient: the browser side of the Real-Time Lip Sync HTTP contract.
//
//   const client = new AvatarClient({ video: document.querySelector("video") });
//   client.addEventListener("speaking", (e) => console.log(e.detail.speaking));
//   const id = await client.connect();          // POST /offer, then the /humanecho WebSocket
//   client.say("Hello there", { interrupt: true });
//
// Events (CustomEvent, payload in `detail`):
//   "state"    {state}                  idle | connecting | connected | disconnected
//   "session"  {sessionid}              a session was opened (null when it ends)
//   "speaking" {speaking, source}       the avatar started or stopped speaking
//   "error"    {code, msg}              a server error (HTTP or WebSocket) or a local failure
//   "message"  {...}                    every JSON event the WebSocket delivers, as sent
//   "autoplay-muted" {}                 the browser refused sound without a click: video plays muted
//
// Options: baseUrl (default: this page's server), video (a <video> element), iceServers,
// pollIntervalMs (how often /is_speaking confirms the WebSocket's word; 0 = never).

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
  constructor({ baseUrl = "", video = null, iceServers = [], pollIntervalMs = 500, token = null } = {}) {
    super();
    this.baseUrl = baseUrl.replace(/\/+$/, "");
    // The server's token when it has one (--token): from the option, else the page's ?token=.
    this.token = token ?? new URL(location.href).searchParams.get("token");
    this.secret = null; // the session's secret, issued by /offer with the session
    this.video = video;
    this.iceServers = iceServers;
    this.pollIntervalMs = pollIntervalMs;
    this.state = "idle";
    this.sessionid = null;
    this.speaking = false;
    this.pc = null;
    this.ws = null;
    this._active = new Set(); // utterances the WebSocket says are being spoken
    this._seq = 0; // bumped by every WebSocket event, so a stale poll never overrides one
    this._pollTimer = null;
    this._graceTimer = null;
    this._wsRetry = null;
    this._wsDelay = 0;
  }

  // ---- connection ----

  async connect(avatar) {
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
      const answer = await this._post("/offer", body);
      if (pc !== this.pc) throw new Error("connection cancelled");
      await pc.setRemoteDescription({ sdp: answer.sdp, type: answer.type });
      this.sessionid = answer.sessionid ?? answer.data?.sessionid;
      this.secret = answer.secret ?? answer.data?.secret ?? null;
      this._emit("session", { sessionid: this.sessionid, secret: this.secret });
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
      this._emit("error", { code: -1, msg: `the media connection ${s}` });
      this._teardown();
    } else if (s === "disconnected") {
      // ICE may recover on its own; give it a moment before giving up.
      this._graceTimer = setTimeout(() => {
        if (pc === this.pc && pc.connectionState !== "connected") {
          this._emit("error", { code: -1, msg: "the media connection was lost" });
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
      this._emit("session", { sessionid: null });
    }
    if (wasOpen || this.state !== "idle") this._setState("disconnected");
  }

  // ---- the /humanecho WebSocket ----

  _openSocket() {
    const url = new URL(this.baseUrl + "/humanecho", location.href);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    url.searchParams.set("sessionid", this.sessionid);
    if (this.secret) url.searchParams.set("secret", this.secret);
    if (this.token) url.searchParams.set("token", this.token);
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
      if (this.sessionid) {
        this._wsDelay = Math.min((this._wsDelay || 500) * 2, 10000);
        this._wsRetry = setTimeout(() => this.sessionid && this._openSocket(), this._wsDelay);
      }
    };
  }

  _onEvent(ev) {
    this._seq++;
    this._emit("message", ev);
    switch (ev.event) {
      case "speaking_started":
        this._active.add(ev.utterance);
        this._setSpeaking(true, "ws");
        break;
      case "speaking_ended":
        this._active.delete(ev.utterance);
        if (this._active.size === 0) this._setSpeaking(false, "ws");
        break;
      case "error":
        this._emit("error", { code: ev.code, msg: ev.msg });
        break;
      case "closed":
        this._emit("error", { code: -1, msg: "the server closed this session" });
        this._teardown();
        break;
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

  // Speak text: over the WebSocket when it is open, else POST /human.
  async say(text, { interrupt = false } = {}) {
    this._need();
    if (!text || !text.trim()) throw this._report(new ApiError(0, -1, "nothing to say: type some text first"));
    if (interrupt) {
      this._active.clear();
      this._seq++;
      this._setSpeaking(false, "local");
    }
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(interrupt ? JSON.stringify({ text, interrupt: true }) : text);
      return null;
    }
    return this._post("/human", { sessionid: this.sessionid, text, type: "echo", interrupt });
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
    return this._fetch("/humanaudio", { method: "POST", body: form });
  }

  // ---- plumbing ----

  _need() {
    if (!this.sessionid) throw this._report(new ApiError(0, -1, "not connected: press Connect first"));
  }

  _post(path, body, opts) {
    return this._fetch(
      path,
      { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) },
      opts,
    );
  }

  async _fetch(path, init, { quiet = false } = {}) {
    let resp, data;
    // The token and the session's secret go with every call (headers: never in a URL a log keeps).
    const headers = new Headers(init.headers || {});
    if (this.token) headers.set("Authorization", `Bearer ${this.token}`);
    if (this.secret) headers.set("X-Session-Secret", this.secret);
    try {
      resp = await fetch(this.baseUrl + path, { ...init, headers });
    } catch (err) {
      throw this._report(new ApiError(0, -1, `cannot reach the server (${path}): ${err.message}`), quiet);
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
