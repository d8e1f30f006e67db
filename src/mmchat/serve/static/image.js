// Images on the web page: "Image" attaches a picture to your next message. It is scaled down in the browser
// (the model reads 224x224 anyway), sent inline as an OpenAI image_url content part with a data URI, kept in the
// message's meta so the conversation can be saved and resumed, and shown as a thumbnail.
// Uses app.js's $ and setStatus; app.js calls Images.take() when sending and Images.decorate() when drawing.
"use strict";

const Images = (() => {
  const MAX_SIDE = 448;  // pixels; twice what the encoder sees, so the thumbnail stays sharp
  let pending = null;    // {url, name} of the attached image

  function scaled(file) {
    return new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => {
        const k = Math.min(1, MAX_SIDE / Math.max(img.width, img.height));
        const canvas = document.createElement("canvas");
        canvas.width = Math.max(1, Math.round(img.width * k));
        canvas.height = Math.max(1, Math.round(img.height * k));
        canvas.getContext("2d").drawImage(img, 0, 0, canvas.width, canvas.height);
        URL.revokeObjectURL(img.src);
        resolve(canvas.toDataURL("image/png"));
      };
      img.onerror = () => { URL.revokeObjectURL(img.src); reject(new Error(`${file.name} is not an image the browser can read`)); };
      img.src = URL.createObjectURL(file);
    });
  }

  function showPending() {
    const label = $("image-pending");
    label.hidden = !pending;
    label.textContent = pending ? `image: ${pending.name} ✕` : "";
  }

  async function attach(file) {
    try {
      pending = {url: await scaled(file), name: file.name};
      setStatus("");
    } catch (e) { pending = null; setStatus(`error: ${e.message}`); }
    showPending();
  }

  // the meta of the message being sent: {image: data URI} when one is attached (then cleared)
  function take() {
    const meta = pending ? {image: pending.url} : {};
    pending = null;
    showPending();
    return meta;
  }

  // the content to send for a stored message: content parts when it has an image
  function content(m) {
    if (!(m.meta && m.meta.image)) return m.content;
    return [{type: "image_url", image_url: {url: m.meta.image}}, {type: "text", text: m.content}];
  }

  function decorate(div, m) {
    if (!(m.meta && m.meta.image)) return;
    const img = document.createElement("img");
    img.className = "thumb";
    img.src = m.meta.image;
    img.alt = "attached image";
    div.querySelector(".content").prepend(img);
  }

  function init() {
    const input = document.createElement("input");
    input.type = "file";
    input.accept = "image/*";
    input.id = "image-file";
    input.hidden = true;
    input.onchange = () => { if (input.files[0]) attach(input.files[0]); input.value = ""; };
    const btn = document.createElement("button");
    btn.type = "button";
    btn.id = "attach-image";
    btn.textContent = "Image";
    btn.title = "attach an image to your next message";
    btn.onclick = () => input.click();
    const label = document.createElement("span");
    label.id = "image-pending";
    label.hidden = true;
    label.title = "remove the image";
    label.onclick = () => { pending = null; showPending(); };
    $("composer").append(input, btn, label);
  }

  init();
  return {take, content, decorate, attach};
})();
