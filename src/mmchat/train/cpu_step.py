"""The training step on the CPU in float32: the model's layers swapped for mmchat's own autograd Functions while the
training forward runs (`CpuStep.swapped()`), each one pass of C (csrc/qmatmul.c) or a GEMM instead of a chain of
tensor ops. Eval, samples and inference keep the model's own code.

- Linear layers (`blas_linear`): y = x W^T, dX = dY W, dW = dY^T X through numpy's bundled OpenBLAS. torch's CPU
  wheels do their float32 GEMMs in MKL, which on AMD CPUs takes a slower generic path; OpenBLAS's Zen kernels
  measured 1.0-1.8x MKL's speed on this model's training shapes. Each product is split over torch's own OpenMP
  threads, each calling OpenBLAS single-threaded on its share (`sgemm`): OpenBLAS's own thread
  pool would spin beside torch's on the same cores (with 2 threads the step ran no faster than with 1).
- The head and the loss together (`head_nll`): the loss kernel overwrites the logits with their gradient.
- RMSNorm, SwiGLU, RoPE with the split into heads, and causal grouped-query attention, forward and backward.

The values are the module path's up to float32 rounding (other summation orders). MMCHAT_BLAS=torch turns all
this off, MMCHAT_BLAS=openblas turns it on on any CPU; the default (auto) is on where it was measured faster: an AMD
CPU whose torch uses MKL, float32 (not bf16 autocast), eager (not --compile). It needs mmchat's C kernels (a C
compiler) and numpy built with OpenBLAS; without them the step is the model's own.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .. import kernels
from ..errors import MMChatError
from ..model import MLP, Attention, RMSNorm


@functools.cache
def numpy_openblas() -> int | None:
    """The address of numpy's bundled OpenBLAS's cblas_sgemm (its 64-bit integer interface), or None when numpy was
    built against another BLAS or the library cannot be found (then the training matmuls stay torch's). Found, the
    library is set to one thread: mmchat calls it from each of torch's threads (numpy's own matmuls in this process
    then run on one thread too; mmchat does not use them elsewhere)."""
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    except Exception:
        return None
    if "openblas" not in str(blas.get("name", "")).lower():
        return None
    libs = Path(np.__file__).parent.parent / "numpy.libs"  # where Linux wheels keep it (loaded with numpy)
    for path in sorted(libs.glob("lib*openblas*64*.so*")):
        lib = ctypes.CDLL(str(path))
        sgemm = next((getattr(lib, n) for n in ("scipy_cblas_sgemm64_", "cblas_sgemm64_") if hasattr(lib, n)), None)
        threads = next((getattr(lib, n) for n in ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_")
                        if hasattr(lib, n)), None)
        if sgemm is not None and threads is not None:
            threads.argtypes, threads.restype = [ctypes.c_int], None
            threads(1)  # its own thread pool would spin beside torch's, and warns when called from inside it
            return ctypes.cast(sgemm, ctypes.c_void_p).value
    return None


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the memory that a training step frees for the next step, rather than return it to
    the kernel: each step allocates the same activations and gradients again, and memory fresh from the kernel costs
    a page fault per 4 KB page on first touch (SmolLM2-135M, 4 x 256 rows: 80-200 thousand a step, and the step ran
    5-7% faster without them). The process then holds its peak step's memory, which the next step needs anyway.
    False (and nothing changed) where malloc is not glibc's."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
    # no allocation gets a mapping of its own (freed, it would be unmapped), and the heap's free top is kept
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1


def _amd_cpu() -> bool:
    try:
        return "AuthenticAMD" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def use_openblas(device: torch.device, bf16: bool, compiled: bool) -> bool:
    """Whether the training step runs here, its GEMMs in numpy's OpenBLAS ($MMCHAT_BLAS: auto, torch, openblas)."""
    choice = os.environ.get("MMCHAT_BLAS", "auto")
    if choice not in ("auto", "torch", "openblas"):
        raise MMChatError(f"MMCHAT_BLAS must be auto, torch or openblas (got {choice})")
    if choice == "torch" or device.type != "cpu" or bf16 or compiled or numpy_openblas() is None \
            or not kernels.available():
        return False
    return choice == "openblas" or (_amd_cpu() and torch.backends.mkl.is_available())


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def sgemm(a, b, trans_a: bool, trans_b: bool, out: torch.Tensor, threads: int):
    """out = op(a) @ op(b) for 2-D contiguous float32 tensors (op: transposed where trans_*), by OpenBLAS called
    single-threaded by each of `threads` OpenMP threads on its share of out (csrc: sgemm_team)."""
    M, K = (a.size(1), a.size(0)) if trans_a else a.shape
    N = b.size(0) if trans_b else b.size(1)
    kernels.library().sgemm_team(numpy_openblas(), int(trans_a), int(trans_b), M, N, K, _ptr(a), a.stride(0), _ptr(b),
                                 b.stride(0), 0.0, _ptr(out), out.stride(0), threads)


