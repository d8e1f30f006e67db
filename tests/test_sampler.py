"""The sampler against distributions written out by hand: top_k, top_p (both the candidate path and the
whole-vocabulary fallback), min_p, penalties, greedy rows in a sampled batch, and per-row seeds."""
import pytest
import torch

from mmchat import kernels
from mmchat.generate import CANDIDATES, Sampler, SamplingParams

V = 1000  # more than CANDIDATES, so the candidate shortcut is really a shortcut


def draws(logits: torch.Tensor, params: SamplingParams, n: int = 4000) -> torch.Tensor:
    """n independent samples from one row of logits (V,): n rows, each with its own seed."""
    ps = [SamplingParams(**{**params.__dict__, "seed": i}) for i in range(n)]
    return Sampler(ps, V, "cpu").sample(logits.expand(n, V))


def nucleus(probs: torch.Tensor, top_p: float) -> set[int]:
    """The smallest set of most likely tokens whose probability reaches top_p, by a plain loop."""
    kept, total = set(), 0.0
    for p, i in sorted(zip(probs.tolist(), range(len(probs))), reverse=True):
        if total >= top_p:
            break
        kept.add(i)
        total += p
    return kept


def assert_follows(samples: torch.Tensor, probs: torch.Tensor, allowed: set[int]):
    """Every sample is allowed, and each allowed token comes up about as often as its renormalized probability."""
    assert set(samples.tolist()) <= allowed
    target = torch.zeros(V)
    target[list(allowed)] = probs[list(allowed)]
    target /= target.sum()
    freq = torch.bincount(samples, minlength=V).float() / len(samples)
    assert (freq - target).abs().max() < 0.04, (freq - target).abs().max()


def peaked_logits(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(V, generator=g) * 0.5 - 3
    logits[:6] = torch.tensor([6.0, 5.5, 5.0, 4.0, 3.0, 2.5])  # a few likely tokens, a long flat tail
    return logits


def test_top_p_within_the_candidates():
    logits = peaked_logits()
    probs = (logits / 0.8).softmax(-1)
    assert probs.topk(CANDIDATES).values.sum() > 0.9  # the shortcut applies
    s = draws(logits, SamplingParams(temperature=0.8, top_p=0.9))
    assert_follows(s, probs, nucleus(probs, 0.9))


def test_top_p_on_a_flat_distribution_falls_back_to_the_whole_vocabulary():
    logits = torch.linspace(0, 1, V)  # nearly uniform: CANDIDATES tokens hold far less than top_p
    probs = logits.softmax(-1)
    assert probs.topk(CANDIDATES).values.sum() < 0.5
    s = draws(logits, SamplingParams(temperature=1.0, top_p=0.7), n=3000)
    allowed = nucleus(probs, 0.7)
    assert set(s.tolist()) <= allowed
    assert len(set(s.tolist())) > 0.8 * len(allowed)  # not cut down to the candidates


def test_top_k_and_min_p():
    logits = peaked_logits(1)
    probs = logits.softmax(-1)
    s = draws(logits, SamplingParams(temperature=1.0, top_k=3))
    assert_follows(s, probs, {0, 1, 2})
    # min_p 0.1: keep tokens at least a tenth as likely as the most likely one (e^-2 = 0.135 > 0.1 > e^-3)
    s = draws(logits, SamplingParams(temperature=1.0, min_p=0.1))
    assert_follows(s, probs, {0, 1, 2, 3})


def test_penalties_match_their_formulas():
    logits = torch.randn(2, V) * 2
    p = SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25)
    sampler = Sampler([p, SamplingParams()], V, "cpu")
    sampler.observe_prompt(0, [5, 6])
    for t in ([7, 1], [7, 2], [5, 3]):  # row 0 generates 7, 7, 5
        sampler.observe(torch.tensor(t))
    out = sampler.penalize(logits.clone())
    want = logits[0].clone()
    for tid in (5, 6, 7):
        want[tid] = want[tid] / 1.3 if want[tid] > 0 else want[tid] * 1.3
    want[7] -= 0.5 + 0.25 * 2
    want[5] -= 0.5 + 0.25 * 1
    torch.testing.assert_close(out[0], want)
    torch.testing.assert_close(out[1], logits[1])  # the other row's settings leave it alone


@pytest.mark.skipif(not kernels.available(), reason="mmchat's CPU kernels need x86-64 with AVX2 and a C compiler")
def test_the_penalty_kernel_gives_the_tensor_paths_floats(monkeypatch):
    """Sampler.penalize on mmchat's CPU kernel: bit for bit the tensor path's result, for a subset of rows in
    another order, with every penalty and a logit bias."""
    ps = [SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25, logit_bias={3: 1.5}),
          SamplingParams(), SamplingParams(repetition_penalty=0.8, logit_bias={9: -100.0}),
          SamplingParams(frequency_penalty=-0.7)]
    sampler = Sampler(ps, V, "cpu")
    g = torch.Generator().manual_seed(4)
    for row in range(4):
        sampler.observe_prompt(row, torch.randint(0, V, (30,), generator=g).tolist())
    for _ in range(20):
        sampler.observe(torch.randint(0, V, (4,), generator=g))
    logits = torch.randn(3, V, generator=g) * 3
    fast = sampler.penalize(logits, [3, 0, 2])
    monkeypatch.setattr(kernels, "available", lambda: False)
    assert torch.equal(fast, sampler.penalize(logits, [3, 0, 2]))
    assert not torch.equal(fast, logits)


