// talkstream's page: one WebSocket session (protocol v1, docs/serve.md). Microphone PCM goes up at 16 kHz; video
// frames come down as JPEG with their 40 ms of audio and a timestamp. Audio is scheduled on the AudioContext's clock
// at pts + offset and each frame is drawn when that clock reaches its pts, so lips and sound stay together whatever
// rate the engine runs at (when frames come late, the clock is re-anchored instead of letting them pile up).
"use strict";
const $ = (id) => document.getElementById(id);
const LEAD = 0.25; // seconds of jitter buffer
const TOKEN = new URLSearchParams(location.search).get("token"); // a server started with --token
const Q = TOKEN ? `?token=${encodeURIComponent(TOKEN)}` : "";
const HEADER = 24; // "TSF1", u32 index, f64 pts, u32 jpeg bytes, u32 samples
const ts = (window.talkstream = {
  frames: 0, speechFrames: 0, drawn: [], transcripts: [], states: [], errors: [], notices: [], latency: null,
  ready: null, firstFrameMs: null, clears: 0,
  mouthBox: [0.36, 0.58, 0.28, 0.2], // where mouthLevel() looks, as fractions of the frame (x, y, w, h)
});
let ws = null, audio = null, mic = null, micNode = null, offset = null, info = null;
let image = "reference", voice = null, connectedAt = 0, latest = null, shown = null;
const queue = [], sources = new Set(), arrivals = [];
let decodeChain = Promise.resolve();
const canvas = $("video"), g = canvas.getContext("2d", { willReadFrequently: true });

function clock() { return audio ? audio.currentTime : performance.now() / 1000; }
function setStatus(t) { $("status").textContent = t; }

function addLine(role, text, partial) {
  const box = $("transcript");
  let last = box.lastElementChild;
  if (!(last && last.classList.contains(role) && last.classList.contains("partial"))) {
    last = document.createElement("div");
    box.appendChild(last);
  }
  last.className = `line ${role}` + (partial ? " partial" : "");
  last.textContent = text;
  box.scrollTop = box.scrollHeight;
}

function onMessage(msg) {
  switch (msg.type) {
    case "ready":
      ts.ready = msg;
      $("conn").textContent = `connected · ${msg.llm} · ${msg.voice || "audio model"} · ${msg.device}` +
        (msg.speed === "fast" ? " · fast path (one denoising step: softer lips, see docs/serve.md)" : "");
      for (const el of [$("stop"), $("typed-text"), document.querySelector("#typed button")]) el.disabled = false;
      canvas.width = canvas.height = msg.size;
      break;
    case "state":
      ts.states.push(msg.state);
      $("state").textContent = msg.state;
      $("state").className = `pill state-${msg.state}`;
      break;
    case "transcript":
      ts.transcripts.push(msg);
      addLine(msg.role, msg.text, !msg.final);
      break;
    case "latency": {
      ts.latency = msg;
      const f = (x) => (x == null ? "–" : `${x.toFixed(2)} s`);
      $("lat-reply").textContent = `${f(msg.reply_frame_s)} (first reply audio ${f(msg.reply_audio_s)})`;
      $("lat-stages").textContent =
        `VAD ${f(msg.vad_s)} · ASR ${f(msg.asr_s)} · LLM first token ${f(msg.llm_first_token_s)} · ` +
        `TTS ${f(msg.tts_first_audio_s)} · avatar ${f(msg.avatar_first_frame_s)}`;
      break;
    }
    case "clear":
      ts.clears++;
      for (const s of sources) { try { s.stop(); } catch (e) { /* already ended */ } }
      sources.clear();
      offset = null;
      break;
    case "error":
      ts.errors.push(msg);
      addLine("note", `error (${msg.code}): ${msg.message}`, false);
      break;
    case "notice":
      ts.notices.push(msg);
      setStatus(msg.message);
      break;
    case "busy":
      setStatus(msg.message);
      break;
  }
}

function onFrame(buf) {
  const dv = new DataView(buf);
  if (buf.byteLength < HEADER || dv.getUint32(0, true) !== 0x31465354) return; // "TSF1"
  const index = dv.getUint32(4, true), pts = dv.getFloat64(8, true);
  const nj = dv.getUint32(16, true), ns = dv.getUint32(20, true);
  const pcm = new Int16Array(buf.slice(HEADER + nj, HEADER + nj + 2 * ns));
  const now = clock();
  arrivals.push(performance.now());
  ts.frames++;
  if (ts.firstFrameMs === null) {
    ts.firstFrameMs = performance.now() - connectedAt;
    $("lat-first").textContent = `${(ts.firstFrameMs / 1000).toFixed(2)} s after connecting`;
  }
  if (offset === null || pts + offset < now + 0.02) offset = now + LEAD - pts; // late: re-anchor
  const at = pts + offset;
  let rms = 0;
  for (let i = 0; i < pcm.length; i++) rms += (pcm[i] / 32768) ** 2;
  rms = Math.sqrt(rms / Math.max(1, pcm.length));
  if (rms > 0.01) ts.speechFrames++;
  if (audio && ns) {
    const b = audio.createBuffer(1, ns, 16000);
    const ch = b.getChannelData(0);
    for (let i = 0; i < ns; i++) ch[i] = pcm[i] / 32768;
    const src = audio.createBufferSource();
    src.buffer = b;
    src.connect(audio.destination);
    src.onended = () => sources.delete(src);
    sources.add(src);
    src.start(Math.max(at, audio.currentTime));
  }
  if (nj) {
    const blob = new Blob([new Uint8Array(buf, HEADER, nj)], { type: "image/jpeg" });
    decodeChain = decodeChain.then(() => createImageBitmap(blob)).then((bmp) => queue.push({ at, bmp, index, pts, rms }));
  }
}

