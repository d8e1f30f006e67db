"""The Transformer on its own: the fast attention path equals softmax(QK^T/sqrt(d_k))V written out, cached
decoding equals a full forward pass, and batching prompts of different lengths changes nothing."""
import math

import pytest
import torch
import torch.nn.functional as F

from mmchat.config import ModelConfig
from mmchat.generate import SamplingParams, generate_ids
from mmchat.model import Transformer, attention_reference

SHAPES = {
    "llama-gqa": dict(arch="llama", n_head=4, n_kv_head=2),
    "llama-mha": dict(arch="llama", n_head=4, n_kv_head=4),
    "gpt2": dict(arch="gpt2", n_head=4, n_kv_head=4, attn_bias=True, mlp_bias=True),
}


def tiny_model(kind: str, seed: int = 0) -> Transformer:
    cfg = ModelConfig(vocab_size=97, n_layer=2, d_model=32, d_ff=64, max_seq_len=64, **SHAPES[kind])
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():  # a wider spread than the default init, so logits are far from uniform
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() >= 2 else p.normal_(1.0 if p.numel() == cfg.d_model else 0.0, 0.1)
    return model.eval()


def looped_attention(q, k, v, causal_offset):
    """softmax(q.k / sqrt(d)) v one query at a time, with plain Python loops: the formula with nothing fused."""
    B, H, T, D = q.shape
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                visible = t + causal_offset + 1  # this query sees keys 0 .. its own position
                scores = torch.stack([q[b, h, t] @ k[b, h, s] for s in range(visible)]) / math.sqrt(D)
                w = torch.exp(scores - scores.max())
                w = w / w.sum()
                out[b, h, t] = sum(w[s] * v[b, h, s] for s in range(visible))
    return out


@pytest.mark.parametrize("T,S", [(5, 5), (3, 7), (1, 6)])
def test_reference_attention_is_the_formula(T, S):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, T, 8), torch.randn(2, 3, S, 8), torch.randn(2, 3, S, 8)
    out, weights = attention_reference(q, k, v)
    assert torch.allclose(out, looped_attention(q, k, v, S - T), atol=1e-5)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 3, T))
    assert (weights.triu(S - T + 1) == 0).all()  # causal: nothing from the future


@pytest.mark.parametrize("n_head,n_kv", [(4, 4), (4, 2), (6, 1)])
def test_sdpa_equals_reference_attention(n_head, n_kv):
    """The fused kernel as the model calls it (causal, or an explicit cache mask; GQA without repeating K/V)."""
    torch.manual_seed(1)
    B, T, S, D = 2, 5, 9, 16
    q = torch.randn(B, n_head, T, D)
    k, v = torch.randn(B, n_kv, S, D), torch.randn(B, n_kv, S, D)
    g = n_head // n_kv
    k_rep, v_rep = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    # causal over T of T keys
    fast = F.scaled_dot_product_attention(q, k[:, :, :T], v[:, :, :T], is_causal=True, enable_gqa=g > 1)
    ref, _ = attention_reference(q, k_rep[:, :, :T], v_rep[:, :, :T])
    assert torch.allclose(fast, ref, atol=1e-5)
    # a cache mask: row b's queries sit at positions start_b .. start_b+T-1 of S slots
    starts = torch.tensor([0, 4])
    pos = starts[:, None] + torch.arange(T)  # (B, T)
    mask = (torch.arange(S)[None, None, :] <= pos[:, :, None]).unsqueeze(1)  # (B, 1, T, S)
    fast = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=g > 1)
    ref, _ = attention_reference(q, k_rep, v_rep, mask)
    assert torch.allclose(fast, ref, atol=1e-5)


@pytest.mark.parametrize("kind", list(SHAPES))
@pytest.mark.parametrize("cached", [False, True])
def test_model_fast_path_equals_reference_path(kind, cached):
    model = tiny_model(kind)
    tokens = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(2))
    if cached:
        model.setup_cache(3, 20)
    fast = model(tokens)  # (B, T, V)
    model.set_reference_attention(True)
    ref = model(tokens)
    weights = model.layers[0].attn.last_weights  # (B, nh, T, S)
    model.set_reference_attention(False)
    model.clear_cache()
    assert torch.allclose(fast, ref, atol=1e-4), (fast - ref).abs().max()
    assert fast.std() > 1.0  # logits far from uniform, so the comparison means something
    assert weights.shape[:3] == (3, model.cfg.n_head, 11) and torch.allclose(weights.sum(-1), torch.ones(3, 4, 11))


@pytest.mark.parametrize("kind", list(SHAPES))
@pytest.mark.parametrize("reference", [False, True])
def test_cached_decoding_equals_full_forward(kind, reference):
    """Prefill 4 tokens, then feed the rest one by one through the KV cache: every step's logits equal the
    full forward pass at that position."""
    model = tiny_model(kind)
    model.set_reference_attention(reference)
    B, T = 2, 12
    tokens = torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(tokens)  # (B, T, V)
        model.setup_cache(B, 32)
        steps = [model(tokens[:, :4], torch.arange(4).expand(B, 4))]
        for t in range(4, T):
            steps.append(model(tokens[:, t:t + 1], torch.full((B, 1), t)))
        model.clear_cache()
    cached = torch.cat(steps, dim=1)  # (B, T, V)
    assert torch.allclose(cached, full, atol=1e-4), (cached - full).abs().max()


@pytest.mark.parametrize("kind", list(SHAPES))
def test_batched_prompts_equal_each_alone(kind):
    """Prompts of 1, 6 and 17 tokens decoded in one batch give the same greedy tokens as decoded alone."""
    model = tiny_model(kind, seed=4)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (6, 17, 1)]
    params = SamplingParams(temperature=0, max_tokens=20)
    batched = generate_ids(model, prompts, params)
    alone = [generate_ids(model, [p], params)[0] for p in prompts]
    assert batched == alone
    assert all(len(a) == 20 for a in alone)
    assert len({tuple(a) for a in alone}) == 3  # different prompts, different continuations

    # the same at the logits level: right-padded prefill, each row read at its own last position
    with torch.no_grad():
        padded = torch.zeros(3, 17, dtype=torch.long)
        for i, p in enumerate(prompts):
            padded[i, :len(p)] = torch.tensor(p)
        last = model(padded, output_index=torch.tensor([len(p) - 1 for p in prompts]))[:, 0]  # (B, V)
        for i, p in enumerate(prompts):
            assert torch.allclose(last[i], model(torch.tensor([p]))[0, -1], atol=1e-4)


def test_embeddings_input_equals_token_input():
    model = tiny_model("llama-gqa")
    tokens = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(model(tokens), model(embeds=model.embed(tokens)))


def test_cache_longer_than_context_is_refused():
    model = tiny_model("gpt2")
    with pytest.raises(ValueError, match="context window"):
        model.setup_cache(1, 65)
