"""The float32 CPU training step (mmchat.train.cpu_step: OpenBLAS GEMMs on torch's threads, the head and loss
together, the C layers) gives torch's values and gradients within float32 rounding, trains the same curve, and
leaves the model as it was."""
import contextlib
from importlib import resources

import pytest
import torch
import torch.nn.functional as F

from mmchat import kernels
from mmchat.config import CONFIGS
from mmchat.errors import MMChatError
from mmchat.model import Transformer, apply_rope, rope_tables
from mmchat.train.cpu_step import (CausalAttention, CpuStep, RMSNormFn, RopeHeads, SwiGLUFn, blas_linear, head_nll,
                                   numpy_openblas, sgemm, use_openblas)
from mmchat.train.loop import ChunkedNLL, TrainConfig
from mmchat.train.lora import apply_lora
from mmchat.train.pretrain import pretrain

CORPUS = str(resources.files("mmchat") / "data" / "tiny_corpus.txt")
pytestmark = pytest.mark.skipif(numpy_openblas() is None, reason="numpy is not built with OpenBLAS here")


@pytest.mark.parametrize("bias", [False, True])
def test_blas_linear_matches_f_linear(bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 96, generator=g)[:, ::2].requires_grad_()  # (3, 25, 96), not contiguous
    w = torch.randn(80, 96, generator=g).requires_grad_()  # (out, in)
    b = torch.randn(80, generator=g).requires_grad_() if bias else None
    dy = torch.randn(3, 25, 80, generator=g)  # (3, 25, out)
    ours = blas_linear(x, w, b)
    grads_ours = torch.autograd.grad((ours * dy).sum(), [x, w] + ([b] if bias else []))
    ref = F.linear(x, w, b)
    grads_ref = torch.autograd.grad((ref * dy).sum(), [x, w] + ([b] if bias else []))
    assert ours.shape == ref.shape and torch.allclose(ours, ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(grads_ours, grads_ref):
        assert torch.allclose(a, r, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not kernels.available(), reason="mmchat's C kernels are not built here")
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_team_gemm_gives_torch_products(threads):
    """Every transpose combination, C split by columns (wide) and by rows (tall), spans that do not divide into the
    threads' multiples of 16, and fewer rows than threads."""
    g = torch.Generator().manual_seed(threads)
    for M, N, K in [(37, 200, 24), (300, 50, 17), (5, 3, 9), (1, 70, 33)]:
        for trans_a in (False, True):
            for trans_b in (False, True):
                a = torch.randn(*((K, M) if trans_a else (M, K)), generator=g)
                b = torch.randn(*((N, K) if trans_b else (K, N)), generator=g)
                out = torch.full((M, N), float("nan"))
                sgemm(a, b, trans_a, trans_b, out, threads)
                ref = (a.T if trans_a else a) @ (b.T if trans_b else b)  # (M, N)
                assert torch.allclose(out, ref, rtol=1e-5, atol=1e-4), (M, N, K, trans_a, trans_b)


@pytest.mark.skipif(not kernels.available(), reason="mmchat's C kernels are not built here")
@pytest.mark.parametrize("frozen_head", [False, True])
def test_head_and_loss_together_give_cross_entropys_values_and_gradients(frozen_head):
    g = torch.Generator().manual_seed(1)
    hidden = (3 * torch.randn(37, 48, generator=g)).requires_grad_()  # (N, d)
    weight = torch.randn(1003, 48, generator=g).requires_grad_(not frozen_head)  # (V, d): V not a multiple of 8
    targets = torch.randint(0, 1003, (37,), generator=g)
    upstream = torch.rand(37, generator=g)  # a weight per row, as a loss averaged over other counts gives
    ours = head_nll(hidden, weight, targets)
    ref = F.cross_entropy(hidden @ weight.T, targets, reduction="none")
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-5)
    inputs = [hidden] if frozen_head else [hidden, weight]
    for a, r in zip(torch.autograd.grad((ours * upstream).sum(), inputs),
                    torch.autograd.grad((ref * upstream).sum(), inputs)):
        assert torch.allclose(a, r, rtol=1e-4, atol=1e-5)
    none = head_nll(hidden[:0], weight, targets[:0])  # no loss positions: an empty loss, zero gradients
    assert none.shape == (0,) and all(torch.count_nonzero(d) == 0
                                      for d in torch.autograd.grad(none.sum(), inputs))


def values_and_grads(fn, inputs, upstream):
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o * u).sum() for o, u in zip(outs, upstream))
    return outs, torch.autograd.grad(loss, [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad])


