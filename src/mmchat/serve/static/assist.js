// Tools and the knowledge base on the web page. With "Tools" on (or a preset that has tools), the built-in tools
// (calendar, clock, calculator) are offered to the model; when it calls one, the call runs on the server
// (/api/tools/call), the call and its result are shown in the conversation, and the model answers from the
// result. A preset with a knowledge base (customer-service) sends "knowledge", and the passages the answer cites
// are listed under it.
"use strict";

const Assist = {
  specs: null,
  calls: [],

  preset() { return state.presets[$("preset").value] || {}; },

  async request(body) {
    this.calls = [];
    if (this.preset().knowledge) return {...body, knowledge: this.preset().knowledge};
    if (!$("use-tools").checked) return body;
    if (!this.specs) this.specs = await api("/api/tools");
    const last = body.messages.filter((m) => m.role === "user").pop();
    const {tool} = await api("/api/tools/route", {method: "POST", body: JSON.stringify({message: last ? last.content : ""})});
    // a clear match names the tool (a small model picks among tools poorly); otherwise the model chooses
    return {...body, tools: this.specs, parallel_tool_calls: false,
            tool_choice: tool ? {type: "function", function: {name: tool}} : "auto"};
  },

  delta(c, answer) {
    const d = c.delta || {};
    for (const t of d.tool_calls || []) {
      const call = this.calls[t.index] || (this.calls[t.index] = {id: "", type: "function", function: {name: "", arguments: ""}});
      if (t.id) call.id = t.id;
      if (t.function && t.function.name) call.function.name += t.function.name;
      if (t.function && t.function.arguments) call.function.arguments += t.function.arguments;
    }
    if (d.citations) answer.meta.sources = d.citations;
  },

  async finish(answer, request, signal, update) {
    if (answer.meta.finish_reason !== "tool_calls" || !this.calls.length) return;
    const calls = this.calls;
    this.calls = [];
    answer.meta.tools = [];
    const results = [];
    for (const call of calls) {
      const {result} = await api("/api/tools/call", {method: "POST", body: JSON.stringify(
        {name: call.function.name, arguments: call.function.arguments})});
      answer.meta.tools.push({name: call.function.name, arguments: call.function.arguments, result});
      results.push({role: "tool", tool_call_id: call.id, content: result});
      update();
    }
    // the answer from the results, streamed like any other
    const follow = {...request, tool_choice: "none",
                    messages: [...request.messages, {role: "assistant", content: null, tool_calls: calls}, ...results]};
    answer.meta.tokens = [];
    const r = await fetch("/v1/chat/completions", {method: "POST", headers: headers(), signal, body: JSON.stringify(follow)});
    if (!r.ok) throw new Error((await r.json()).error.message);
    await readStream(r, chunk => {
      for (const c of chunk.choices || []) addDelta(answer, c);
      update();
    });
  },

  decorate(div, m) {
    const meta = m.meta || {};
    for (const t of meta.tools || []) {
      const box = document.createElement("div");
      box.className = "tool";
      box.textContent = `🔧 ${t.name}(${t.arguments}) → ${t.result}`;
      div.insertBefore(box, div.querySelector(".content"));
    }
    if (meta.sources && meta.sources.length) {
      const list = document.createElement("div");
      list.className = "sources";
      list.textContent = "Sources: " + meta.sources.map((s) => `[${s.index}] ${s.source}`).join(" · ");
      for (const s of meta.sources) list.title = (list.title ? list.title + "\n\n" : "") + `[${s.index}] ${s.text}`;
      div.appendChild(list);
    }
  },
};

$("preset").addEventListener("change", () => { $("use-tools").checked = !!(Assist.preset().tools || []).length; });
