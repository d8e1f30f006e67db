"""Images into the language model, LLaVA-style: the frozen encoder's 7x7 grid (49 vectors of 1280 channels, and each
cell's mean colour: vision.features) ->
a two-layer MLP -> 49 vectors in the LM's embedding space, spliced into the prompt where a message has an image.

A message's content may be OpenAI content parts; images go in as
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}   (OpenAI's shape)
    {"type": "image", "image": <path, bytes, PIL image or numpy array>}          (Python convenience)
Each image becomes 49 placeholder tokens in the rendered chat, then, for a photo-like image on which the ImageNet
classifier is confident, a short line with its best guesses (what the small projector, trained on drawn scenes
only, cannot name itself: a cat, an espresso), then the text read in the image by OCR if any (with the optional
`ocr` extra: multimodal/ocr.py), then the message's text.

An adapter file (safetensors) holds the projector and, optionally, a low-rank update of the LM's attention
(stage 2 of the alignment) that is applied only to the rows of a batch that carry an image, so text-only chats
served by the same model are unchanged.
"""
from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import MMChatError
from . import vision

IMAGE_TOKENS = vision.GRID * vision.GRID  # 49
IMAGE_MARK = "\uE000"                      # a private-use character standing for one image while rendering
WEIGHTS_DIR = Path(__file__).with_name("weights")
# a conversation with images and no system prompt gets this short one (the model's default is 3x longer, and
# alignment trains with this one)
IMAGE_SYSTEM = "You can see images."
HINT_MIN_PROB = 0.25                       # show the classifier's guesses only when its best one is this likely


class Projector(nn.Module):
    """(B, 1283, 7, 7) feature grids -> (B, 49, d_model) embeddings: LayerNorm, Linear, GELU, Linear.
    d_in = 1280 reads the encoder's channels alone (adapters trained before the cell colours were added)."""

    def __init__(self, d_model: int, d_in: int = vision.FEATURES, hidden: int | None = None):
        super().__init__()
        hidden = hidden or d_model
        self.d_in = d_in
        self.norm = nn.LayerNorm(d_in)
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_model)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        x = grid.flatten(2).transpose(1, 2) if grid.dim() == 4 else grid  # (B, 49, 1283), row by row
        x = x[..., : self.d_in]  # the first 1280 channels for an adapter without the colours
        return self.fc2(F.gelu(self.fc1(self.norm(x))))  # (B, 49, d_model)


class RowLoRA(nn.Module):
    """base(x) + (x A^T) B^T on the batch rows that `rows_ref.rows` (B,) marks, nothing on the others.
    A (r, in) and B (out, r) carry every adapted slice of a fused projection, B already scaled by alpha / r."""

    def __init__(self, base: nn.Module, A: torch.Tensor, B: torch.Tensor, owner: nn.Module):
        super().__init__()
        self.base, self.A, self.B = base, A, B
        self._owner = [owner]  # the Transformer (a list, so it is not registered as a submodule)

    def forward(self, x):
        y = self.base(x)  # (B, T, out)
        rows = getattr(self._owner[0], "adapter_rows", None)  # (B,) bool, set by the engine; None: no image rows
        if rows is None or rows.size(0) != x.size(0):
            return y
        delta = (x @ self.A.to(x.dtype).t()) @ self.B.to(x.dtype).t()  # (B, T, out)
        return y + delta * rows.to(x.dtype)[:, None, None]


