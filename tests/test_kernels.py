"""mmchat's own quantized matmuls (csrc/qmatmul.c) against float math on the same blocks, and the fused decode
step against the module-by-module one."""
import copy

import pytest
import torch

from mmchat import kernels
from mmchat import quantize as Q
from mmchat.config import ModelConfig
from mmchat.generate import SamplingParams, generate_ids
from mmchat.model import Transformer

pytestmark = pytest.mark.skipif(not kernels.available(), reason="mmchat's kernels need an x86-64 CPU with AVX2 "
                                "and a C compiler (cc/gcc/clang); torch's kernels are used instead")


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("rows", [1, 3, 8, 11])
def test_block_matmuls_match_float_math_on_the_same_blocks(rows):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 128, generator=g)
    x = torch.randn(rows, 128, generator=g)
    q4 = Q.BlockQ4Linear(128, 96, False, torch.float32)
    Q.fill(q4, w, None, torch.float32)
    q8 = Q.BlockQ8Linear(128, 96, False, torch.float32)
    Q.fill(q8, w, None, torch.float32)
    for lin, tol in ((q4, 0.02), (q8, 0.02)):
        exact = x @ lin.dequantize(torch.float32).t()  # the blocks' own weights, float math
        assert _rel(lin(x), exact) < tol  # only the activations' int8 rounding differs
        assert _rel(lin(x), x @ w.t()) < (0.15 if lin is q4 else 0.02)  # and the weights' rounding
    # a prompt's many rows: chunks of 8 rows on the kernel (or the bf16 copy where the CPU has bf16 GEMMs)
    many = torch.randn(300, 128, generator=g)
    assert _rel(q4(many), many @ q4.dequantize(torch.float32).t()) < 0.02


