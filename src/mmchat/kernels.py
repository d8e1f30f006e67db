"""mmchat's own CPU kernels for weights kept in GGUF's 4- and 8-bit blocks (csrc/qmatmul.c): block matmuls, and
every Llama block of a forward pass with a KV cache (decode steps, batches and prompts) in one call, sampling, and
the training step's float32 GEMMs split over torch's threads (mmchat.train.cpu_step). Built once
for this CPU with the system's C compiler (`cc -O3 -march=native`, a few seconds) into mmchat's cache and loaded
with ctypes; where no compiler is found or the build fails, `available()` is False and torch's own weight-only
kernels are used instead.

Why our own: torch's int4 kernel decodes the weights again for every activation row and has no integer dot
product path, and its float32 input path is not vectorized at all on AVX2-only CPUs. These read each weight
block once for up to 8 rows and multiply in int8 (as llama.cpp does), and a whole forward pass costs one call
and one thread team instead of hundreds of tensor ops.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import weakref
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "qmatmul.c"
_ptr = ctypes.c_void_p
_int = ctypes.c_int


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return ""


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built kernels, or None where they cannot be (not x86-64 with AVX2, FMA and F16C, no compiler, a
    failed build, or MMCHAT_KERNELS=torch)."""
    if os.environ.get("MMCHAT_KERNELS") == "torch" or not {"avx2", "fma", "f16c"} <= set(_cpu_flags().split()):
        return None
    from .registry import home
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([*flags, _cpu_flags()]).encode()).hexdigest()[:16]
    target = home() / "kernels" / f"qmatmul-{key}.so"
    if not target.exists():  # built once per machine; later a compiler is not even needed
        cc = _compiler()
        if cc is None:
            return None
        if sys.stderr.isatty():  # a person is waiting: say what the pause is
            print(f"building mmchat's CPU kernels for this machine (once; cached under {target.parent}) ...",
                  file=sys.stderr, flush=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            subprocess.run([cc, *flags, str(SOURCE), "-o", tmp, "-lm"], check=True, capture_output=True, timeout=120)
            os.replace(tmp, target)  # atomic: a concurrent build or a crash never leaves half a library
        except (OSError, subprocess.SubprocessError) as e:
            os.unlink(tmp)
            err = getattr(e, "stderr", b"") or b""
            print(f"mmchat: could not build the quantized matmul kernels ({err.decode(errors='replace').strip()[:200] or e});"
                  " using torch's", file=sys.stderr)
            return None
    lib = ctypes.CDLL(str(target))
    lib.q4_matmul.argtypes = [_ptr, _ptr, _ptr, _ptr, _ptr, _int, _int, _int, _int]
    lib.q8_matmul.argtypes = [_ptr, _ptr, _ptr, _ptr, _int, _int, _int, _int]
    lib.sample_rows.argtypes = [_ptr, _ptr, _int, _int] + [_ptr] * 7 + [_int]
    lib.penalize_rows.argtypes = [_ptr, _ptr, _int, _int] + [_ptr] * 7 + [_int]
    _i64 = ctypes.c_int64
    lib.sgemm_team.argtypes = [_ptr, _int, _int, _i64, _i64, _i64, _ptr, _i64, _ptr, _i64, ctypes.c_float, _ptr,
                               _i64, _int]
    lib.nll_rows.argtypes = [_ptr, _ptr, _i64, _int, _ptr, _int]
    lib.rms_norm_fwd.argtypes = [_ptr, _ptr, ctypes.c_float, _i64, _int, _ptr, _ptr, _int]
    lib.rms_norm_bwd.argtypes = [_ptr, _ptr, _ptr, _ptr, _i64, _int, _ptr, _ptr, _int]
    lib.swiglu_fwd.argtypes = [_ptr, _i64, _int, _ptr, _int]
    lib.swiglu_bwd.argtypes = [_ptr, _ptr, _i64, _int, _ptr, _int]
    lib.rope_heads.argtypes = [_ptr] * 6 + [_int] * 7
    lib.attention_fwd.argtypes = [_ptr] * 6 + [_int] * 6
    lib.attention_bwd.argtypes = [_ptr] * 10 + [_int] * 6
    for fn in (lib.q4_matmul, lib.q8_matmul, lib.sample_rows, lib.penalize_rows, lib.sgemm_team, lib.nll_rows,
               lib.rms_norm_fwd, lib.rms_norm_bwd, lib.swiglu_fwd, lib.swiglu_bwd, lib.rope_heads, lib.attention_fwd,
               lib.attention_bwd):
        fn.restype = None
    return lib


def available() -> bool:
    return library() is not None


def q4_matmul(x: torch.Tensor, q4: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x (M, K) float32 -> (M, N) float32 for W in 4-bit blocks, rows in tiles of 8 (quantize.BlockQ4Linear):
    q4 (N/8, K/32, 128) uint8, d and m (N/8, K/32, 8) float16."""
    x = x.contiguous()
    M, K = x.shape
    N = q4.size(0) * d.size(-1)
    y = torch.empty(M, N, dtype=torch.float32)
    library().q4_matmul(q4.data_ptr(), d.data_ptr(), m.data_ptr(), x.data_ptr(), y.data_ptr(), M, N, K,
                        torch.get_num_threads())
    return y


def q8_matmul(x: torch.Tensor, q8: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """x (M, K) float32 -> (M, N) float32 for W in 8-bit blocks: q8 (N, K) int8, d (N, K/32)."""
    x = x.contiguous()
    M, K = x.shape
    N = q8.size(0)
    y = torch.empty(M, N, dtype=torch.float32)
    library().q8_matmul(q8.data_ptr(), d.data_ptr(), x.data_ptr(), y.data_ptr(), M, N, K, torch.get_num_threads())
    return y


def penalize_rows(logits: torch.Tensor, rows: torch.Tensor, seen: torch.Tensor | None, counts: torch.Tensor | None,
                  bias: torch.Tensor | None, rep: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor):
    """logits (B, V) float32 -> a penalized copy (B, V): row b with row rows[b] (int64) of seen (S, V) bool,
    counts and bias (S, V) float32 (None: unused), and its repetition, presence and frequency penalties (B,)."""
    logits = logits.contiguous()
    B, V = logits.shape
    out = torch.empty_like(logits)
    matrices = [None if t is None else t.data_ptr() for t in (seen, counts, bias)]  # None: NULL, unused
    library().penalize_rows(logits.data_ptr(), out.data_ptr(), B, V, rows.data_ptr(), *matrices, rep.data_ptr(),
                            presence.data_ptr(), frequency.data_ptr(), min(torch.get_num_threads(), B))
    return out


def sample_rows(logits: torch.Tensor, report: torch.Tensor, inv_temp: torch.Tensor, top_k: torch.Tensor,
                top_p: torch.Tensor, min_p: torch.Tensor, u: torch.Tensor):
    """logits and report (B, V) float32; per row inv_temp (0: greedy), top_k (0: off), top_p (1: off), min_p
    (0: off), u float64 in [0, 1) -> tokens (B,) int64 drawn from softmax(logits * inv_temp) so truncated by
    inverting its cumulative distribution at u, and their log-probabilities under softmax(report) (B,) float32."""
    logits, report = logits.contiguous(), report.contiguous()
    B, V = logits.shape
    tokens, logprobs = torch.empty(B, dtype=torch.int64), torch.empty(B, dtype=torch.float32)
    library().sample_rows(logits.data_ptr(), report.data_ptr(), B, V, inv_temp.data_ptr(), top_k.data_ptr(),
                          top_p.data_ptr(), min_p.data_ptr(), u.data_ptr(), tokens.data_ptr(), logprobs.data_ptr(),
                          min(torch.get_num_threads(), B))
    return tokens, logprobs


# -- every block of a forward pass with a KV cache ----------------------------------------------------------------
class _QLinear(ctypes.Structure):
    _fields_ = [("kind", _int), ("q", _ptr), ("d", _ptr), ("m", _ptr), ("n_out", _int), ("n_in", _int)]


def _qlinear(mod) -> _QLinear:
    if hasattr(mod, "q4"):
        return _QLinear(4, mod.q4.data_ptr(), mod.d.data_ptr(), mod.m.data_ptr(), mod.out_features, mod.in_features)
    return _QLinear(8, mod.q8.data_ptr(), mod.d.data_ptr(), None, mod.out_features, mod.in_features)


def fused_blocks_ok(model) -> bool:
    """Whether `FusedBlocks` can run this model: a Llama-family float32 model without biases whose block
    projections are all on mmchat's kernels (q4/q8 blocks)."""
    from .quantize import BlockQ4Linear, BlockQ8Linear
    cfg = model.cfg
    if not available() or cfg.arch != "llama" or model.norm.weight.dtype != torch.float32 \
            or cfg.head_dim > 512 or cfg.head_dim % 16 or cfg.n_head // cfg.n_kv_head > 64:
        return False
    return all(isinstance(lin, (BlockQ4Linear, BlockQ8Linear)) and lin.bias is None
               for layer in model.layers for lin in (layer.attn.wqkv, layer.attn.wo, layer.mlp.w_up, layer.mlp.w_down))


class _Layer(ctypes.Structure):
    _fields_ = [("attn_norm", _ptr), ("mlp_norm", _ptr), ("wqkv", _QLinear), ("wo", _QLinear), ("wup", _QLinear),
                ("wdown", _QLinear), ("k_cache", _ptr), ("v_cache", _ptr)]


class FusedBlocks:
    """Runs every block of a forward pass with the KV cache set up (a decode step, a prompt, or a batch of
    either) as one call into csrc/qmatmul.c's llama_layers. The weights' addresses are gathered once, the caches'
    again whenever the model's caches are replaced (a new cache set up, or another generation's swapped in)."""

    def __init__(self, model):
        self.model = model
        self.layers = (_Layer * len(model.layers))(*[
            _Layer(layer.attn_norm.weight.data_ptr(), layer.mlp_norm.weight.data_ptr(),
                   *[_qlinear(m) for m in (layer.attn.wqkv, layer.attn.wo, layer.mlp.w_up, layer.mlp.w_down)])
            for layer in model.layers])
        self.first_cache = lambda: None  # the first layer's cache when self.layers took the caches' addresses
        from .quantize import DENSE_ROWS, dense_ok
        # where the CPU has bf16 GEMMs, long prompts run faster on the packed bf16 copies (the module path)
        self.most_rows = DENSE_ROWS - 1 if DENSE_ROWS > 0 and dense_ok() else None
        fn = library().llama_layers
        fn.argtypes = [_ptr, ctypes.POINTER(_Layer), _int, ctypes.c_float] + [_ptr] * 4 + [_int] * 6
        fn.restype = None
        self.fn = fn

    def takes(self, rows: int) -> bool:
        """Whether a call of this many rows (batch times tokens) should run here: on a float16 cache (one set up
        while the fused blocks were installed), and not a long prompt where bf16 GEMMs are faster."""
        return self.model.layers[0].attn.cache.k.dtype == torch.float16 and \
            (self.most_rows is None or rows <= self.most_rows)

    def __call__(self, x: torch.Tensor, input_pos: torch.Tensor, cache_rows: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, d) float32 at positions input_pos (B, T) -> the residual stream after the last block (B, T, d).
        Row b uses cache row cache_rows[b] (default b)."""
        model, cfg = self.model, self.model.cfg
        if self.first_cache() is not model.layers[0].attn.cache:  # caches are always replaced all together
            caches = [layer.attn.cache for layer in model.layers]
            for entry, cache in zip(self.layers, caches):
                entry.k_cache, entry.v_cache = cache.k.data_ptr(), cache.v.data_ptr()
            self.first_cache = weakref.ref(caches[0])  # weak: a cache the model let go of is freed
            self.cache_shape = caches[0].k.shape  # (rows, nkv, slots, hs)
        B, T, _ = x.shape
        if int(input_pos.max()) >= self.cache_shape[2] or B > self.cache_shape[0] or \
                (cache_rows is not None and int(cache_rows.max()) >= self.cache_shape[0]):  # C writes unchecked
            raise ValueError(f"positions or cache rows past the cache set up ({self.cache_shape[0]} rows of "
                             f"{self.cache_shape[2]} positions)")
        x = x.contiguous().clone()  # updated in place
        pos = input_pos.to(torch.int64).contiguous()  # (B, T): one row of the call per token
        rows = (torch.arange(B) if cache_rows is None else cache_rows).to(torch.int64)  # (B,)
        rows = rows[:, None].expand(B, T).contiguous()  # (B, T)
        cos, sin = model.rope(x.device, torch.float32)  # (max_len, hs) each
        self.fn(x.data_ptr(), self.layers, len(self.layers), cfg.norm_eps, cos.data_ptr(), sin.data_ptr(),
                pos.data_ptr(), rows.data_ptr(), B * T, cfg.n_head, cfg.n_kv_head, cfg.head_dim, self.cache_shape[2],
                torch.get_num_threads())
        return x
