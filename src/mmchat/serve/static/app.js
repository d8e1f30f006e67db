// The mmchat web chat page. It talks to the same OpenAI-compatible API as every other client
// (/v1/chat/completions, streamed), and keeps conversations on the server (/api/conversations, SQLite).
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  conv: {id: null, title: "", messages: []},  // messages: {role, content, meta: {tokens, finish_reason}}
  controller: null,                           // AbortController of the answer being streamed
  model: null,
  presets: {},
};

// -- server calls ----------------------------------------------------------------------------------------------
function headers() {
  const h = {"Content-Type": "application/json"};
  const key = localStorage.getItem("mmchat-api-key");
  if (key) h["Authorization"] = `Bearer ${key}`;
  return h;
}

async function api(path, options = {}) {
  const r = await fetch(path, {...options, headers: headers()});
  if (!r.ok) {
    let message = `${r.status} ${r.statusText}`;
    try { message = (await r.json()).error.message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return r.status === 204 ? null : r.json();
}

function setStatus(text) { $("status").textContent = text || ""; }

// -- settings ----------------------------------------------------------------------------------------------------
const SETTINGS = ["temperature", "top_p", "max_tokens", "seed"];

function sampling() {
  const out = {};
  for (const name of SETTINGS) {
    const v = $(name).value.trim();
    if (v !== "") out[name] = name === "max_tokens" || name === "seed" ? parseInt(v, 10) : parseFloat(v);
  }
  return out;
}

function applySettings(settings) {
  for (const name of SETTINGS) if (settings && name in settings) $(name).value = settings[name];
}

async function loadPresets() {
  try {
    const presets = await api("/api/presets");
    while ($("preset").options.length > 1) $("preset").remove(1);
    for (const p of presets) {
      state.presets[p.name] = p;
      const option = document.createElement("option");
      option.value = p.name;
      option.textContent = p.description ? `${p.name} — ${p.description}` : p.name;
      $("preset").appendChild(option);
    }
  } catch (e) { /* presets are optional */ }
}

$("preset").addEventListener("change", () => {
  const p = state.presets[$("preset").value];
  if (!p) return;
  $("system").value = p.system || "";
  applySettings(p.sampling || {});
});

// -- conversations list ----------------------------------------------------------------------------------------
async function refreshList() {
  const q = $("search").value.trim();
  let items = [];
  try { items = await api("/api/conversations" + (q ? `?q=${encodeURIComponent(q)}` : "")); }
  catch (e) { setStatus(e.message); return; }
  const ul = $("conversations");
  ul.textContent = "";
  for (const c of items) {
    const li = document.createElement("li");
    li.dataset.id = c.id;
    if (c.id === state.conv.id) li.classList.add("active");
    const title = document.createElement("span");
    title.className = "title";
    title.textContent = c.title || "(untitled)";
    title.title = c.updated;
    const del = document.createElement("button");
    del.textContent = "✕";
    del.title = "Delete";
    del.addEventListener("click", async (ev) => {
      ev.stopPropagation();
      await api(`/api/conversations/${c.id}`, {method: "DELETE"});
      if (state.conv.id === c.id) newChat();
      refreshList();
    });
    li.append(title, del);
    li.addEventListener("click", () => openConversation(c.id));
    ul.appendChild(li);
  }
}

async function openConversation(id) {
  if (state.controller) return;
  const c = await api(`/api/conversations/${id}`);
  const system = c.messages.find((m) => m.role === "system");
  state.conv = {id: c.id, title: c.title,
                messages: c.messages.filter((m) => m.role !== "system").map((m) => ({...m, meta: m.meta || {}}))};
  $("system").value = system ? system.content : "";
  $("preset").value = c.preset || "";
  applySettings(c.settings);
  render();
  refreshList();
}

function newChat() {
  if (state.controller) return;
  state.conv = {id: null, title: "", messages: []};
  render();
  refreshList();
  $("input").focus();
}

async function save() {
  const body = {
    messages: state.conv.messages.map((m) => ({role: m.role, content: m.content, meta: m.meta || {}})),
    system: $("system").value || null, preset: $("preset").value || null, settings: sampling(),
    model: state.model,
  };
  try {
    if (state.conv.id) await api(`/api/conversations/${state.conv.id}`, {method: "PUT", body: JSON.stringify(body)});
    else state.conv.id = (await api("/api/conversations", {method: "POST", body: JSON.stringify(body)})).id;
  } catch (e) { setStatus(`not saved: ${e.message}`); }
  refreshList();
}

// -- rendering ---------------------------------------------------------------------------------------------------
function tokenView(tokens) {
  // each token coloured by its probability (red: unlikely, green: likely); hovering shows the alternatives
  const frag = document.createDocumentFragment();
  for (const t of tokens) {
    const span = document.createElement("span");
    const p = Math.exp(t.logprob);
    span.className = "tok";
    span.textContent = t.token;
    span.style.background = `hsla(${Math.round(p * 120)}, 85%, 75%, 0.8)`;
    span.title = `${(p * 100).toFixed(1)}%\n` + (t.top_logprobs || [])
      .map((a) => `${JSON.stringify(a.token)}  ${(Math.exp(a.logprob) * 100).toFixed(1)}%`).join("\n");
    frag.appendChild(span);
  }
  return frag;
}

function button(label, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.className = "action-" + label.toLowerCase();
  b.addEventListener("click", onClick);
  return b;
}

function renderMessage(m, index) {
  const div = document.createElement("div");
  div.className = `msg ${m.role}`;
  div.dataset.index = index;
  const role = document.createElement("div");
  role.className = "role";
  role.textContent = m.role === "user" ? "You" : "Assistant";
  const content = document.createElement("div");
  content.className = "content";
  if (m.role === "assistant" && $("show-probs").checked && m.meta && m.meta.tokens) content.appendChild(tokenView(m.meta.tokens));
  else if (m.role === "assistant") content.innerHTML = Markdown.render(m.content);
  else content.textContent = m.content;
  const actions = document.createElement("div");
  actions.className = "actions";
  if (!state.controller) {
    actions.appendChild(button("Copy", () => navigator.clipboard && navigator.clipboard.writeText(m.content)));
    if (m.role === "user") actions.appendChild(button("Edit", () => editMessage(index)));
    if (m.role === "assistant" && index === state.conv.messages.length - 1) actions.appendChild(button("Regenerate", regenerate));
    if (m.role === "assistant" && m.content && typeof Speech !== "undefined") actions.appendChild(button("Speak", () => Speech.say(m.content)));
    if (m.role === "assistant" && m.content && typeof Attention !== "undefined") actions.appendChild(button("Attention", () => Attention.toggle(div, m.content)));
  }
  div.append(role, actions, content);
  if (typeof Assist !== "undefined") Assist.decorate(div, m);  // tool calls and cited passages
  if (typeof Images !== "undefined") Images.decorate(div, m);  // an attached image as a thumbnail
  if (m.meta && m.meta.finish_reason === "stopped") {
    const note = document.createElement("div");
    note.className = "note";
    note.textContent = "(stopped)";
    div.appendChild(note);
  }
  return div;
}

function render() {
  const box = $("messages");
  box.textContent = "";
  state.conv.messages.forEach((m, i) => box.appendChild(renderMessage(m, i)));
  box.scrollTop = box.scrollHeight;
  const busy = !!state.controller;
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

function updateLast() {
  const box = $("messages");
  const i = state.conv.messages.length - 1;
  const old = box.querySelector(`.msg[data-index="${i}"]`);
  const fresh = renderMessage(state.conv.messages[i], i);
  if (old) old.replaceWith(fresh); else box.appendChild(fresh);
  box.scrollTop = box.scrollHeight;
}

// -- talking to the model ----------------------------------------------------------------------------------------
async function generate() {
  const messages = [];
  if ($("system").value.trim()) messages.push({role: "system", content: $("system").value});
  for (const m of state.conv.messages) {
    messages.push({role: m.role, content: typeof Images !== "undefined" ? Images.content(m) : m.content});
  }
  const answer = {role: "assistant", content: "", meta: {tokens: []}};
  state.conv.messages.push(answer);
  state.controller = new AbortController();
  render();
  setStatus("thinking…");
  const started = performance.now();
  let usage = null;
  try {
    // tools and the knowledge base (assist.js) add to the request
    const request = await Assist.request({model: state.model, messages, stream: true,
                                          stream_options: {include_usage: true}, logprobs: true, top_logprobs: 5,
                                          ...sampling()});
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: state.controller.signal, body: JSON.stringify(request),
    });
    if (!r.ok) {
      let message = `${r.status}`;
      try { message = (await r.json()).error.message; } catch (e) { /* not JSON */ }
      throw new Error(message);
    }
    await readStream(r, chunk => {
      if (chunk.usage) usage = chunk.usage;
      for (const c of chunk.choices || []) {
        addDelta(answer, c);
        Assist.delta(c, answer);
      }
      updateLast();
    });
    await Assist.finish(answer, request, state.controller.signal, updateLast);  // run calls, answer from results
    const secs = (performance.now() - started) / 1000;
    setStatus(usage ? `${usage.completion_tokens} tokens in ${secs.toFixed(1)} s` : "");
  } catch (e) {
    if (e.name === "AbortError") { answer.meta.finish_reason = "stopped"; setStatus("stopped"); }
    else { setStatus(`error: ${e.message}`); if (!answer.content) state.conv.messages.pop(); }
  }
  state.controller = null;
  render();
  await save();
}

// The chunks of a streamed answer (server-sent events, "data: {...}" until "data: [DONE]"), one call each.
async function readStream(response, onChunk) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {done, value} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      if (event.startsWith("data: ") && event !== "data: [DONE]") onChunk(JSON.parse(event.slice(6)));
    }
  }
}