def test_q4_tiles_hold_the_blocks_exactly_and_a_row_is_the_same_alone_or_batched():
    """BlockQ4Linear keeps W's rows interleaved in tiles of 8: the layout loses nothing, and each output is the
    same chain of block FMAs whether its activation row comes alone or among others (seeded sampling under
    batching depends on it)."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(40, 96, generator=g)
    q, scale, low = Q.int4_groups(w)
    lin = Q.BlockQ4Linear(96, 40, False, torch.float32)
    Q.fill(lin, w, None, torch.float32)
    scale, low = scale.half().float(), low.half().float()  # kept in float16, like GGUF's blocks
    blocks = (q.float().view(40, 3, 32) * scale[..., None] + low[..., None]).view(40, 96)
    assert torch.equal(lin.dequantize(torch.float32), blocks)
    x = torch.randn(11, 96, generator=g)
    assert torch.equal(lin(x), torch.cat([lin(x[i:i + 1]) for i in range(11)]))
    assert _rel(lin(x), x @ blocks.t()) < 0.02


def _tiny_llama(seed=0):
    cfg = ModelConfig(arch="llama", vocab_size=160, n_layer=3, d_model=64, n_head=4, n_kv_head=2, d_ff=128,
                      max_seq_len=96, tie_embeddings=True)
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
        for layer in model.layers:
            layer.attn_norm.weight.fill_(1.0), layer.mlp_norm.weight.fill_(1.0)
    return Q.quantize(model, "int4")


def _float_copy(model):
    """The same model with every quantized projection as a float nn.Linear of its own dequantized weights."""
    ref = copy.deepcopy(model)
    for layer in ref.layers:
        for parent in (layer.attn, layer.mlp):
            for name, mod in list(parent.named_children()):
                if isinstance(mod, Q.BlockQ4Linear):
                    lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=False)
                    lin.weight.data = mod.dequantize(torch.float32)
                    setattr(parent, name, lin)
    return ref


def test_fused_blocks_step_equals_the_module_by_module_step():
    """Rows at different positions in other cache rows: the fused step writes the same keys and values (in
    float16) and its logits are as close to float math on the same weights as the module-by-module step's (both
    round the activations to int8 per block, so tiny float differences upstream can round one value the other
    way)."""
    model = _tiny_llama()
    assert kernels.fused_blocks_ok(model)
    reference = _float_copy(model)
    fused = kernels.FusedBlocks(model)
    B, T = 3, 9
    tokens = torch.randint(0, 160, (B, T), generator=torch.Generator().manual_seed(1))
    step = torch.tensor([[5], [77], [12]])
    pos = torch.tensor([[9], [4], [7]])  # rows at different positions (as if their prompts were shorter)
    rows = torch.tensor([2, 0, 1])  # and in other cache rows
    outs = []
    with torch.inference_mode():
        for net, run in ((reference, None), (model, None), (model, fused)):
            model.fused_blocks = run
            net.setup_cache(4, 40)
            net(tokens, torch.arange(T).expand(B, T), cache_rows=rows)
            outs.append((net(step, pos, cache_rows=rows)[:, -1], net.layers[0].attn.cache))
    (exact, _), (eager, eager_cache), (got, got_cache) = outs
    assert got_cache.k.dtype == torch.float16 and eager_cache.k.dtype == torch.float32
    for got_kv, eager_kv in ((got_cache.k, eager_cache.k), (got_cache.v, eager_cache.v)):  # float16's rounding
        assert torch.allclose(got_kv.float(), eager_kv, rtol=2 ** -10, atol=1e-5)
    eager_err, fused_err = (eager - exact).abs().max(), (got - exact).abs().max()
    assert eager_err < 0.2 and fused_err < 1.5 * eager_err + 1e-3, (eager_err, fused_err)
    assert (got - eager).abs().max() < 0.1


def test_fused_step_does_not_depend_on_the_batch_and_generation_follows_the_eager_tokens():
    """Each row is computed on its own (its own activation scales, its own attention): a row stepped in a batch
    gives exactly the logits it gives alone. Greedy generation through the fused step follows the
    module-by-module tokens (not all: near-ties of a tiny random model flip with int8 rounding)."""
    model = _tiny_llama(seed=3)
    prompts = [[5, 17, 99, 3], [7, 7, 1], [150, 4, 4, 4, 4, 9]]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    eager = generate_ids(model, prompts, params)
    model.fused_blocks = kernels.FusedBlocks(model)
    with torch.inference_mode():
        model.setup_cache(3, 32)
        model(torch.randint(0, 160, (3, 6)), torch.arange(6).expand(3, 6))
        step, pos = torch.tensor([[3], [9], [27]]), torch.tensor([[6], [4], [5]])
        together = model(step, pos)[:, -1]  # (3, V); the step writes each row's own slot only
        alone = torch.cat([model(step[i:i + 1], pos[i:i + 1], cache_rows=torch.tensor([i]))[:, -1] for i in range(3)])
    assert torch.equal(together, alone)
    fused = generate_ids(model, prompts, params)
    same = sum(a == b for e, f in zip(eager, fused) for a, b in zip(e, f))
    assert same >= 0.5 * sum(map(len, eager))


def test_a_prompt_through_the_fused_blocks_matches_the_module_path_and_is_the_same_chunked_or_stepped():
    """A prompt is many rows of one sequence in one call (causal attention over the keys it has just written):
    its logits are as close to float math as the module path's, and every row's result is the one it gets
    prefilled in chunks or decoded token by token, bit for bit (each row's arithmetic is its own)."""
    model = _tiny_llama(seed=5)
    reference = _float_copy(model)
    fused = kernels.FusedBlocks(model)
    fused.most_rows = None  # every prompt here, also where long ones would take the bf16 copies
    tokens = torch.randint(0, 160, (2, 37), generator=torch.Generator().manual_seed(2))  # 37: tiles of 32 and 5
    pos = torch.arange(37).expand(2, 37)
    with torch.inference_mode():
        outs = []
        for net, run in ((reference, None), (model, None), (model, fused)):
            model.fused_blocks = run
            net.setup_cache(2, 48)
            outs.append(net(tokens, pos))  # (2, 37, V)
        exact, eager, whole = outs
        eager_err, fused_err = (eager - exact).abs().max(), (whole - exact).abs().max()
        assert eager_err < 0.2 and fused_err < 1.5 * eager_err + 1e-3, (eager_err, fused_err)
        model.setup_cache(2, 48)
        chunked = torch.cat([model(tokens[:, a:b], pos[:, a:b]) for a, b in ((0, 20), (20, 36), (36, 37))], dim=1)
        assert torch.equal(chunked, whole)
        model.setup_cache(2, 48)
        model(tokens[:, :30], pos[:, :30])
        stepped = torch.cat([model(tokens[:, t:t + 1], pos[:, t:t + 1]) for t in range(30, 37)], dim=1)
        assert torch.equal(stepped, whole[:, 30:])
        with pytest.raises(ValueError, match="past the cache"):
            model(tokens[:, :1], torch.tensor([[48], [3]]))


@pytest.mark.slow
def test_smollm2_decodes_through_the_fused_step_within_2_percent_of_float32(smollm2_path):
    """The embedded model as `mmchat chat` loads it (Q4_1 blocks, fused decode step), reading an English text
    one token per step: perplexity at most 2% above float32's read the same way with no quantization, read the same way."""
    import math

    import mmchat
    from importlib.resources import files
    fast = mmchat.load(str(smollm2_path), progress=False)
    assert fast.model.fused_blocks is not None
    exact = mmchat.load(str(smollm2_path), progress=False, quant="none", dtype="float32")
    ids = fast.encode(files("mmchat").joinpath("data/tiny_corpus.txt").read_text())[:400]  # English prose

    def stepwise_ppl(model):
        model.setup_cache(1, len(ids))
        nll = 0.0
        with torch.inference_mode():
            model(torch.tensor([ids[:8]]), torch.arange(8)[None])
            for i in range(8, len(ids) - 1):
                logits = model(torch.tensor([[ids[i]]]), torch.tensor([[i]]))[0, -1].float()
                nll -= float(logits.log_softmax(-1)[ids[i + 1]])
        model.clear_cache()
        return math.exp(nll / (len(ids) - 9))

    ratio = stepwise_ppl(fast.model) / stepwise_ppl(exact.model)
    assert 0.95 < ratio < 1.02, ratio  # no more than 2% worse (int8 rounding noise can also make it lower)


@pytest.mark.slow
def test_a_process_without_the_kernels_does_not_reuse_their_converted_weights(smollm2_path, tmp_path):
    """The converted-weights cache holds the layout of the kernels that made it: a process where mmchat's
    kernels are off (MMCHAT_KERNELS=torch, as where no compiler is found) converts for torch's kernels and
    chats, even when an entry made for mmchat's kernels is already there."""
    import os
    import subprocess
    import sys
    script = ("import mmchat; llm = mmchat.load({path!r}, progress=False); "
              "print(type(llm.model.layers[0].mlp.w_up).__name__, llm.model.fused_blocks is not None); "
              "print(llm.generate('The capital of France is', max_tokens=4, temperature=0).strip())")
    env = dict(os.environ, MMCHAT_HOME=str(tmp_path), MMCHAT_THREADS="1")
    for kernels_env, kind in ((None, "BlockQ4Linear True"), ("torch", "Int4Linear False")):
        run_env = dict(env, **({"MMCHAT_KERNELS": kernels_env} if kernels_env else {}))
        out = subprocess.run([sys.executable, "-c", script.format(path=str(smollm2_path))], env=run_env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        lines = out.stdout.splitlines()
        assert lines[0] == kind and "Paris" in lines[1], out.stdout