@dataclass
class Adapter:
    """The projector (and LoRA factors) that let one language model read images."""
    projector: Projector
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]   # "layers.N.attn.wqkv" -> (A, B)
    meta: dict
    path: Path | None = None

    def attach_lora(self, model: nn.Module):
        """Wrap the adapted projections of `model` (once) in RowLoRA."""
        if getattr(model, "_vision_lora", None) is self or not self.lora:
            return
        for name, (A, B) in self.lora.items():
            parent_name, child = name.rsplit(".", 1)
            parent = model.get_submodule(parent_name)
            base = getattr(parent, child)
            base = base.base if isinstance(base, RowLoRA) else base
            dev = next(model.parameters()).device
            setattr(parent, child, RowLoRA(base, A.to(dev), B.to(dev), model))
        model._vision_lora = self
        model.adapter_rows = None

    @torch.inference_mode()
    def embed_images(self, images: list, dtype=torch.float32, device="cpu") -> tuple[list[torch.Tensor], list[str]]:
        """Images -> one (49, d_model) embedding block each, and each one's classifier hint ("" if unsure)."""
        pictures = [vision.open_image(im) for im in images]
        grids, logits = vision.encode(pictures)  # (N, 1283, 7, 7), (N, 1000)
        p = next(self.projector.parameters())
        embeds = self.projector(grids.to(p.device, p.dtype)).to(device, dtype)  # (N, 49, d)
        hints = ["\n".join(h for h in (classifier_hint(top) if looks_like_photo(im) else "", text_in(im)) if h)
                 for im, top in zip(pictures, vision.top_labels(logits, k=3))]
        return list(embeds), hints

    def save(self, path: str | Path):
        from safetensors.torch import save_file
        tensors = {f"projector.{k}": v.detach().to(torch.float16).contiguous()
                   for k, v in self.projector.state_dict().items()}
        for name, (A, B) in self.lora.items():
            tensors[f"lora.{name}.A"] = A.detach().to(torch.float16).contiguous()
            tensors[f"lora.{name}.B"] = B.detach().to(torch.float16).contiguous()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        meta = {**self.meta, "d_in": self.projector.d_in}
        save_file(tensors, str(tmp), metadata={"mmchat": json.dumps(meta)})
        tmp.chmod(0o644)  # readable by everyone, as package data is
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "Adapter":
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {})["mmchat"])
                tensors = {k: f.get_tensor(k).float() for k in f.keys()}
        except (OSError, KeyError, ValueError, SafetensorError) as e:
            raise MMChatError(f"{path} is not an mmchat image adapter ({type(e).__name__})") from None
        proj = Projector(meta["d_model"], d_in=meta.get("d_in", vision.CHANNELS), hidden=meta.get("hidden"))
        proj.load_state_dict({k[len("projector."):]: v for k, v in tensors.items() if k.startswith("projector.")})
        lora = {}
        for k in tensors:
            if k.startswith("lora.") and k.endswith(".A"):
                name = k[len("lora."):-2]
                lora[name] = (tensors[k], tensors[f"lora.{name}.B"])
        return cls(proj.eval(), lora, meta, Path(path))

    def fits(self, cfg) -> bool:
        return all(self.meta.get(k) == getattr(cfg, k) for k in ("d_model", "n_layer", "vocab_size"))


def looks_like_photo(image, min_colours: int = 64) -> bool:
    """Whether an image has a photo's many colours. ImageNet's classes name things in photographs; on a flat
    drawing (the generated scenes have under 30 colours) the classifier's confident guesses are noise such as
    "pinwheel" or "military aircraft", so they are only handed to the model for photo-like images."""
    from PIL import Image
    colours = image.resize((64, 64), Image.Resampling.NEAREST).getcolors(maxcolors=min_colours)
    return colours is None  # None: more than min_colours distinct colours


_no_ocr_said = threading.Event()


def text_in(image) -> str:
    """The OCR line for an image ("" when it has no text). Without the `ocr` extra: "", and a one-line notice the
    first time."""
    from . import ocr
    if not ocr.available():
        if not _no_ocr_said.is_set():
            _no_ocr_said.set()
            logging.getLogger("mmchat.vision").warning(f"text in images is not read: {ocr.missing()}")
        return ""
    return ocr.text_hint(ocr.read_text(image))


def classifier_hint(top: list[tuple[str, float]]) -> str:
    if not top or top[0][1] < HINT_MIN_PROB:
        return ""
    names = ", ".join(f"{name} ({p:.0%})" for name, p in top if p >= 0.05)
    return f"(An image classifier sees: {names}.)"


def shipped_adapters() -> list[Path]:
    return sorted(WEIGHTS_DIR.glob("*.safetensors"))


def find_adapter(cfg, name: str = "") -> Adapter:
    """The shipped adapter that fits this model's shape, or a one-line error."""
    for path in shipped_adapters():
        adapter = Adapter.load(path)
        if adapter.fits(cfg):
            return adapter
    raise MMChatError(f"the model {name or ''} has no image projector, so it cannot read images; use the default "
                      "model (smollm2), whose projector ships with mmchat, or train one with `mmchat train vision`")