function mouthLevel() { // mean brightness inside mouthBox: a diagnostic that follows the lips (page tests read it)
  const w = canvas.width, h = canvas.height, [bx, by, bw, bh] = ts.mouthBox;
  const d = g.getImageData(Math.round(w * bx), Math.round(h * by), Math.round(w * bw), Math.round(h * bh)).data;
  let s = 0;
  for (let i = 0; i < d.length; i += 4) s += d[i] + d[i + 1] + d[i + 2];
  return s / (d.length * 0.75);
}

function draw() {
  const now = clock();
  while (queue.length && queue[0].at <= now) {
    if (latest) latest.bmp.close();
    latest = queue.shift();
  }
  if (latest && latest !== shown) {
    g.drawImage(latest.bmp, 0, 0, canvas.width, canvas.height);
    shown = latest;
    ts.drawn.push({ index: latest.index, pts: latest.pts, rms: latest.rms, mouth: mouthLevel(), t: performance.now() });
    if (ts.drawn.length > 2000) ts.drawn.splice(0, 1000);
  }
  const t = performance.now();
  while (arrivals.length && arrivals[0] < t - 10000) arrivals.shift(); // over 10 s: a slow engine sends in bursts
  const span = Math.min(10, (t - connectedAt) / 1000);
  $("lat-fps").textContent = `${(arrivals.length / Math.max(span, 1)).toFixed(1)} frames/s from the engine (real time: 25)`;
  requestAnimationFrame(draw);
}

function connect() {
  if (ws) ws.close();
  queue.length = 0;
  offset = null;
  const proto = location.protocol === "https:" ? "wss" : "ws";
  ws = new WebSocket(`${proto}://${location.host}/ws${Q}`);
  ws.binaryType = "arraybuffer";
  connectedAt = performance.now();
  ts.firstFrameMs = null;
  $("conn").textContent = "connecting…";
  ws.onopen = () => ws.send(JSON.stringify({ type: "hello", version: 1, sample_rate: 16000, image, voice }));
  ws.onmessage = (e) => (typeof e.data === "string" ? onMessage(JSON.parse(e.data)) : onFrame(e.data));
  ws.onclose = () => { $("conn").textContent = "disconnected"; };
}

async function ensureAudio() { // the avatar's voice plays once the page has been clicked (browsers' autoplay rule)
  if (!audio) {
    audio = new AudioContext({ sampleRate: 16000 });
    offset = null;
    await audio.audioWorklet.addModule("/static/mic-worklet.js");
  }
  await audio.resume();
}

async function startMic() {
  await ensureAudio();
  mic = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
  });
  micNode = new AudioWorkletNode(audio, "mic-capture");
  micNode.port.onmessage = (e) => {
    if (!ws || ws.readyState !== WebSocket.OPEN) return;
    const f = e.data, pcm = new Int16Array(f.length);
    for (let i = 0; i < f.length; i++) pcm[i] = Math.max(-32768, Math.min(32767, Math.round(f[i] * 32767)));
    ws.send(pcm.buffer);
  };
  audio.createMediaStreamSource(mic).connect(micNode);
  $("mic").textContent = "Stop microphone";
  $("mic").classList.add("on");
  setStatus("listening to your microphone");
}

function stopMic() {
  if (micNode) micNode.disconnect();
  if (mic) for (const t of mic.getTracks()) t.stop();
  mic = micNode = null;
  $("mic").textContent = "Start talking";
  $("mic").classList.remove("on");
}

async function init() {
  info = await (await fetch(`/api/info${Q}`)).json();
  voice = info.default_voice;
  const box = $("images");
  for (const name of info.images) {
    const img = document.createElement("img");
    img.src = `/api/images/${name}.png${Q}`;
    img.alt = img.title = name;
    img.className = name === image ? "chosen" : "";
    img.onclick = () => { image = name; for (const i of box.children) i.className = i === img ? "chosen" : ""; connect(); };
    box.appendChild(img);
  }
  for (const v of info.voices) {
    const o = document.createElement("option");
    o.value = o.textContent = v;
    o.selected = v === voice;
    $("voice").appendChild(o);
  }
  $("voice").disabled = !info.voices.length;
  $("voice").onchange = () => { voice = $("voice").value; connect(); };
  $("upload").onchange = async () => {
    const file = $("upload").files[0];
    if (!file) return;
    const r = await fetch(`/api/images${Q}`, { method: "POST", body: file });
    const j = await r.json();
    if (!r.ok) return setStatus(`upload refused: ${j.error}`);
    image = j.id;
    setStatus(j.warning || "");
    connect();
  };
  $("mic").onclick = () => (mic ? stopMic() : startMic().catch((e) => setStatus(`microphone: ${e.message}`)));
  $("stop").onclick = () => ws && ws.send(JSON.stringify({ type: "interrupt" }));
  $("typed").onsubmit = (e) => {
    e.preventDefault();
    ensureAudio().catch((err) => setStatus(`audio: ${err.message}`));
    const t = $("typed-text").value.trim();
    if (t && ws) ws.send(JSON.stringify({ type: "text", text: t }));
    $("typed-text").value = "";
  };
  connect();
  requestAnimationFrame(draw);
}
init();