def _sgemm(a, b, trans_a: bool, trans_b: bool) -> torch.Tensor:
    """op(a) @ op(b), a new tensor, on torch's threads."""
    out = torch.empty(a.size(1 if trans_a else 0), b.size(0 if trans_b else 1))
    sgemm(a, b, trans_a, trans_b, out, torch.get_num_threads())
    return out


class BlasLinear(torch.autograd.Function):
    """F.linear(x, weight, bias) for float32 CPU tensors, its products done by OpenBLAS on torch's threads.
    Gradients are computed only for the inputs that need them (a frozen weight gets no dY^T X product)."""

    @staticmethod
    def forward(ctx, x, weight, bias):  # x (..., in), weight (out, in), bias (out,) or None
        x2, weight = x.reshape(-1, x.size(-1)).contiguous(), weight.contiguous()  # (N, in), (out, in)
        y = _sgemm(x2, weight, False, True)  # (N, out)
        if bias is not None:
            y += bias
        ctx.save_for_backward(x2, weight)
        ctx.has_bias, ctx.x_shape = bias is not None, x.shape
        return y.view(*x.shape[:-1], weight.size(0))  # (..., out)

    @staticmethod
    def backward(ctx, grad):  # grad (..., out)
        x2, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.size(-1)).contiguous()  # (N, out)
        dx = _sgemm(g, weight, False, False).view(ctx.x_shape) if ctx.needs_input_grad[0] else None  # (..., in)
        dw = _sgemm(g, x2, True, False) if ctx.needs_input_grad[1] else None  # (out, in)
        db = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None  # (out,)
        return dx, dw, db


class HeadNLL(torch.autograd.Function):
    """-log softmax(hidden W^T)[target] per row, the head's matmul and the loss together: the loss's C kernel
    overwrites the logits with their gradient as it goes, so backward makes no pass over the (N, V) logits, only
    the two products with that gradient, the upstream gradient (one scalar per row) applied to their thin sides.
    The same values and gradients as the head then ChunkedNLL, within float32 rounding."""

    @staticmethod
    def forward(ctx, hidden, weight, targets):  # hidden (N, d), weight (V, d), targets (N,) ids
        hidden, weight = hidden.contiguous(), weight.contiguous()
        grad_logits = _sgemm(hidden, weight, False, True)  # (N, V) the logits, made their gradient in place:
        nll, targets = torch.empty(hidden.size(0)), targets.contiguous()  # (N,) each; named: alive through the call
        kernels.library().nll_rows(_ptr(grad_logits), _ptr(targets), *grad_logits.shape, _ptr(nll),
                                   torch.get_num_threads())
        ctx.save_for_backward(hidden, weight, grad_logits)
        return nll

    @staticmethod
    def backward(ctx, grad):  # grad (N,)
        hidden, weight, grad_logits = ctx.saved_tensors
        grad = grad.contiguous()[:, None]  # (N, 1)
        dh = _sgemm(grad_logits, weight, False, False) * grad if ctx.needs_input_grad[0] else None  # (N, d)
        dw = _sgemm(grad_logits, hidden * grad, True, False) if ctx.needs_input_grad[1] else None  # (V, d)
        return dh, dw, None


