"""Weight-only quantization as module surgery after loading: model.py never changes.

Three schemes, all keeping activations, norms, attention and the KV cache in the compute dtype:
  int8: every block projection as int8 with one scale per output row (torch._weight_int8pack_mm
        dequantizes on the fly: half the bytes of bf16 to stream per token);
  int4: the block projections as int4 in groups of 32 along the input with a scale and a zero per group
        (torch._weight_int4pack_mm_for_cpu);
  gguf: a GGUF file's own Q4_0/Q4_1 blocks kept as they are: a Q4_1 block of 32 weights w = d * q + m with
        q in 0..15 is exactly int4 with scale d and zero m + 8d (the kernel computes (q - 8) * scale + zero);
        Q4_0 is w = d * (q - 8), zero 0. Other tensors (Q8_0, K-quants, floats) become int8 per row.
In every scheme the token table is int8 in groups of 32 (dequantized on lookup) and the output head grouped
int8 run as two int4 matmuls (Int8x2Linear; see plan).
Where mmchat's own kernels build (mmchat.kernels), the same blocks run on them instead: int4 as BlockQ4Linear
(GGUF's Q4 layout), everything else, the head included, as BlockQ8Linear (int8 in groups of 32).

A quantized model's state dict holds int8/uint8 tensors plus float scales; `restructure` rebuilds the same
modules on a model made on the meta device, so a saved state dict (the converted-weights cache) loads back with
`load_state_dict(assign=True)` from memory-mapped tensors.
"""
from __future__ import annotations

import functools
import os
import shutil
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels
from .errors import MMChatError

SCHEMES = ("int8", "int4", "gguf")
GROUP = 32  # int4 group size along the input dimension (GGUF's block size)
TILE = 8  # output rows per interleaved tile of BlockQ4Linear (csrc/qmatmul.c, q4_tile)
# From this many rows per matmul (a long prefill) float32 weights are dequantized for one GEMM: the weight-only
# kernels are built for a few rows; dequantizing costs a fixed ~0.2 s per forward here, so it pays only on long
# prompts (measured crossover ~190 rows: 50 rows 2x faster on the kernels, 512 rows 1.2x faster dequantized).
PREFILL_ROWS = 192
# In bf16, from this many rows (a prefill, a batch of 16 or more) a matmul runs on a bf16 copy of the weight made
# once and packed for oneDNN (`DenseCopy`) instead of the weight-only kernels, whose cost grows with every row.
# Measured here (1 thread, CPU time): a 512-token prefill 1.25x faster than dequantizing in every forward (the
# int4 kernel itself is 2.4x slower there). At 8 rows it is no faster in a real decode step: the bf16 weights,
# four times the int4 bytes, are streamed from memory each step. The copy costs 2 bytes per weight (~210 MB for
# SmolLM2-135M's blocks; the output head gets one only when 16+ rows need logits). 0 turns it off.
DENSE_ROWS = int(os.environ["MMCHAT_DENSE_ROWS"]) if os.environ.get("MMCHAT_DENSE_ROWS", "").isdigit() else 16


@functools.cache
def dense_ok() -> bool:
    """oneDNN's packed bf16 linear is there (torch's CPU builds have it) and this CPU runs it (AVX-512 or
    AVX-NE-CONVERT; on plain AVX2 oneDNN refuses to pack bf16 weights)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise") \
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def cpu_int4_ok(n_out: int, n_in: int, group: int = GROUP) -> bool:
    """The CPU int4 kernel wants the output size a multiple of 16 and the input a multiple of the group."""
    return n_out % 16 == 0 and n_in % group == 0


# -- modules ----------------------------------------------------------------------------------------------------
class DenseCopy:
    """For quantized linears: a bf16 copy of the weight, made on first use and packed once for oneDNN's GEMM
    (a plain bf16 weight is re-laid out by every call: 1.3-1.9x slower). Not a buffer: never saved."""
    _packed = None

    def use_dense(self, x2: torch.Tensor) -> bool:
        return 0 < DENSE_ROWS <= x2.size(0) and x2.dtype in (torch.bfloat16, torch.float32) \
            and x2.device.type == "cpu" and self.dense_weight_ok() and dense_ok()

    def dense_weight_ok(self) -> bool:
        return True

    def dense_weight(self) -> torch.Tensor:
        """The weight (N, K) as bf16, dequantized in float32 and rounded once."""
        return self.dequantize(torch.float32).to(torch.bfloat16)

    def dense_mm(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 (M, K) -> (M, N) in x2's dtype, computed in bf16."""
        if self._packed is None:
            with torch.no_grad():
                self._packed = torch.ops.mkldnn._reorder_linear_weight(self.dense_weight().contiguous(), 8)
        y = torch.ops.mkldnn._linear_pointwise(x2.to(torch.bfloat16), self._packed, None, "none", [], "")
        return y.to(x2.dtype)


