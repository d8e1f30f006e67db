// A small Markdown renderer for chat answers: fenced code (with light highlighting), inline code, bold, italics,
// headings, lists, links and paragraphs. Everything is HTML-escaped first, so model output cannot inject markup.
"use strict";

const Markdown = (() => {
  const escape = (s) => s.replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));

  const KEYWORDS = new Set(("def class return if elif else for while in import from as with try except finally raise " +
    "lambda yield pass break continue and or not is None True False async await function const let var new this " +
    "typeof instanceof switch case default do throw catch static public private protected void int float double " +
    "char bool boolean struct enum fn impl pub use mod match mut self super package func go chan select defer " +
    "interface type extends implements null undefined true false echo then fi done esac SELECT FROM WHERE INSERT " +
    "UPDATE DELETE CREATE TABLE JOIN ON GROUP BY ORDER LIMIT").split(" "));

  // one pass over the code: comments, strings, numbers and keywords get a class, the rest stays as it is
  function highlight(code) {
    const re = /(#[^\n]*|\/\/[^\n]*|\/\*[\s\S]*?\*\/)|("(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*'|`(?:\\.|[^`\\])*`)|(\b\d+(?:\.\d+)?\b)|([A-Za-z_][A-Za-z0-9_]*)/g;
    let out = "", last = 0, m;
    while ((m = re.exec(code)) !== null) {
      out += escape(code.slice(last, m.index));
      const [text, com, str, num, word] = m;
      if (com) out += `<span class="hl-com">${escape(text)}</span>`;
      else if (str) out += `<span class="hl-str">${escape(text)}</span>`;
      else if (num) out += `<span class="hl-num">${escape(text)}</span>`;
      else if (word && KEYWORDS.has(word)) out += `<span class="hl-kw">${escape(text)}</span>`;
      else out += escape(text);
      last = m.index + text.length;
    }
    return out + escape(code.slice(last));
  }

  function inline(text) {
    let s = escape(text);
    s = s.replace(/`([^`]+)`/g, (_, c) => `<code>${c}</code>`);
    s = s.replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>");
    s = s.replace(/(^|[^*])\*([^*\s][^*]*)\*/g, "$1<em>$2</em>");
    s = s.replace(/\[([^\]]+)\]\((https?:\/\/[^)\s]+)\)/g, '<a href="$2" target="_blank" rel="noopener">$1</a>');
    return s;
  }

  function render(src) {
    const lines = src.split("\n");
    const out = [];
    let para = [], list = null;
    const flushPara = () => { if (para.length) { out.push(`<p>${inline(para.join("\n")).replace(/\n/g, "<br>")}</p>`); para = []; } };
    const flushList = () => { if (list) { out.push(`<${list.tag}>${list.items.map((i) => `<li>${inline(i)}</li>`).join("")}</${list.tag}>`); list = null; } };
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      const fence = line.match(/^\s*```\s*([\w+-]*)/);
      if (fence) {
        flushPara(); flushList();
        const code = [];
        for (i++; i < lines.length && !/^\s*```/.test(lines[i]); i++) code.push(lines[i]);
        const lang = fence[1] ? ` class="language-${escape(fence[1])}"` : "";
        out.push(`<pre><code${lang}>${highlight(code.join("\n"))}</code></pre>`);
        continue;
      }
      const heading = line.match(/^(#{1,6})\s+(.*)/);
      const bullet = line.match(/^\s*[-*+]\s+(.*)/);
      const numbered = line.match(/^\s*\d+[.)]\s+(.*)/);
      if (heading) { flushPara(); flushList(); const n = heading[1].length; out.push(`<h${n}>${inline(heading[2])}</h${n}>`); }
      else if (bullet || numbered) {
        flushPara();
        const tag = bullet ? "ul" : "ol";
        if (!list || list.tag !== tag) { flushList(); list = {tag, items: []}; }
        list.items.push((bullet || numbered)[1]);
      } else if (!line.trim()) { flushPara(); flushList(); }
      else { flushList(); para.push(line); }
    }
    flushPara(); flushList();
    return out.join("\n");
  }

  return {render, escape, highlight};
})();
