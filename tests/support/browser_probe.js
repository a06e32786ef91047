async ({roi, pixelDiff, refFrames}) => {
  if (window.__bench) return window.__bench.info();
  const video = document.getElementById("video");
  const client = window.avatarClient;
  const B = { audio: [], frames: [], ring: [], ref: null };

  // ---- audio: RMS per ~10 ms at the time the AudioContext outputs it ----
  const ctx = new AudioContext({ latencyHint: "interactive" });
  await ctx.resume();
  const worklet = `
    class RmsTap extends AudioWorkletProcessor {
      constructor() { super(); this.n = 0; this.ss = 0; this.t = 0; this.win = Math.round(sampleRate / 100); }
      process(inputs) {
        const chans = inputs[0];
        if (this.n === 0) this.t = currentTime;
        const len = chans.length ? chans[0].length : 128;
        for (const ch of chans) for (let i = 0; i < ch.length; i++) this.ss += ch[i] * ch[i] / chans.length;
        this.n += len;
        if (this.n >= this.win) {
          this.port.postMessage([this.t, Math.sqrt(this.ss / this.n), this.n / sampleRate]);
          this.n = 0; this.ss = 0;
        }
        return true;
      }
    }
    registerProcessor("rms-tap", RmsTap);`;
  const url = URL.createObjectURL(new Blob([worklet], { type: "application/javascript" }));
  await ctx.audioWorklet.addModule(url);
  const source = new MediaStreamAudioSourceNode(ctx, { mediaStream: video.srcObject });
  const tap = new AudioWorkletNode(ctx, "rms-tap");
  // The tap must be pulled by the destination to run; a zero gain keeps it inaudible
  // (the <video> element plays the sound itself).
  source.connect(tap).connect(new GainNode(ctx, { gain: 0 })).connect(ctx.destination);
  tap.port.onmessage = (e) => {
    const [ct, rms, dur] = e.data;
    const ts = ctx.getOutputTimestamp();
    if (!ts.performanceTime) return; // the output has not started yet
    B.audio.push([ts.performanceTime + (ct - ts.contextTime) * 1000, rms, dur * 1000]);
  };

  // ---- video: every presented frame, with a mouth-change score ----
  const [x, y, w, h] = roi;
  const canvas = new OffscreenCanvas(w, h);
  const g = canvas.getContext("2d", { willReadFrequently: true });
  const lumaOf = () => {
    g.drawImage(video, x, y, w, h, 0, 0, w, h);
    const px = g.getImageData(0, 0, w, h).data;
    const out = new Float32Array(w * h);
    for (let i = 0; i < out.length; i++) out[i] = 0.299 * px[4 * i] + 0.587 * px[4 * i + 1] + 0.114 * px[4 * i + 2];
    return out;
  };
  const score = (luma, ref) => {
    let n = 0;
    for (let i = 0; i < luma.length; i++) if (Math.abs(luma[i] - ref[i]) > pixelDiff) n++;
    return n / luma.length;
  };
  const onFrame = (now, md) => {
    const luma = lumaOf();
    B.ring.push([now, luma]);
    while (B.ring.length && B.ring[0][0] < now - 1500) B.ring.shift();
    B.frames.push({
      now, shown: md.expectedDisplayTime, media: md.mediaTime, presented: md.presentedFrames,
      received: md.receiveTime ?? null, score: B.ref ? score(luma, B.ref) : null,
    });
    video.requestVideoFrameCallback(onFrame);
  };
  video.requestVideoFrameCallback(onFrame);

  // ---- Chrome's own A/V estimate: estimatedPlayoutTimestamp (sender NTP ms) per kind ----
  B.sync = [];
  setInterval(async () => {
    if (!client.pc) return;
    const e = { now: performance.now() };
    (await client.pc.getStats()).forEach((s) => {
      if (s.type === "inbound-rtp" && s.estimatedPlayoutTimestamp) e[s.kind] = s.estimatedPlayoutTimestamp;
    });
    if (e.audio && e.video) B.sync.push([e.now, e.audio, e.video]);
  }, 200);

  // ---- the <video> element's own audio path: when each packet leaves the jitter buffer ----
  // getSynchronizationSources(): timestamp = when the packet's audio was handed to the
  // playout mixer, audioLevel = the sender's level (RFC 6464, from aiortc's PCM).
  B.sources = [];
  const audioReceiver = client.pc.getReceivers().find((r) => r.track && r.track.kind === "audio");
  let lastRtp = null;
  setInterval(() => {
    const src = audioReceiver.getSynchronizationSources()[0];
    if (!src || src.rtpTimestamp === lastRtp) return;
    lastRtp = src.rtpTimestamp;
    B.sources.push([src.timestamp - performance.timeOrigin, src.audioLevel ?? 0, 20]);
  }, 4);

  // ---- helpers called from Python ----
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const meanOf = (lumas) => {
    const ref = new Float32Array(w * h);
    for (const l of lumas) for (let i = 0; i < ref.length; i++) ref[i] += l[i] / lumas.length;
    return ref;
  };
  // The reference is the newest idle frames: a mean over a longer stretch would blur
  // the idle motion into every comparison.
  B.setRef = (n = refFrames) => {
    const last = B.ring.slice(-n).map(([, l]) => l);
    B.ref = last.length ? meanOf(last) : null;
    return last.length;
  };
  // Idle noise: for each idle frame of the last `ms` (after the first n), the worst score
  // of the `horizon` frames after it against the reference ending there.
  B.calibrate = async (ms, horizon, n = refFrames) => {
    await sleep(ms);
    const now = performance.now();
    const idle = B.ring.filter(([t]) => t >= now - ms).map(([, l]) => l);
    const worst = [];
    for (let i = n; i < idle.length - 1; i++) {
      const ref = meanOf(idle.slice(i - n, i));
      worst.push(Math.max(...idle.slice(i, i + horizon).map((l) => score(l, ref))));
    }
    return { frames: idle.length, worst };
  };
  const post = async (path, body) => {
    const r = await fetch(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    return r.json();
  };
  B.say = async (text) => {
    const ref = B.setRef();
    const t0 = performance.now();
    const reply = await post("/human", { sessionid: client.sessionid, text, type: "echo" });
    return { t0, answered: performance.now(), ref, code: reply.code };
  };
  B.interrupt = async () => {
    const t0 = performance.now();
    const reply = await post("/interrupt_talk", { sessionid: client.sessionid });
    return { t0, answered: performance.now(), code: reply.code };
  };
  B.speaking = async () => (await post("/is_speaking", { sessionid: client.sessionid })).data === true;
  B.since = (t) => ({
    audio: B.audio.filter((a) => a[0] >= t), frames: B.frames.filter((f) => f.now >= t),
    sources: B.sources.filter((a) => a[0] >= t),
  });
  // Resolves once audio louder than `level` has played after t and then `quietMs` of quiet.
  B.waitPlayed = async (t, level, quietMs, timeoutMs) => {
    const end = performance.now() + timeoutMs;
    while (performance.now() < end) {
      const a = B.audio.filter((e) => e[0] >= t);
      const loud = a.filter((e) => e[1] > level);
      if (loud.length && (quietMs === null || performance.now() - loud[loud.length - 1][0] >= quietMs)) return true;
      await sleep(20);
    }
    return false;
  };
  B.stats = async () => {
    const out = [];
    (await client.pc.getStats()).forEach((s) => {
      if (s.type === "inbound-rtp" || s.type === "media-playout") out.push(Object.fromEntries(Object.entries(s)));
    });
    return out;
  };
  B.info = () => ({
    sampleRate: ctx.sampleRate, baseLatency: ctx.baseLatency, outputLatency: ctx.outputLatency,
    state: ctx.state, videoSize: [video.videoWidth, video.videoHeight], muted: video.muted,
  });
  window.__bench = B;
  return B.info();
}