class Int4KernelLinear(DenseCopy):
    """For linears run on torch's int4 kernel (`kernel_mm`): the packed bf16 copy for many rows where it is
    enabled, else a prefill dequantizes once for a float GEMM, else the kernel itself."""

    def forward(self, x):
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if self.use_dense(x2):
            y = self.dense_mm(x2)
        elif x2.size(0) >= PREFILL_ROWS and self.dense_weight_ok():  # prefill: dequantize once, then a GEMM
            y = F.linear(x2, self.dequantize(x.dtype))
        else:
            y = self.kernel_mm(x2).to(x.dtype)  # (M, N), computed in the scales' dtype (kernel_dtype_for)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def dense_weight_ok(self) -> bool:
        return unpack_int4_ok(self.out_features)


class Int8Linear(DenseCopy, nn.Module):
    """y = x W^T (+ b) with W stored as int8 (N, K) and one scale per output row (N,)."""

    def __init__(self, n_in: int, n_out: int, bias: bool, dtype, device=None):
        super().__init__()
        self.in_features, self.out_features = n_in, n_out
        self.register_buffer("weight", torch.empty(n_out, n_in, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(n_out, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(n_out, dtype=dtype, device=device)) if bias else None

    def forward(self, x):
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if self.use_dense(x2):
            y = self.dense_mm(x2) * self.scales  # int8 values are exact in bf16, scaled after
        elif x2.size(0) >= PREFILL_ROWS:  # many rows (prefill): a float GEMM beats the int8 kernel by far
            y = F.linear(x2, self.weight.to(x.dtype)) * self.scales
        else:
            y = torch._weight_int8pack_mm(x2.to(self.scales.dtype), self.weight, self.scales).to(x.dtype)  # (M, N)
        y = y.reshape(*x.shape[:-1], self.out_features)  # (..., N)
        return y if self.bias is None else y + self.bias

    def dense_weight(self) -> torch.Tensor:
        return self.weight.to(torch.bfloat16)  # (N, K) exact; the scales are applied after the GEMM


class Int4Linear(Int4KernelLinear, nn.Module):
    """y = x W^T (+ b) with W as int4 packed by the CPU kernel, (N, K/2) uint8, and per group of `group`
    inputs a scale and a zero, (K/group, N, 2): w = (q - 8) * scale + zero."""

    def __init__(self, n_in: int, n_out: int, bias: bool, dtype, device=None, group: int = GROUP):
        super().__init__()
        self.in_features, self.out_features, self.group = n_in, n_out, group
        self.register_buffer("weight", torch.empty(n_out, n_in // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales_and_zeros", torch.empty(n_in // group, n_out, 2, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(n_out, dtype=dtype, device=device)) if bias else None

    def kernel_mm(self, x2):
        sz = self.scales_and_zeros
        return torch._weight_int4pack_mm_for_cpu(x2.to(sz.dtype), self.weight, self.group, sz)  # (M, N)

    def dequantize(self, dtype) -> torch.Tensor:
        """The float weight (N, K)."""
        N, K, g = self.out_features, self.in_features, self.group
        q = unpack_int4(self.weight, N, K).to(dtype).view(N, K // g, g)  # (N, G, g)
        sz = self.scales_and_zeros.to(dtype)  # (G, N, 2)
        scale, zero = sz[..., 0].t()[..., None], sz[..., 1].t()[..., None]  # (N, G, 1) each
        return ((q - 8) * scale + zero).view(N, K)


class Int8Embedding(nn.Module):
    """A token table stored as int8 (V, d) with a scale per group of 32 values of a row (V, d/32); the rows
    looked up are dequantized."""

    def __init__(self, vocab: int, dim: int, dtype, device=None, group: int = GROUP):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.group = vocab, dim, group
        self.register_buffer("weight", torch.empty(vocab, dim, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(vocab, dim // group, dtype=dtype, device=device))

    def forward(self, tokens):
        q = F.embedding(tokens, self.weight).to(self.scales.dtype)  # (B, T, d)
        scale = F.embedding(tokens, self.scales)  # (B, T, d/group)
        return (q.unflatten(-1, (-1, self.group)) * scale[..., None]).flatten(-2)  # (B, T, d)


class Int8x2Linear(Int4KernelLinear, nn.Module):
    """int8 weights with a scale per group of 32 inputs, run as two int4 matmuls: with u = q + 128 =
    16 h + l (h, l in 0..15), w = s q = 16 s h + s l - 128 s, and the int4 kernel's (h - 8) * 16s + 0 plus
    (l - 8) * s + 8s is exactly that. On a tall matrix (the output head) this is int8 precision at about
    twice int4's cost, several times faster than torch's int8 kernel, and GGUF's Q8_0 blocks fit it as
    they are."""

    def __init__(self, n_in: int, n_out: int, bias: bool, dtype, device=None, group: int = GROUP):
        super().__init__()
        self.in_features, self.out_features, self.group = n_in, n_out, group
        for plane in ("hi", "lo"):
            self.register_buffer(plane, torch.empty(n_out, n_in // 2, dtype=torch.uint8, device=device))
            self.register_buffer(f"{plane}_sz", torch.empty(n_in // group, n_out, 2, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(n_out, dtype=dtype, device=device)) if bias else None

    def kernel_mm(self, x2):
        x2 = x2.to(self.lo_sz.dtype)
        return torch._weight_int4pack_mm_for_cpu(x2, self.hi, self.group, self.hi_sz) + \
            torch._weight_int4pack_mm_for_cpu(x2, self.lo, self.group, self.lo_sz)  # (M, N)

    def dequantize(self, dtype) -> torch.Tensor:
        N, K, g = self.out_features, self.in_features, self.group
        u = unpack_int4(self.hi, N, K).to(dtype) * 16 + unpack_int4(self.lo, N, K).to(dtype)  # (N, K) exact
        scale = self.lo_sz[..., 0].t().to(dtype)[..., None]  # (N, G, 1)
        return ((u - 128).view(N, K // g, g) * scale).view(N, K)


class BlockQ4Linear(DenseCopy, nn.Module):
    """y = x W^T (+ b) with W in 4-bit blocks of 32 inputs run on mmchat's own kernel (mmchat.kernels): per
    block a scale d and a minimum m, w = d * q + m with q in 0..15 (GGUF's Q4_1 blocks exactly; Q4_0 is
    m = -8 d). W's rows are stored in tiles of 8 interleaved for the kernel (csrc/qmatmul.c, q4_tile):
    q4 (N/8, K/32, 128) uint8, d and m (N/8, K/32, 8) float16 (GGUF's own precision: decode streams every
    byte once per token, and these are a sixth fewer than with float32 scales); `pack_q4_tiles` makes it."""

    def __init__(self, n_in: int, n_out: int, bias: bool, dtype, device=None):
        super().__init__()
        self.in_features, self.out_features = n_in, n_out
        tiles, G = n_out // TILE, n_in // GROUP
        self.register_buffer("q4", torch.empty(tiles, G, TILE * GROUP // 2, dtype=torch.uint8, device=device))
        self.register_buffer("d", torch.empty(tiles, G, TILE, dtype=torch.float16, device=device))
        self.register_buffer("m", torch.empty(tiles, G, TILE, dtype=torch.float16, device=device))
        self.bias = nn.Parameter(torch.empty(n_out, dtype=dtype, device=device)) if bias else None

    def forward(self, x):
        return _block_forward(self, x, lambda x2: kernels.q4_matmul(x2, self.q4, self.d, self.m))

    def dequantize(self, dtype) -> torch.Tensor:
        """The float weight (N, K)."""
        N, K = self.out_features, self.in_features
        p = self.q4.view(N // TILE, K // GROUP, 4, 1, TILE, 4)  # (tiles, G, chunk, 1, row, input)
        q = torch.cat([p & 0x0F, p >> 4], dim=3)  # (tiles, G, chunk, nibble, row, input): input 8 chunk + 4 nibble
        q = q.permute(0, 4, 1, 2, 3, 5).reshape(N, K // GROUP, GROUP).float()  # (N, G, 32)
        d, m = (t.float().permute(0, 2, 1).reshape(N, K // GROUP, 1) for t in (self.d, self.m))  # (N, G, 1)
        return (q * d + m).view(N, K).to(dtype)


def pack_q4_tiles(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q (N, K) 0..15, d and m (N, K/32) -> BlockQ4Linear's layout: q4 (N/8, K/32, 128) uint8, d and m
    (N/8, K/32, 8) float16. In a tile's block, chunk c's byte 4i + t holds row i's input 8c + t in its low nibble
    and input 8c + 4 + t in its high one."""
    N, K = q.shape
    q = q.to(torch.uint8).view(N // TILE, TILE, K // GROUP, 4, 2, 4)  # (tiles, row, G, chunk, nibble, input)
    packed = q[:, :, :, :, 0] | q[:, :, :, :, 1] << 4  # (tiles, row, G, chunk, input)
    q4 = packed.permute(0, 2, 3, 1, 4).reshape(N // TILE, K // GROUP, TILE * GROUP // 2)
    d, m = (t.half().view(N // TILE, TILE, K // GROUP).permute(0, 2, 1) for t in (d, m))  # (tiles, G, 8) each
    return q4.contiguous(), d.contiguous(), m.contiguous()


class BlockQ8Linear(DenseCopy, nn.Module):
    """y = x W^T (+ b) with W in 8-bit blocks of 32 inputs (GGUF's Q8_0) run on mmchat's own kernel:
    q8 (N, K) int8 and a scale per block d (N, K/32) float32: w = d * q."""

    def __init__(self, n_in: int, n_out: int, bias: bool, dtype, device=None):
        super().__init__()
        self.in_features, self.out_features = n_in, n_out
        self.register_buffer("q8", torch.empty(n_out, n_in, dtype=torch.int8, device=device))
        self.register_buffer("d", torch.empty(n_out, n_in // GROUP, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(n_out, dtype=dtype, device=device)) if bias else None

    def forward(self, x):
        return _block_forward(self, x, lambda x2: kernels.q8_matmul(x2, self.q8, self.d))

    def dequantize(self, dtype) -> torch.Tensor:
        N, K = self.out_features, self.in_features
        return (self.q8.view(N, K // GROUP, GROUP).float() * self.d[..., None]).view(N, K).to(dtype)


def _block_forward(mod, x, kernel_mm):
    """Many rows on the packed bf16 copy where the CPU has bf16 GEMMs (DenseCopy), else every row count on the
    kernel (float32 in and out). Dequantizing for a float32 GEMM instead did not pay on an AVX2-only Zen 3
    (one thread, CPU time): the kernel was 1.5-3x faster from 8 to 50 rows, 1.15x at 200, level at 512."""
    x2 = x.reshape(-1, mod.in_features)  # (M, K)
    if mod.use_dense(x2):
        y = mod.dense_mm(x2)
    else:
        y = kernel_mm(x2.float()).to(x.dtype)  # (M, N)
    y = y.reshape(*x.shape[:-1], mod.out_features)
    return y if mod.bias is None else y + mod.bias


LINEARS = {"int8": Int8Linear, "int4": Int4Linear, "int8x2": Int8x2Linear, "q4": BlockQ4Linear, "q8": BlockQ8Linear}


# -- quantizing float weights -----------------------------------------------------------------------------------
def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: w (N, K) float -> q (N, K) int8, scale (N,) float32 with w ~ q * scale.
    Each row's range is clipped to the fraction of its largest |w| that gives the smallest squared error:
    one outlier otherwise coarsens the whole row."""
    w = w.float()
    peak = w.abs().amax(dim=1).clamp(min=1e-12)  # (N,)
    best_err, best_scale = None, None
    for frac in (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7):
        scale = peak * frac / 127  # (N,)
        err = ((w / scale[:, None]).round().clamp(-127, 127) * scale[:, None] - w).pow(2).sum(1)  # (N,)
        if best_err is None:
            best_err, best_scale = err, scale
        else:
            better = err < best_err
            best_err, best_scale = torch.where(better, err, best_err), torch.where(better, scale, best_scale)
    q = (w / best_scale[:, None]).round().clamp(-127, 127).to(torch.int8)  # (N, K)
    return q, best_scale


def int8_groups(w: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per group of `group` inputs: w (N, K) -> q (N, K) int8, scale (N, K/group) float32.
    On weights that were GGUF Q8_0 blocks this gives back the blocks' own values."""
    N, K = w.shape
    wg = w.float().reshape(N, K // group, group)  # (N, G, group)
    scale = wg.abs().amax(-1).clamp(min=1e-12) / 127  # (N, G)
    q = (wg / scale[..., None]).round().clamp(-127, 127).to(torch.int8).reshape(N, K)
    return q, scale


def pack_int8x2(q: torch.Tensor, scale: torch.Tensor, dtype) -> tuple[torch.Tensor, ...]:
    """q (N, K) int8 and scale (N, G) -> the two int4 planes and their scales_and_zeros (see Int8x2Linear)."""
    u = q.to(torch.int32) + 128  # (N, K) in 1..255
    hi = torch._convert_weight_to_int4pack_for_cpu((u >> 4).contiguous(), 1)  # (N, K/2)
    lo = torch._convert_weight_to_int4pack_for_cpu((u & 15).contiguous(), 1)
    s = scale.t()  # (G, N)
    hi_sz = torch.stack([16 * s, torch.zeros_like(s)], dim=-1).contiguous()  # (G, N, 2)
    lo_sz = torch.stack([s, 8 * s], dim=-1).contiguous()
    return hi, lo, hi_sz.to(dtype), lo_sz.to(dtype)


def int4_groups(w: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of `group` inputs: w (N, K) -> q (N, K) in 0..15, scale and min (N, K/group),
    with w ~ q * scale + min."""
    N, K = w.shape
    wg = w.float().reshape(N, K // group, group)  # (N, G, group)
    lo, hi = wg.amin(-1), wg.amax(-1)  # (N, G)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = ((wg - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8).reshape(N, K)
    return q, scale, lo


def pack_int4(q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """q (N, K) in 0..15, scale and min (N, G) -> the kernel's packed weight (N, K/2) uint8 and its
    scales_and_zeros (G, N, 2) in `dtype`. w = q * s + m = (q - 8) * s + (m + 8 s)."""
    packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)  # (N, K/2)
    sz = torch.stack([scale, lo + 8 * scale], dim=-1).transpose(0, 1).contiguous()  # (G, N, 2)
    return packed, sz.to(dtype)


def unpack_int4(packed: torch.Tensor, n_out: int, n_in: int) -> torch.Tensor:
    """The CPU kernel's packed layout back to q (N, K) uint8: rows in blocks of `int4_block_rows()` (64 where
    torch was built for AVX-512, 32 for AVX2), and for each block and input k, block/2 bytes whose low nibbles
    are the block's first half of rows and high nibbles its second half. Where the layout is none of these, or
    N is not a multiple of the block, the kernel does every matmul (`Int4KernelLinear.dense_weight_ok`)."""
    b = int4_block_rows()
    p = packed.view(n_out // b, n_in, b // 2)  # (N/b, K, b/2)
    q = torch.cat([p & 0x0F, p >> 4], dim=-1)  # (N/b, K, b)
    return q.transpose(1, 2).reshape(n_out, n_in)  # (N, K)


@functools.cache
def int4_block_rows() -> int:
    """How many rows the running torch packs together for the int4 kernel (it depends on the CPU's vector
    width), checked by packing a known matrix; 0 when no known layout matches."""
    q = torch.randint(0, 16, (192, 128), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    try:
        packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    except RuntimeError:
        return 0
    for b in (64, 32):
        p = packed.view(192 // b, 128, b // 2)
        if torch.equal(torch.cat([p & 0x0F, p >> 4], dim=-1).transpose(1, 2).reshape(192, 128).int(), q):
            return b
    return 0


def unpack_int4_ok(n_out: int = 64) -> bool:
    b = int4_block_rows()
    return b > 0 and n_out % b == 0


# -- GGUF blocks kept -------------------------------------------------------------------------------------------
def q4_blocks(data: np.ndarray, kind: str, shape: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Raw GGUF Q4_0/Q4_1 rows (N, bytes) -> q (N, K) in 0..15, scale and min (N, K/32) float32.
    Q4_1 block: d f16, m f16, 16 bytes; Q4_0 block: d f16, 16 bytes. Byte j holds element j in its low
    nibble and element j + 16 in its high nibble."""
    N, K = shape
    head = 4 if kind == "Q4_1" else 2
    blocks = np.ascontiguousarray(data).reshape(N, K // 32, head + 16)  # (N, G, bytes)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # (N, G)
    if kind == "Q4_1":
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    else:
        m = -8 * d  # w = d * (q - 8) = d * q - 8 d
    qs = blocks[..., head:]  # (N, G, 16)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(N, K)  # (N, K)
    return torch.from_numpy(q), torch.from_numpy(d), torch.from_numpy(m)


def read_gguf_int4(path: str, cfg) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Our fused weight name -> (q, scale, min) for every projection whose GGUF parts are all Q4_0/Q4_1,
    with llama.cpp's Q/K row order undone and Q/K/V, gate/up concatenated like the float loader does."""
    from .formats import gguf as fmt
    from .formats.names import to_ours
    reader = fmt.open_gguf(path)
    arch = fmt.field(reader, "general.architecture")
    _, _, permuted = fmt.GGUF_ARCHS[arch]
    parts: dict[str, dict[int, tuple | None]] = {}
    for t in reader.tensors:
        mapped = to_ours(t.name, "gguf")
        if mapped is None or not mapped[0].endswith(".weight") or len(t.shape) != 2:
            continue
        ours, part = mapped
        kind = t.tensor_type.name
        if kind not in ("Q4_0", "Q4_1"):
            parts.setdefault(ours, {})[part] = None
            continue
        K, N = (int(x) for x in t.shape)  # GGUF lists the fastest dimension first
        q, d, m = q4_blocks(t.data, kind, (N, K))
        for heads, suffix in ((cfg.n_head, "attn_q.weight"), (cfg.n_kv_head, "attn_k.weight")):
            if permuted and t.name.endswith(suffix):
                q, d, m = (fmt.unpermute_rope_rows(x, heads) for x in (q, d, m))
        parts.setdefault(ours, {})[part] = (q, d, m)
    out = {}
    for name, p in parts.items():
        if any(v is None for v in p.values()):
            continue
        ordered = [p[i] for i in sorted(p)]
        out[name] = tuple(torch.cat([o[j] for o in ordered], dim=0) for j in range(3))
    return out


# -- surgery ----------------------------------------------------------------------------------------------------
def _linears(model) -> list[tuple[nn.Module, str, str]]:
    """(parent module, attribute, state-dict name) of every projection inside the blocks."""
    found = []
    for i, layer in enumerate(model.layers):
        for parent, pname in ((layer.attn, "attn"), (layer.mlp, "mlp")):
            for attr, child in parent.named_children():
                if isinstance(child, (nn.Linear, *LINEARS.values())):
                    found.append((parent, attr, f"layers.{i}.{pname}.{attr}"))
    return found


def plan(model, scheme: str, int4_names: set[str] | None = None) -> dict[str, str]:
    """State-dict prefix -> the kind of quantized module (a key of LINEARS) for each projection and the output
    head. With mmchat's own kernels (mmchat.kernels): "q4" blocks for int4 and "q8" blocks for everything else,
    the head included. Without them, torch's kernels: "int4", per-row "int8", and the head as "int8x2"."""
    if scheme not in SCHEMES:
        raise MMChatError(f"unknown quantization '{scheme}'; choose one of {', '.join(SCHEMES)} or none")
    own = kernels.available()
    kinds = {}
    for parent, attr, name in _linears(model):
        mod = getattr(parent, attr)
        n_out, n_in = mod.out_features, mod.in_features
        want4 = scheme == "int4" or (scheme == "gguf" and f"{name}.weight" in (int4_names or set()))
        if own and n_in % GROUP == 0:
            kinds[name] = "q4" if want4 and n_out % TILE == 0 else "q8"
        else:
            kinds[name] = "int4" if want4 and cpu_int4_ok(n_out, n_in) else "int8"
    kinds["tok_embeddings"] = "int8"
    # The output head (vocab x d, the largest matrix) in int8 blocks: int4 costs ~8% perplexity there. On
    # torch's kernels it runs as two int4 matmuls: on its tall shape torch's int8 kernel is ~6x slower.
    cfg = model.cfg
    if own and cfg.d_model % GROUP == 0:
        kinds["lm_head"] = "q8"
    else:
        kinds["lm_head"] = "int8x2" if cpu_int4_ok(cfg.vocab_size, cfg.d_model) else "int8"
    return kinds


def restructure(model, kinds: dict[str, str], dtype, device=None):
    """Swap the float modules for empty quantized ones of the kinds in `kinds` (on the meta device when the
    tensors come later from a state dict)."""
    for parent, attr, name in _linears(model):
        mod = getattr(parent, attr)
        cls = LINEARS[kinds.get(name, "int8")]
        setattr(parent, attr, cls(mod.in_features, mod.out_features, mod.bias is not None, dtype, device))
    emb = model.tok_embeddings
    model.tok_embeddings = Int8Embedding(emb.num_embeddings, emb.embedding_dim, dtype, device)
    d, vocab = model.cfg.d_model, model.cfg.vocab_size
    model.lm_head = LINEARS[kinds.get("lm_head", "int8")](d, vocab, False, dtype, device)
    return model


def kinds_of(model) -> dict[str, str]:
    """The plan a quantized model was built with (what `restructure` needs to rebuild it)."""
    names = {cls: kind for kind, cls in LINEARS.items()} | {Int8Embedding: "int8"}
    return {name: names[type(mod)] for name, mod in model.named_modules() if type(mod) in names}


def state_dict_to_save(model) -> dict[str, torch.Tensor]:
    """The model's tensors, each contiguous; a float head tied to the token table is left out (the loader
    ties it again)."""
    sd = model.state_dict()
    head = sd.get("lm_head.weight")
    if head is not None and head.data_ptr() == sd["tok_embeddings.weight"].data_ptr():
        del sd["lm_head.weight"]
    return {k: v.contiguous() for k, v in sd.items()}


@torch.no_grad()
def quantize(model, scheme: str, gguf_path: str | None = None):
    """Quantize a float model in place (weights already in the compute dtype) and return it."""
    int4_blocks = read_gguf_int4(gguf_path, model.cfg) if scheme == "gguf" and gguf_path else {}
    kinds = plan(model, scheme, set(int4_blocks))
    dtype, device = model.norm.weight.dtype, model.norm.weight.device
    kernel_dtype = kernel_dtype_for(dtype)
    if device.type != "cpu":
        raise MMChatError("weight-only int8/int4 kernels run on the CPU only; on a GPU use bf16 weights")
    old = {name: getattr(parent, attr) for parent, attr, name in _linears(model)}
    table = model.tok_embeddings.weight  # (V, d)
    head = table if model.cfg.tie_embeddings else model.lm_head.weight  # (V, d)
    restructure(model, kinds, dtype, device)
    for parent, attr, name in _linears(model):
        src, dst = old[name], getattr(parent, attr)
        key = f"{name}.weight"
        fill(dst, src.weight, int4_blocks.get(key), kernel_dtype)
        if src.bias is not None:
            dst.bias = nn.Parameter(src.bias.detach().to(dtype), requires_grad=False)
    q, s = int8_groups(table)
    model.tok_embeddings.weight, model.tok_embeddings.scales = q, s.to(dtype)
    fill(model.lm_head, head, None, kernel_dtype)
    return model


def kernel_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """What the weight-only kernels compute in (their scales' dtype) for a model running in `dtype`: bf16 for
    a float32 model. torch's int4/int8 CPU kernels are vectorized for bf16 input on every x86 CPU, but not for
    float32: on an AVX2-only Zen 3 a (1, 576) x (576, 1536) matmul took 0.14 ms in bf16 against 2.0 ms in
    float32 on the int4 kernel, 0.085 against 1.0 ms on the int8 one. So a float32 model (a CPU without bf16
    instructions) keeps its norms, attention and residual stream in float32 and casts only the kernels' input."""
    return torch.bfloat16 if dtype == torch.float32 else dtype


def fill(dst: nn.Module, w: torch.Tensor, blocks: tuple | None, dtype):
    """Quantize float weight w (N, K) into an empty quantized linear (int4 from GGUF blocks if given)."""
    if isinstance(dst, BlockQ4Linear):
        dst.q4, dst.d, dst.m = pack_q4_tiles(*(blocks if blocks is not None else int4_groups(w)))
    elif isinstance(dst, BlockQ8Linear):
        q, s = int8_groups(w)
        dst.q8, dst.d = q.contiguous(), s.float().contiguous()
    elif isinstance(dst, Int8x2Linear):
        dst.hi, dst.lo, dst.hi_sz, dst.lo_sz = pack_int8x2(*int8_groups(w), dtype)
    elif isinstance(dst, Int4Linear):
        q, s, m = blocks if blocks is not None else int4_groups(w)
        dst.weight, dst.scales_and_zeros = pack_int4(q, s, m, dtype)
    else:
        q, s = int8_rows(w)
        dst.weight, dst.scales = q, s.to(dtype)


# -- choosing for the machine -----------------------------------------------------------------------------------
# Below this size a model is run as it is: per-op overhead, not weight bytes, limits it, and tests compare
# tiny models bit for bit with other engines.
FAST_PATH_MIN_PARAMS = 50_000_000
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def cpu_has_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 GEMMs run in hardware, twice the fp32 rate."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def parse_dtype(dtype) -> torch.dtype | None:
    """A torch dtype, a name ('bfloat16', 'bf16', 'float32' ...) or 'auto'/None (None: choose)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in DTYPES:
        raise MMChatError(f"unknown dtype '{dtype}'; choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def parse_quant(quant) -> str | None:
    """'auto' stays 'auto'; 'none'/None means float weights; else one of SCHEMES."""
    if quant in (None, "none", "off", False):
        return None
    if quant != "auto" and quant not in SCHEMES:
        raise MMChatError(f"unknown quantization '{quant}'; choose auto, none, {', '.join(SCHEMES)}")
    return quant


def gguf_has_q4(path) -> bool:
    from .formats import gguf as fmt
    return any(t.tensor_type.name in ("Q4_0", "Q4_1") for t in fmt.open_gguf(str(path)).tensors)


def choose(device: str, dtype: torch.dtype | None, quant: str | None, n_params: int,
           source_is_q4_gguf) -> tuple[torch.dtype, str | None]:
    """The dtype and quantization scheme to run with. Explicit choices win; 'auto' picks, for models of
    FAST_PATH_MIN_PARAMS or more: on a CPU weight-only quantization (a GGUF's own Q4 blocks when it has them,
    which is lossless, else int8) with float32 compute on mmchat's own kernels (mmchat.kernels: the decode step
    runs whole blocks in C, and long prompts still use bf16 GEMMs where the CPU has them, see DenseCopy), or
    bf16 compute on torch's kernels where ours cannot be built and the CPU has bf16 instructions; on a GPU bf16.
    `source_is_q4_gguf` is called only when needed (it opens the file)."""
    big = n_params >= FAST_PATH_MIN_PARAMS
    if quant == "auto":
        quant = None
        if big and device == "cpu":
            quant = "gguf" if source_is_q4_gguf() else "int8"
    if quant == "gguf" and not source_is_q4_gguf():
        quant = "int8"  # no Q4 blocks to keep: every tensor becomes int8
    if quant is not None and device != "cpu":
        raise MMChatError("weight-only int8/int4 kernels run on the CPU only; on a GPU use --quant none "
                          "(bf16 weights)")
    if dtype is None:
        own_kernels = quant is not None and kernels.available()
        dtype = torch.bfloat16 if big and not own_kernels and (device != "cpu" or cpu_has_bf16()) else torch.float32
    return dtype, quant


# -- compiling the decode step ------------------------------------------------------------------------------------
def parse_compile(value) -> str:
    """True/'on', False/None/'off' or 'auto'."""
    if value is True or value == "on":
        return "on"
    if value in (False, None, "off"):
        return "off"
    if value != "auto":
        raise MMChatError(f"unknown compile setting '{value}'; choose auto, on or off")
    return "auto"


def choose_compile(value, device_type: str) -> bool:
    """Whether to run the decode step under torch.compile (Transformer.compile_decode). 'auto' leaves it off:
    measured here (SmolLM2-135M with its Q4_1 blocks, 1 thread, CPU time) it decodes 1.3-1.5x faster, but the
    first compile takes 1-2 minutes on 2 shared cores and even one from inductor's cache ~15 s, longer than a
    whole load, so it is asked for by name (`--compile on`) where a process lives long (serve, bench)."""
    if parse_compile(value) != "on":
        return False
    if device_type == "cpu" and not (os.environ.get("CXX") or any(shutil.which(c) for c in ("g++", "c++", "clang++"))):
        raise MMChatError("--compile on needs a C++ compiler on the CPU (install g++), or use --compile off")
    return True


def compile_decode(model, cache_dir, progress: bool = True):
    """Compile the decode step now (not in the middle of the first answer): one step at two attended lengths
    for one row, and one step for several rows. Inductor's output goes to `cache_dir` unless
    TORCHINDUCTOR_CACHE_DIR says otherwise, so the next process reuses it."""
    import time
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir))
    if progress:
        print(f"compiling the decode step (a minute or two the first time, seconds once cached in "
              f"{os.environ['TORCHINDUCTOR_CACHE_DIR']}) ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    model.compile_decode()
    device = model.norm.weight.device
    # two cache sizes and two attended lengths per row count, so the graphs come out dynamic in all three:
    # generate() sizes its cache to each request, and a new static size would compile again mid-answer
    long_len, short_len = min(model.cfg.max_seq_len, 256), min(model.cfg.max_seq_len, 192)
    with torch.inference_mode():
        for rows in (1, 2):
            for length in (long_len, short_len):
                model.setup_cache(rows, length)
                for pos in (0, min(100, length - 1)):
                    model(torch.zeros(rows, 1, dtype=torch.long, device=device),
                          torch.full((rows, 1), pos, dtype=torch.long, device=device))
                model.clear_cache()
    if progress:
        print(f"compiled in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
