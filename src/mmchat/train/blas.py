"""The training step's Linear matmuls through numpy's OpenBLAS where it beats torch's BLAS.

torch's CPU wheels do their float32 GEMMs in MKL, which on AMD CPUs takes a slower generic path. numpy's wheels
bundle OpenBLAS, whose Zen kernels measured 1.0-1.8x MKL's speed on this model's training shapes (1024 rows of
SmolLM2-135M: the 49152-wide head's forward 1.8x, the fused Q/K/V and gate/up products 1.2-1.5x; 1 thread, AVX2
Zen 3). `BlasLinears` runs each float32 nn.Linear of the model through `blas_linear` (an autograd Function: the
same three products as F.linear, y = x W^T, dX = dY W, dW = dY^T X, on zero-copy numpy views of the tensors)
while the training forward runs; backward keeps what the forward recorded. Eval, samples and inference keep
torch's own matmuls. The values are the same up to float32 rounding (another summation order).

MMCHAT_BLAS=torch turns it off, MMCHAT_BLAS=openblas turns it on on any CPU; the default (auto) is on where it was
measured faster: an AMD CPU whose torch uses MKL, float32 (not bf16 autocast), eager (not --compile).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..errors import MMChatError

_threads_fn = None  # numpy's OpenBLAS's set_num_threads, once found


def numpy_openblas():
    """numpy's bundled OpenBLAS's set_num_threads(n) function, or None when numpy was built against another BLAS
    or its library cannot be found (then the training matmuls stay torch's)."""
    global _threads_fn
    if _threads_fn is not None:
        return _threads_fn or None
    _threads_fn = False
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    except Exception:
        return None
    if "openblas" not in str(blas.get("name", "")).lower():
        return None
    libs = Path(np.__file__).parent.parent / "numpy.libs"  # where Linux wheels keep it (loaded with numpy)
    for path in sorted(libs.glob("lib*openblas*.so*")):
        lib = ctypes.CDLL(str(path))
        for name in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads", "openblas_set_num_threads"):
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.argtypes, fn.restype = [ctypes.c_int], None
                _threads_fn = fn
                return fn
    return None


def _amd_cpu() -> bool:
    try:
        return "AuthenticAMD" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def use_openblas(device: torch.device, bf16: bool, compiled: bool) -> bool:
    """Whether the training step's Linear matmuls go through numpy's OpenBLAS ($MMCHAT_BLAS: auto, torch, openblas)."""
    choice = os.environ.get("MMCHAT_BLAS", "auto")
    if choice not in ("auto", "torch", "openblas"):
        raise MMChatError(f"MMCHAT_BLAS must be auto, torch or openblas (got {choice})")
    if choice == "torch" or device.type != "cpu" or bf16 or compiled or numpy_openblas() is None:
        return False
    return choice == "openblas" or (_amd_cpu() and torch.backends.mkl.is_available())


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


class BlasLinear(torch.autograd.Function):
    """F.linear(x, weight, bias) for float32 CPU tensors, its products done by numpy's (OpenBLAS) matmul.
    Gradients are computed only for the inputs that need them (a frozen weight gets no dY^T X product)."""

    @staticmethod
    def forward(ctx, x, weight, bias):  # x (..., in), weight (out, in), bias (out,) or None
        x2 = x.reshape(-1, x.size(-1)).contiguous()  # (N, in)
        y = torch.empty(x2.size(0), weight.size(0), dtype=x.dtype)  # (N, out)
        np.matmul(_np(x2), _np(weight).T, out=_np(y))
        if bias is not None:
            y += bias
        ctx.save_for_backward(x2, weight)
        ctx.has_bias, ctx.x_shape = bias is not None, x.shape
        return y.view(*x.shape[:-1], weight.size(0))  # (..., out)

    @staticmethod
    def backward(ctx, grad):  # grad (..., out)
        x2, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.size(-1)).contiguous()  # (N, out)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty_like(x2)  # (N, in)
            np.matmul(_np(g), _np(weight), out=_np(dx))
            dx = dx.view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            dw = torch.empty_like(weight)  # (out, in)
            np.matmul(_np(g).T, _np(x2), out=_np(dw))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = g.sum(0)  # (out,)
        return dx, dw, db


def blas_linear(x, weight, bias=None):
    return BlasLinear.apply(x, weight, bias)


def _linear_forward(self, x):
    if x.dtype != torch.float32 or self.weight.dtype != torch.float32 or x.device.type != "cpu":
        return nn.functional.linear(x, self.weight, self.bias)
    return blas_linear(x, self.weight, self.bias)


class BlasLinears:
    """Swaps every nn.Linear of `model` onto blas_linear for the span of `swapped()` (an instance attribute
    `forward`, removed afterwards: the modules, their parameters and state dicts are untouched), with OpenBLAS
    on torch's thread count."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.set_threads = numpy_openblas()

    @contextlib.contextmanager
    def swapped(self):
        self.set_threads(torch.get_num_threads())  # honours MMCHAT_THREADS / the loop's choice, as torch's BLAS does
        linears = [m for m in self.model.modules() if type(m) is nn.Linear]
        for m in linears:
            m.forward = _linear_forward.__get__(m)
        try:
            yield
        finally:
            for m in linears:
                del m.forward