@pytest.mark.skipif(not kernels.available(), reason="mmchat's C kernels are not built here")
def test_fused_layers_give_torchs_values_and_gradients():
    """RMSNorm, SwiGLU, RoPE with the heads' layout, and causal grouped-query attention, against the module path's
    tensor ops (shapes whose rows do not divide into 8-float lanes where the kernels allow it, and a sequence
    longer than one block of 64 queries that does not end on a block)."""
    g = torch.Generator().manual_seed(2)
    B, T, nh, nkv, hs = 2, 7, 6, 2, 32

    def check(ours, ref, inputs, out_shapes):
        upstream = [torch.randn(*s, generator=g) for s in out_shapes]
        (o, go), (r, gr) = values_and_grads(ours, inputs, upstream), values_and_grads(ref, inputs, upstream)
        for a, b in zip(o + go, r + gr):
            assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5)

    x = torch.randn(B, T, 75, generator=g).requires_grad_()  # d = 75
    w = (1 + 0.1 * torch.randn(75, generator=g)).requires_grad_()
    check(lambda x, w: RMSNormFn.apply(x, w, 1e-5), lambda x, w: F.rms_norm(x, (75,), w, 1e-5), [x, w], [(B, T, 75)])

    h = (3 * torch.randn(B, T, 2 * 37, generator=g)).requires_grad_()  # [gate | up], f = 37
    check(SwiGLUFn.apply, lambda h: F.silu(h[..., :37]) * h[..., 37:], [h], [(B, T, 37)])

    cos, sin = rope_tables(hs, 64, 10000.0)  # (64, hs) each
    pos = torch.randint(0, 64, (B, T), generator=g)  # each row its own positions
    qkv = torch.randn(B, T, (nh + 2 * nkv) * hs, generator=g).requires_grad_()

    def reference(qkv):
        heads = qkv.view(B, T, nh + 2 * nkv, hs).transpose(1, 2)  # (B, H, T, hs)
        qk = apply_rope(heads[:, :nh + nkv], cos[pos].unsqueeze(1), sin[pos].unsqueeze(1))
        return qk[:, :nh], qk[:, nh:], heads[:, nh + nkv:]
    check(lambda qkv: RopeHeads.apply(qkv, cos[pos], sin[pos], nh, nkv), reference, [qkv],
          [(B, nh, T, hs), (B, nkv, T, hs), (B, nkv, T, hs)])

    for T in (7, 150):
        q, k, v = (torch.randn(B, n, T, hs, generator=g).requires_grad_() for n in (nh, nkv, nkv))
        check(CausalAttention.apply, lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2).reshape(B, T, nh * hs), [q, k, v],
            [(B, T, nh * hs)])


def test_frozen_weight_gets_no_gradient_product():
    x = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(4, 16)  # frozen, as LoRA's base weights
    y = blas_linear(x, w)
    y.sum().backward()
    assert w.grad is None and torch.allclose(x.grad, w.sum(0).expand(8, 16), atol=1e-5)


def nll_and_grads(model, x, y, blas: bool):
    model.zero_grad(set_to_none=True)
    with CpuStep(model).swapped() if blas else contextlib.nullcontext():
        logits = model(x)  # (B, T, V)
    loss = ChunkedNLL.apply(logits.flatten(0, 1), y.flatten()).mean()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lora", [False, True])
def test_swapped_model_gives_torch_loss_and_gradients(lora):
    """A whole llama-style model (tied head, fused Q/K/V and gate/up): the same loss and parameter gradients with
    the swapped matmuls as with torch's, and afterwards the modules are the plain ones again."""
    torch.manual_seed(0)
    model = Transformer(CONFIGS["tiny"]).train()
    if lora:
        apply_lora(model, rank=4, alpha=8, targets="q,k,v,o")
        for p in model.parameters():
            if p.requires_grad:
                p.data.normal_(0, 0.05)  # B = 0 at the start would hide the adapters' gradients
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randint(0, 512, (2, 2, 40)).unbind(0)  # (B, T) each
    loss_ref, grads_ref = nll_and_grads(model, x, y, blas=False)
    loss_ours, grads_ours = nll_and_grads(model, x, y, blas=True)
    assert loss_ours == pytest.approx(loss_ref, rel=1e-6)
    assert grads_ours.keys() == grads_ref.keys() and len(grads_ref) > 0
    for name, g in grads_ref.items():
        assert torch.allclose(grads_ours[name], g, rtol=1e-4, atol=1e-6), name
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not any("forward" in vars(m) for m in model.modules())  # the swap is undone


def test_training_curve_matches_torch_matmuls(tmp_path, monkeypatch):
    cfg = dict(max_steps=4, batch_size=4, seq_len=32, lr=3e-3, min_lr=3e-4, warmup_steps=1, eval_every=0,
               eval_batches=2, save_every=0, progress=False, seed=7)
    monkeypatch.setenv("MMCHAT_BLAS", "torch")
    ref = pretrain("tiny", [CORPUS], tmp_path / "torch", TrainConfig(**cfg))
    monkeypatch.setenv("MMCHAT_BLAS", "openblas")
    ours = pretrain("tiny", [CORPUS], tmp_path / "openblas", TrainConfig(**cfg))
    assert [h["loss"] for h in ours["history"]] == pytest.approx([h["loss"] for h in ref["history"]], rel=1e-5)


def test_choice(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("MMCHAT_BLAS", "openblas")
    assert use_openblas(cpu, bf16=False, compiled=False)
    assert not use_openblas(cpu, bf16=True, compiled=False)  # autocast's bf16 matmuls stay torch's
    assert not use_openblas(cpu, bf16=False, compiled=True)
    monkeypatch.setenv("MMCHAT_BLAS", "torch")
    assert not use_openblas(cpu, bf16=False, compiled=False)
    monkeypatch.setenv("MMCHAT_BLAS", "mkl")
    with pytest.raises(MMChatError, match="MMCHAT_BLAS must be auto, torch or openblas"):
        use_openblas(cpu, bf16=False, compiled=False)