def test_a_rows_tokens_depend_only_on_its_seed_not_its_neighbours():
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=42)

    def run(params, row, steps=30):
        sampler, out = Sampler(params, V, "cpu"), []
        for k in range(steps):
            batch = torch.stack([peaked_logits(100 + 10 * k + j) for j in range(len(params))])  # (B, V)
            batch[row] = peaked_logits(k).roll(k)  # the seeded row sees the same logits in every run
            tokens = sampler.sample(batch)
            for j, p in enumerate(params):
                if p.temperature == 0:
                    assert tokens[j] == batch[j].argmax()
            out.append(tokens[row].item())
        return out

    alone = run([seeded], 0)
    assert len(set(alone)) > 3  # really sampled
    assert run([SamplingParams(temperature=0), seeded, SamplingParams(temperature=1.2, seed=1),
                SamplingParams(temperature=0.5, top_k=5)], 1) == alone
    assert run([SamplingParams(temperature=0.9, top_p=0.95, seed=43)], 0) != alone


def test_inverting_a_long_row_by_blocks_picks_what_the_whole_cumulative_sum_picks():
    """_invert_cdf sums long rows block by block first: the same index as the first one whose float64 cumulative
    sum exceeds u times the total, and never a zero-weight entry (rows with many zeros, as top_p leaves them)."""
    from mmchat.generate import _invert_cdf
    g = torch.Generator().manual_seed(0)
    for n in (300, 5000, 49152, 257 * 7):
        w = torch.softmax(torch.randn(16, n, generator=g) * 5, -1)
        w[torch.rand(16, n, generator=g) < 0.5] = 0.0
        u = torch.rand(16, generator=g, dtype=torch.float64)
        cum = w.double().cumsum(-1)
        expected = torch.searchsorted(cum, (u * cum[:, -1])[:, None], right=True)[:, 0]
        got = _invert_cdf(w, u)
        assert torch.equal(got, expected)
        assert (w.gather(1, got[:, None]) > 0).all()
    w = torch.softmax(torch.randn(2, 49152, generator=g), -1)
    ends = _invert_cdf(w, torch.tensor([0.0, 1 - 1e-16], dtype=torch.float64))
    assert ends.tolist() == [0, 49151]


@pytest.mark.skipif(not kernels.available(), reason="mmchat's CPU kernels need x86-64 with AVX2 and a C compiler")
def test_the_kernels_draw_picks_what_sample_picks_and_reports_the_models_logprobs():
    """Sampler.draw runs rows without a constraint through mmchat's CPU kernel: from the same seeds it picks the
    tokens `sample` picks (greedy rows, temperatures, a logit_bias, top_k, top_p on peaked and on flat rows,
    min_p), follows softmax((logits + bias) / T), never draws a -inf token, and reports log_softmax of the
    model's own logits."""
    truncations = [{}, {}, {}, {"top_p": 0.9}, {"top_k": 5}, {"top_p": 0.95}, {"min_p": 0.1},
                   {"top_k": 40, "top_p": 0.8, "min_p": 0.05}]
    mixed = [SamplingParams(temperature=t, seed=100 + i, logit_bias={1: -100.0, 7: 2.0} if i % 2 else {}, **cut)
             for i, (t, cut) in enumerate(zip([0.7, 1.0, 0.0, 1.3, 0.7, 2.0, 1.0, 0.5], truncations))]
    fast, reference = Sampler(mixed, V, "cpu"), Sampler(mixed, V, "cpu")
    for k in range(60):
        logits = torch.stack([peaked_logits(10 * k + j).roll(k + j) for j in range(len(mixed))])  # (8, V)
        logits[:, 500:510] = float("-inf")
        tokens, logprobs = fast.draw(logits)
        assert torch.equal(tokens, reference.sample(logits))
        assert not (500 <= tokens).logical_and(tokens < 510).any()
        expected = logits.log_softmax(-1).gather(1, tokens[:, None])[:, 0]
        assert torch.allclose(logprobs, expected, atol=1e-5)
    logits = peaked_logits(3)
    params = SamplingParams(temperature=0.8, logit_bias={0: -1.0, 3: 1.5})
    ps = [SamplingParams(**{**params.__dict__, "seed": i}) for i in range(4000)]
    samples, _ = Sampler(ps, V, "cpu").draw(logits.expand(4000, V))
    biased = logits.clone()
    biased[0] -= 1.0
    biased[3] += 1.5
    assert_follows(samples, (biased / 0.8).softmax(-1), set(range(V)))