// One choice's delta added to the answer: its text, token probabilities and finish reason.
function addDelta(answer, c) {
  if (c.delta && c.delta.content) answer.content += c.delta.content;
  if (c.logprobs && c.logprobs.content) answer.meta.tokens.push(...c.logprobs.content);
  if (c.finish_reason) answer.meta.finish_reason = c.finish_reason;
}

async function send(text) {
  if (!text.trim() || state.controller) return;
  state.conv.messages.push({role: "user", content: text, meta: typeof Images !== "undefined" ? Images.take() : {}});
  await generate();
}

async function regenerate() {
  if (state.controller) return;
  const last = state.conv.messages[state.conv.messages.length - 1];
  if (last && last.role === "assistant") state.conv.messages.pop();
  await generate();
}

function editMessage(index) {
  const div = $("messages").querySelector(`.msg[data-index="${index}"]`);
  const area = document.createElement("textarea");
  area.className = "edit-box";
  area.value = state.conv.messages[index].content;
  area.rows = 3;
  const ok = button("Save & send", async () => {
    state.conv.messages = state.conv.messages.slice(0, index);  // what came after no longer follows from it
    await send(area.value);
  });
  const cancel = button("Cancel", render);
  div.querySelector(".content").replaceWith(area);
  div.querySelector(".actions").replaceChildren(ok, cancel);
  area.focus();
}

// -- wiring ------------------------------------------------------------------------------------------------------
$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("input").value;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("new-chat").addEventListener("click", newChat);
$("toggle-settings").addEventListener("click", () => { $("settings").hidden = !$("settings").hidden; });
$("show-probs").addEventListener("change", render);
$("api-key").value = localStorage.getItem("mmchat-api-key") || "";
$("api-key").addEventListener("change", () => { localStorage.setItem("mmchat-api-key", $("api-key").value); init(); });
let searchTimer = null;
$("search").addEventListener("input", () => { clearTimeout(searchTimer); searchTimer = setTimeout(refreshList, 200); });

async function init() {
  try {
    const models = await api("/v1/models");
    state.model = models.data[0].id;
    $("model-name").textContent = `mmchat · ${state.model}`;
    setStatus("");
  } catch (e) { setStatus(`${e.message} (set the API key in Settings)`); return; }
  await loadPresets();
  refreshList();
}

init();
render();
