// The "Attention" button on an answer: asks the server for the attention of the model over the answer's text
// (POST /api/explain, one forward pass through the written-out attention) and shows it under the answer as a
// picture: one head with token labels, or every layer x head. A second click hides it again.
const Attention = (() => {
  async function fetchMap(text, view) {
    const headers = {"Content-Type": "application/json"};
    const key = localStorage.getItem("mmchat-api-key");
    if (key) headers.Authorization = `Bearer ${key}`;
    const r = await fetch("/api/explain", {method: "POST", headers, body: JSON.stringify({text, view, format: "png"})});
    if (!r.ok) {
      let message = r.statusText;
      try { message = (await r.json()).error.message; } catch (e) { /* not JSON */ }
      throw new Error(message);
    }
    return {url: URL.createObjectURL(await r.blob()), layer: r.headers.get("X-Layer"), head: r.headers.get("X-Head")};
  }

  async function show(panel, text, view) {
    panel.textContent = "computing attention…";
    try {
      const map = await fetchMap(text, view);
      panel.textContent = "";
      const caption = document.createElement("div");
      caption.className = "attention-caption";
      caption.textContent = view === "grid" ? "attention, every layer x head (rows: queries, columns: keys) "
        : `attention of layer ${map.layer}, head ${map.head} (rows: queries, columns: keys) `;
      const other = document.createElement("button");
      other.type = "button";
      other.className = "attention-switch";
      other.textContent = view === "grid" ? "one head" : "all layers x heads";
      other.addEventListener("click", () => show(panel, text, view === "grid" ? "head" : "grid"));
      caption.appendChild(other);
      const img = document.createElement("img");
      img.className = "attention-map";
      img.alt = caption.textContent;
      img.src = map.url;
      panel.append(caption, img);
    } catch (e) {
      panel.textContent = `attention unavailable: ${e.message}`;
    }
  }

  function toggle(messageDiv, text) {
    const old = messageDiv.querySelector(".attention");
    if (old) { old.remove(); return; }
    const panel = document.createElement("div");
    panel.className = "attention";
    messageDiv.appendChild(panel);
    show(panel, text, "head");
  }

  return {toggle};
})();