def head_nll(hidden, weight, targets):
    """hidden (N, d) float32, weight (V, d), targets (N,) -> the loss per row (N,), see HeadNLL."""
    if hidden.size(0) == 0:  # no loss here: zero, with (zero) gradients for DDP
        return hidden.sum(-1) + 0 * weight.sum()
    return HeadNLL.apply(hidden, weight, targets)


def blas_linear(x, weight, bias=None):
    return BlasLinear.apply(x, weight, bias)


class RMSNormFn(torch.autograd.Function):
    """F.rms_norm(x, (d,), weight, eps) in one pass per row each way (csrc: rms_norm_fwd, rms_norm_bwd); saves x and
    one scale per row."""

    @staticmethod
    def forward(ctx, x, weight, eps):  # x (..., d), weight (d,)
        x2 = x.reshape(-1, x.size(-1)).contiguous()  # (N, d)
        y, rstd = torch.empty_like(x2), torch.empty(x2.size(0))  # (N, d), (N,)
        kernels.library().rms_norm_fwd(_ptr(x2), _ptr(weight), eps, *x2.shape, _ptr(y), _ptr(rstd),
                                       torch.get_num_threads())
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):  # dy (..., d)
        x2, weight, rstd = ctx.saved_tensors
        dy2 = dy.reshape(x2.shape).contiguous()  # (N, d)
        dx = torch.empty_like(x2)
        dw = torch.empty_like(weight) if ctx.needs_input_grad[1] else None  # (d,)
        kernels.library().rms_norm_bwd(_ptr(x2), _ptr(weight), _ptr(rstd), _ptr(dy2), *x2.shape, _ptr(dx), _ptr(dw),
                                       torch.get_num_threads())
        return dx.view(dy.shape), dw, None


