"""The training step's Linear matmuls through numpy's OpenBLAS where it beats torch's BLAS.

torch's CPU wheels do their float32 GEMMs in MKL, which on AMD CPUs takes a slower generic path. numpy's wheels
bundle OpenBLAS, whose Zen kernels measured 1.0-1.8x MKL's speed on this model's training shapes (1024 rows of
SmolLM2-135M: the 49152-wide head's forward 1.8x, the fused Q/K/V and gate/up products 1.2-1.5x; AVX2 Zen 3).
`BlasLinears` runs each float32 nn.Linear of the model through `blas_linear` (an autograd Function: the same
three products as F.linear, y = x W^T, dX = dY W, dW = dY^T X) while the training forward runs; backward keeps
what the forward recorded. Eval, samples and inference keep torch's own matmuls. The values are the same up to
float32 rounding (another summation order).

Each product is split over torch's own OpenMP threads, each calling OpenBLAS single-threaded on its share
(`mmchat.kernels.sgemm`): OpenBLAS's own thread pool would spin beside torch's on the same cores, and with 2
threads the step ran no faster than with 1.

MMCHAT_BLAS=torch turns it off, MMCHAT_BLAS=openblas turns it on on any CPU; the default (auto) is on where it was
measured faster: an AMD CPU whose torch uses MKL, float32 (not bf16 autocast), eager (not --compile). It needs
mmchat's C kernels (a C compiler) and numpy built with OpenBLAS; without them the matmuls stay torch's.
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


@functools.cache
def numpy_openblas() -> tuple[int, object] | None:
    """The address of numpy's bundled OpenBLAS's cblas_sgemm (its 64-bit integer interface) and its
    set_num_threads(n) function, or None when numpy was built against another BLAS or the library cannot be found
    (then the training matmuls stay torch's)."""
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
            return ctypes.cast(sgemm, ctypes.c_void_p).value, threads
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
    if choice == "torch" or device.type != "cpu" or bf16 or compiled or numpy_openblas() is None \
            or not kernels.available():
        return False
    return choice == "openblas" or (_amd_cpu() and torch.backends.mkl.is_available())


def _sgemm(a, b, trans_a: bool, trans_b: bool) -> torch.Tensor:
    """op(a) @ op(b) for 2-D contiguous float32 tensors (op: transposed or not), on torch's threads."""
    out = torch.empty(a.size(1 if trans_a else 0), b.size(0 if trans_b else 1))
    kernels.sgemm(numpy_openblas()[0], a, b, trans_a, trans_b, out, torch.get_num_threads())
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


def blas_linear(x, weight, bias=None):
    return BlasLinear.apply(x, weight, bias)


def _linear_forward(self, x):
    if x.dtype != torch.float32 or self.weight.dtype != torch.float32 or x.device.type != "cpu":
        return nn.functional.linear(x, self.weight, self.bias)
    return blas_linear(x, self.weight, self.bias)


class BlasLinears:
    """Swaps every nn.Linear of `model` onto blas_linear for the span of `swapped()` (an instance attribute
    `forward`, removed afterwards: the modules, their parameters and state dicts are untouched). OpenBLAS is set
    to one thread per call: the threads are torch's (see _sgemm)."""

    def __init__(self, model: nn.Module):
        self.model = model
        numpy_openblas()[1](1)

    @contextlib.contextmanager
    def swapped(self):
        linears = [m for m in self.model.modules() if type(m) is nn.Linear]
        for m in linears:
            m.forward = _linear_forward.__get__(m)
        try:
            yield
        finally:
            for m in linears:
                del m.forward