# -- messages -> token ids and image embeddings ---------------------------------------------------------------------
def has_images(messages) -> bool:
    return any(isinstance(m, dict) and isinstance(m.get("content"), list)
               and any(isinstance(p, dict) and p.get("type") in ("image_url", "image") for p in m["content"])
               for m in messages)


def image_source(part: dict):
    """One image content part -> something vision.open_image reads (only data: URIs for image_url)."""
    if part.get("type") == "image":
        return part.get("image")
    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str) or not url:
        raise MMChatError("an image_url content part needs image_url.url (a data:image/...;base64 URI)")
    if not url.startswith("data:"):
        raise MMChatError("image URLs are not fetched (mmchat makes no network requests); send the image inline "
                          "as a data URI: data:image/png;base64,...")
    return url


def flatten_messages(messages: list[dict]) -> tuple[list[dict], list]:
    """Messages with content parts -> messages with text content (each image as IMAGE_MARK on its own line),
    and the images in order."""
    out, images = [], []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            out.append(m)
            continue
        pieces = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                pieces.append(part.get("text") or "")
            elif kind in ("image_url", "image"):
                images.append(image_source(part))
                pieces.append(IMAGE_MARK)
            else:
                raise MMChatError(f"unsupported content part type {kind!r}; use text, image_url or image")
        out.append({**m, "content": "\n".join(pieces)})
    return out, images


def placeholder_id(tokenizer) -> int:
    """Any real token id will do for the image slots (their embeddings are replaced): the end-of-text token."""
    return tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else 0


def tokenize_with_images(text: str, tokenizer, hints: list[str]) -> tuple[list[int], list[int]]:
    """Rendered chat text with IMAGE_MARKs -> token ids with 49 placeholder ids per mark, and the start of each
    image's run. Each image's classifier hint (if any) follows it as text."""
    pieces = text.split(IMAGE_MARK)
    ids = tokenizer.encode(pieces[0], add_bos=False)
    starts = []
    for k, piece in enumerate(pieces[1:]):
        starts.append(len(ids))
        ids += [placeholder_id(tokenizer)] * IMAGE_TOKENS
        hint = hints[k] if k < len(hints) else ""
        ids += tokenizer.encode(("\n" + hint if hint else "") + piece, add_bos=False)
    return ids, starts


def splice(embeds: torch.Tensor, starts: list[int], blocks: list[torch.Tensor]) -> torch.Tensor:
    """Token embeddings (T, d) with each image's (49, d) block written at its start."""
    for s, b in zip(starts, blocks):
        embeds[s: s + b.size(0)] = b.to(embeds.dtype)
    return embeds


def with_images(messages: list[dict] | str, images: list) -> list[dict]:
    """`images=[...]` of the Python API -> image content parts at the start of the last user message."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    messages = [dict(m) for m in messages]
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if not users:
        raise MMChatError("images need a user message to go with")
    last = messages[users[-1]]
    content = last.get("content")
    parts = content if isinstance(content, list) else [{"type": "text", "text": content or ""}]
    last["content"] = [{"type": "image", "image": im} for im in images] + list(parts)
    return messages


_adapter_lock = threading.Lock()


def adapter_for(llm) -> Adapter:
    """The LLM's image adapter (llm.vision_adapter when set, else the shipped one that fits), its LoRA attached."""
    with _adapter_lock:
        adapter = getattr(llm, "vision_adapter", None)
        if adapter is None:
            adapter = find_adapter(llm.config, llm.name)
            llm.vision_adapter = adapter
        adapter.attach_lora(llm.model)
        return adapter


def chat_prompt(llm, messages: list[dict]) -> tuple[list[int], list | None]:
    """A conversation with content parts -> its prompt token ids and the (start, (49, d) embeddings) blocks of
    its images (None when it has none)."""
    flat, sources = flatten_messages(messages)
    if not sources:
        return llm.render_chat(flat), None
    adapter = adapter_for(llm)
    if not any(m.get("role") in ("system", "developer") for m in flat):
        flat = [{"role": "system", "content": IMAGE_SYSTEM}] + flat
    ref = llm.model.norm.weight  # the compute dtype and device (norms are never quantized)
    blocks, hints = adapter.embed_images(sources, dtype=ref.dtype, device=ref.device)
    text = llm.template.render(flat, add_generation_prompt=True)
    ids, starts = tokenize_with_images(text, llm.tokenizer, hints)
    return ids, list(zip(starts, blocks))
