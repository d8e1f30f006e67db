// Speech on the web page. "Record" takes a spoken message from the microphone (MediaRecorder); "Audio file"
// takes one from a file. Either is transcribed by /v1/audio/transcriptions (Whisper tiny.en, on this server) and
// sent as your message, so you see what was heard. "Speak" on an answer plays it through /v1/audio/speech.
// Uses app.js's $, headers, setStatus and send.
"use strict";

const Speech = (() => {
  let recorder = null;  // the MediaRecorder while recording
  let playing = null;   // {audio, url} of the answer being spoken

  function authHeaders() {
    const h = headers();
    delete h["Content-Type"];  // FormData sets its own multipart boundary
    return h;
  }

  async function errorOf(r) {
    try { return (await r.json()).error.message; } catch (e) { return `${r.status} ${r.statusText}`; }
  }

  async function transcribe(blob, name) {
    const form = new FormData();
    form.append("file", blob, name);
    form.append("model", "whisper-tiny.en");
    const r = await fetch("/v1/audio/transcriptions", {method: "POST", headers: authHeaders(), body: form});
    if (!r.ok) throw new Error(await errorOf(r));
    return (await r.json()).text;
  }

  async function sendSpoken(blob, name) {
    setStatus("transcribing…");
    try {
      const text = await transcribe(blob, name);
      setStatus(text.trim() ? "" : "no speech was heard");
      if (text.trim()) await send(text);
    } catch (e) { setStatus(`error: ${e.message}`); }
  }

  async function toggleRecording(btn) {
    if (recorder) { recorder.stop(); return; }
    if (!navigator.mediaDevices || !window.MediaRecorder) {
      setStatus("this browser cannot record here (it needs https or localhost); use Audio file");
      return;
    }
    let stream;
    try { stream = await navigator.mediaDevices.getUserMedia({audio: true}); }
    catch (e) { setStatus(`no microphone: ${e.message}`); return; }
    const chunks = [];
    recorder = new MediaRecorder(stream);
    recorder.ondataavailable = (ev) => { if (ev.data.size) chunks.push(ev.data); };
    recorder.onstop = () => {
      stream.getTracks().forEach((t) => t.stop());
      const type = recorder.mimeType || "audio/webm";
      recorder = null;
      btn.textContent = "Record";
      btn.classList.remove("recording");
      sendSpoken(new Blob(chunks, {type}), type.includes("ogg") ? "recording.ogg" : "recording.webm");
    };
    recorder.start();
    btn.textContent = "Stop recording";
    btn.classList.add("recording");
    setStatus("recording… (press Stop recording to send)");
  }

  function speakable(text) {
    // Markdown to plain speech: no code blocks, link targets or emphasis marks
    return text.replace(/```[\s\S]*?(```|$)/g, " (code) ").replace(/!?\[([^\]]*)\]\([^)]*\)/g, "$1")
      .replace(/[*_`#>|]+/g, " ").replace(/\s+/g, " ").trim().slice(0, 4096);
  }

  function stop() {
    if (!playing) return;
    playing.audio.pause();
    URL.revokeObjectURL(playing.url);
    playing = null;
  }

  async function say(text) {
    stop();
    const input = speakable(text);
    if (!input) return;
    setStatus("speaking…");
    try {
      const r = await fetch("/v1/audio/speech", {
        method: "POST", headers: headers(),
        body: JSON.stringify({model: "tts-1", voice: "default", input, response_format: "wav"}),
      });
      if (!r.ok) throw new Error(await errorOf(r));
      const url = URL.createObjectURL(await r.blob());
      const audio = new Audio(url);
      playing = {audio, url};
      audio.onended = () => { if (playing && playing.audio === audio) stop(); setStatus(""); };
      await audio.play();
    } catch (e) { setStatus(`error: ${e.message}`); }
  }

  // the composer's buttons, before Send
  const record = document.createElement("button");
  record.type = "button";
  record.id = "record";
  record.textContent = "Record";
  record.title = "Record a spoken message";
  record.addEventListener("click", () => toggleRecording(record));
  const file = document.createElement("input");
  file.type = "file";
  file.id = "audio-file";
  file.accept = "audio/*,.wav,.mp3,.flac,.ogg,.opus,.webm,.m4a";
  file.hidden = true;
  file.addEventListener("change", () => {
    const f = file.files[0];
    file.value = "";
    if (f) sendSpoken(f, f.name);
  });
  const pick = document.createElement("button");
  pick.type = "button";
  pick.id = "pick-audio";
  pick.textContent = "Audio file";
  pick.title = "Send a spoken message from an audio file";
  pick.addEventListener("click", () => file.click());
  $("send").before(record, pick, file);

  const isPlaying = () => !!playing && !playing.audio.paused;
  return {say, stop, transcribe, isPlaying};
})();