class SwiGLUFn(torch.autograd.Function):
    """silu(gate) * up for h = [gate | up] (..., 2f), the fused gate/up projection's output -> (..., f); backward
    writes the gradient of h directly (no split, no concatenation). Saves only h."""

    @staticmethod
    def forward(ctx, h):
        h2 = h.reshape(-1, h.size(-1)).contiguous()  # (N, 2f)
        out = torch.empty(h2.size(0), h2.size(1) // 2)  # (N, f)
        kernels.library().swiglu_fwd(_ptr(h2), h2.size(0), out.size(1), _ptr(out), torch.get_num_threads())
        ctx.save_for_backward(h2)
        return out.view(*h.shape[:-1], out.size(1))

    @staticmethod
    def backward(ctx, dout):  # (..., f)
        (h2,) = ctx.saved_tensors
        d2 = dout.reshape(h2.size(0), -1).contiguous()  # (N, f)
        dh = torch.empty_like(h2)  # (N, 2f)
        kernels.library().swiglu_bwd(_ptr(h2), _ptr(d2), h2.size(0), d2.size(1), _ptr(dh), torch.get_num_threads())
        return dh.view(*dout.shape[:-1], h2.size(1))


class RopeHeads(torch.autograd.Function):
    """The fused Q/K/V projection's output (B, T, (nh + 2 nkv) hs) -> q (B, nh, T, hs), k and v (B, nkv, T, hs),
    contiguous, q and k rotated at their rows' angles (cos, sin (B, T, hs)): the slicing, transposes, roll and
    products of model.apply_rope in one pass (csrc: rope_heads), and the reverse for the gradients."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, nh: int, nkv: int):
        B, T, _ = qkv.shape
        hs = qkv.size(-1) // (nh + 2 * nkv)
        qkv, cos, sin = qkv.contiguous(), cos.contiguous(), sin.contiguous()
        q, k, v = torch.empty(B, nh, T, hs), torch.empty(B, nkv, T, hs), torch.empty(B, nkv, T, hs)
        kernels.library().rope_heads(*map(_ptr, (qkv, q, k, v, cos, sin)), B, T, nh, nkv, hs, 0,
                                     torch.get_num_threads())
        ctx.save_for_backward(cos, sin)
        ctx.dims = (B, T, nh, nkv, hs)
        return q, k, v

    @staticmethod
    def backward(ctx, dq, dk, dv):
        cos, sin = ctx.saved_tensors
        B, T, nh, nkv, hs = ctx.dims
        dq, dk, dv = (torch.zeros(B, n, T, hs) if d is None else d.contiguous()
                      for d, n in ((dq, nh), (dk, nkv), (dv, nkv)))
        dqkv = torch.empty(B, T, (nh + 2 * nkv) * hs)
        kernels.library().rope_heads(*map(_ptr, (dqkv, dq, dk, dv, cos, sin)), B, T, nh, nkv, hs, 1,
                                     torch.get_num_threads())
        return dqkv, None, None, None, None


class CausalAttention(torch.autograd.Function):
    """Causal softmax(Q K^T / sqrt(hs)) V for q (B, nh, T, hs), k and v (B, nkv, T, hs) (grouped-query: query head h
    reads kv head h // (nh / nkv)) -> (B, T, nh hs), the output projection's input (csrc: attention_fwd and _bwd:
    blocks of 64 queries against the keys they see, the products by OpenBLAS; backward rebuilds the weights from
    each query's saved log-sum-exp)."""

    @staticmethod
    def forward(ctx, q, k, v):
        (B, nh, T, hs), nkv = q.shape, k.size(1)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        y, lse = torch.empty(B, T, nh * hs), torch.empty(B, nh, T)
        kernels.library().attention_fwd(numpy_openblas(), *map(_ptr, (q, k, v, y, lse)), B, nh, nkv, T, hs,
                                        torch.get_num_threads())
        ctx.save_for_backward(q, k, v, y, lse)
        return y

    @staticmethod
    def backward(ctx, dy):  # (B, T, nh hs)
        q, k, v, y, lse = ctx.saved_tensors
        (B, nh, T, hs), nkv = q.shape, k.size(1)
        dq, dk, dv, dy = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dy.contiguous()
        kernels.library().attention_bwd(numpy_openblas(), *map(_ptr, (q, k, v, y, lse, dy, dq, dk, dv)),
                                        B, nh, nkv, T, hs, torch.get_num_threads())
        return dq, dk, dv


def _fp32_cpu(*tensors) -> bool:
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)


def _linear_forward(self, x):
    if not _fp32_cpu(x, self.weight):
        return nn.functional.linear(x, self.weight, self.bias)
    return blas_linear(x, self.weight, self.bias)


def _rms_norm_forward(self, x):
    if not _fp32_cpu(x, self.weight):
        return type(self).forward(self, x)
    return RMSNormFn.apply(x, self.weight, self.eps)


def _mlp_forward(self, x):
    if not self.gated or not _fp32_cpu(x):
        return type(self).forward(self, x)
    return self.w_down(SwiGLUFn.apply(self.w_up(x)))  # (B, T, d)


def _attention_forward(self, x, rope, input_pos, mask, cache_rows=None):
    """Training's attention (no cache, plain causal, RoPE): the heads split and rotated by RopeHeads, attention by
    CausalAttention."""
    if self.cache is not None or mask is not None or self.use_reference or rope is None or self.head_dim % 16 \
            or not _fp32_cpu(x):
        return type(self).forward(self, x, rope, input_pos, mask, cache_rows)
    cos, sin = (t.squeeze(1) for t in rope)  # (B, T, hs) each
    q, k, v = RopeHeads.apply(self.wqkv(x), cos, sin, self.n_head, self.n_kv_head)  # (B, nh|nkv, T, hs)
    return self.wo(CausalAttention.apply(q, k, v))  # (B, T, nh hs) -> (B, T, d)


class CpuStep:
    """Swaps every nn.Linear of `model` onto blas_linear, and its RMSNorms, SwiGLU MLPs and attention onto the
    functions above, for the span of `swapped()` (an instance attribute `forward`, removed afterwards: the modules,
    their parameters and state dicts are untouched)."""

    def __init__(self, model: nn.Module):
        self.model = model

    @contextlib.contextmanager
    def swapped(self):
        forwards = {nn.Linear: _linear_forward, RMSNorm: _rms_norm_forward, MLP: _mlp_forward,
                    Attention: _attention_forward}
        swapped = [m for m in self.model.modules() if type(m) in forwards]
        for m in swapped:
            m.forward = forwards[type(m)].__get__(m)
        try:
            yield
        finally:
            for m in swapped:
                del m.forward
