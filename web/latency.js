// LatencyMeter: send -> first speaking frame, measured in the page.
//
//   const meter = new LatencyMeter(client, video);
//   meter.addEventListener("measure", (e) => console.log(e.detail.frameMs));
//
// For each say() (the client's "sent" event, t0 = performance.now()):
//   1. the first `queued` event after it names the utterance (for echo, the one with the
//      text that was sent; for chat, the reply's first sentence);
//   2. that utterance's `speaking_started` arrives: eventMs = its arrival - t0, and
//      serverMs = the server's own `latency_ms` (queued -> first frame sent);
//   3. the first video frame the element presents that was received after that event
//      (requestVideoFrameCallback: receiveTime, else the callback's time) is the first
//      speaking frame: frameMs = its expectedDisplayTime - t0. The server emits the event as
//      the frame goes out, so the frame arrives with it; this errs late by a frame at most.
// Without requestVideoFrameCallback, or while the page is not being painted (a hidden or
// background tab: no frame presented for PAINT_STALL_MS around the event), frameMs is null,
// `why` says so, and eventMs stands in.
//
// "measure" detail: {text, type, frameMs, eventMs, serverMs, utterance, why}.

const FRAME_WAIT_MS = 1500; // after the event: a frame should have been shown by then
const PAINT_STALL_MS = 300; // no frame presented for this long: the page is not being painted
const GIVE_UP_MS = 120_000; // a send whose speech never starts (a chat error, an empty text)

const squash = (s) => s.replace(/\s+/g, " ").trim();

export class LatencyMeter extends EventTarget {
  /**
   * @param {import("./client.js").AvatarClient} client
   * @param {HTMLVideoElement} video
   */
  constructor(client, video) {
    super();
    this.video = video;
    /** @type {{t0: number, text: string, type: string, utterance: string|null} | null} */
    this.pending = null;
    /** @type {number[]} the frameMs (or eventMs) of every measure, oldest first */
    this.history = [];
    client.addEventListener("sent", (e) => this._sent(e.detail));
    client.addEventListener("message", (e) => this._message(e.detail));
    client.addEventListener("session", () => { this.pending = null; });
    /** @type {((now: number, meta: object) => void) | null} waiting for the next presented frame */
    this._onFrame = null;
    this._lastPaint = -Infinity; // performance.now() of the last presented frame
    this._watchFrames();
  }

  /** Follow every presented frame (cheap: a timestamp), so a stalled page can be told apart. */
  _watchFrames() {
    const v = this.video;
    if (!v || typeof v.requestVideoFrameCallback !== "function") return;
    const tick = (now, meta) => {
      const gap = now - this._lastPaint;
      this._lastPaint = now;
      if (this._onFrame) this._onFrame(now, meta, gap);
      v.requestVideoFrameCallback(tick);
    };
    v.requestVideoFrameCallback(tick);
  }

  /** The median of the measures so far, or null. */
  median() {
    if (!this.history.length) return null;
    const xs = [...this.history].sort((a, b) => a - b);
    const mid = xs.length >> 1;
    return xs.length % 2 ? xs[mid] : (xs[mid - 1] + xs[mid]) / 2;
  }

  _sent({ text, type, t }) {
    const p = { t0: t, text: squash(text), type, utterance: null };
    this.pending = p;
    setTimeout(() => { if (this.pending === p) this.pending = null; }, GIVE_UP_MS);
  }

  _message(ev) {
    const p = this.pending;
    if (!p) return;
    if (ev.event === "queued" && p.utterance === null) {
      // Echo: the utterance with our text (an earlier reply's next sentence may be queued meanwhile).
      if (p.type !== "echo" || ev.text == null || squash(ev.text) === p.text) p.utterance = ev.utterance;
    } else if (ev.event === "speaking_started" && ev.utterance === p.utterance) {
      this.pending = null;
      const tEvent = performance.now();
      const base = { text: p.text, type: p.type, utterance: ev.utterance, eventMs: tEvent - p.t0, serverMs: ev.latency_ms ?? null };
      this._firstFrameAfter(tEvent).then(({ shown, why }) => {
        const frameMs = shown === null ? null : Math.max(0, shown - p.t0);
        this.history.push(frameMs ?? base.eventMs);
        if (this.history.length > 50) this.history.shift();
        this.dispatchEvent(new CustomEvent("measure", { detail: { ...base, frameMs, why } }));
      });
    } else if (ev.event === "error" && ev.utterance && ev.utterance === p.utterance) {
      this.pending = null;
    }
  }

  /**
   * When the first frame received after `after` is displayed (performance.now() time), or
   * null with the reason it cannot be known.
   * @returns {Promise<{shown: number|null, why: string|null}>}
   */
  _firstFrameAfter(after) {
    const v = this.video;
    if (!v || typeof v.requestVideoFrameCallback !== "function") {
      return Promise.resolve({ shown: null, why: "this browser has no requestVideoFrameCallback" });
    }
    const stalled = { shown: null, why: "the page was not being painted (a background tab?)" };
    if (document.visibilityState === "hidden" || after - this._lastPaint > PAINT_STALL_MS) return Promise.resolve(stalled);
    return new Promise((resolve) => {
      const finish = (value) => {
        clearTimeout(timer);
        this._onFrame = null;
        resolve(value);
      };
      this._onFrame = (now, meta, gap) => {
        if (gap > PAINT_STALL_MS) return finish(stalled);
        if ((meta.receiveTime ?? now) >= after) finish({ shown: meta.expectedDisplayTime ?? now, why: null });
      };
      const timer = setTimeout(() => finish({ shown: null, why: "no frame was shown" }), FRAME_WAIT_MS);
    });
  }
}
