"""Weight-only quantization, GGUF blocks kept, the converted-weights cache and the machine-dependent choices.
Kernels against the float math they stand for; the real model's perplexity on every fast path against the
float32 reference; greedy output of the exact path unchanged."""
import math

import numpy as np
import pytest
import torch

from mmchat import quantize as Q
from mmchat import threads
from mmchat.errors import MMChatError

# A fixed English text (about 250 tokens) for perplexity.
TEXT = (
    "The old lighthouse stood at the edge of the cliff, its white paint peeling after a hundred winters. "
    "Every evening the keeper climbed the spiral stairs, one hundred and twelve steps, to light the lamp. "
    "Ships passing in the night saw the beam sweep across the water and knew they were close to the rocks. "
    "When the electric light arrived in the village, people said the keeper would no longer be needed, "
    "but he kept climbing the stairs anyway, because the sea does not care about progress. "
    "Scientists study the ocean to understand how heat moves around the planet. Warm water from the tropics "
    "flows north along the surface, cools, sinks, and returns south in the deep. This slow circulation "
    "takes about a thousand years to complete, and it shapes the climate of every continent. "
    "In the kitchen, the recipe called for two cups of flour, a pinch of salt, three eggs and a cup of milk. "
    "Mix the dry ingredients first, then add the eggs one at a time, stirring gently until the batter is smooth."
)


def test_int4_unpacking_matches_the_kernel_layout_and_prefill_path():
    assert Q.unpack_int4_ok()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(192, 96, generator=g)
    q, s, m = Q.int4_groups(w)
    assert q.max() <= 15 and ((q.float().view(192, 3, 32) * s[..., None] + m[..., None]).view(192, 96) - w).abs().max() \
        <= s.max() / 2 + 1e-6  # round to nearest: half a step at most
    lin = Q.Int4Linear(96, 192, False, torch.float32)
    lin.weight, lin.scales_and_zeros = Q.pack_int4(q, s, m, torch.float32)
    deq = (q.float().view(192, 3, 32) * s[..., None] + m[..., None]).view(192, 96)
    assert torch.allclose(lin.dequantize(torch.float32), deq, atol=1e-5)
    x_decode, x_prefill = torch.randn(2, 96, generator=g), torch.randn(Q.PREFILL_ROWS + 3, 96, generator=g)
    for x in (x_decode, x_prefill):  # kernel path and dequantize-then-GEMM path
        assert torch.allclose(lin(x), x @ deq.T, atol=1e-3, rtol=1e-4)


def test_int8_paths_match_float_math():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(128, 64, generator=g) * torch.linspace(0.1, 3, 128)[:, None]
    q, s = Q.int8_rows(w)
    deq = q.float() * s[:, None]
    assert (deq - w).abs().max() < w.abs().max() / 127  # within one step of the coarsest row
    lin = Q.Int8Linear(64, 128, True, torch.float32)
    lin.weight, lin.scales, lin.bias = q, s, torch.nn.Parameter(torch.randn(128, generator=g))
    for rows in (1, Q.PREFILL_ROWS + 1):
        x = torch.randn(rows, 64, generator=g)
        assert torch.allclose(lin(x), x @ deq.T + lin.bias, atol=1e-3, rtol=1e-4)
    # grouped int8 as two int4 planes: exactly q * s, both paths
    qg, sg = Q.int8_groups(w)
    ref = (qg.float().view(128, 2, 32) * sg[..., None]).view(128, 64)
    two = Q.Int8x2Linear(64, 128, False, torch.float32)
    Q.fill(two, w, None, torch.float32)
    assert torch.allclose(two.dequantize(torch.float32), ref, atol=1e-6)
    for rows in (1, Q.PREFILL_ROWS + 1):
        x = torch.randn(rows, 64, generator=g)
        assert torch.allclose(two(x), x @ ref.T, atol=1e-3, rtol=1e-4)
    emb = Q.Int8Embedding(128, 64, torch.float32)
    emb.weight, emb.scales = qg, sg
    ids = torch.tensor([[0, 5, 127]])
    assert torch.allclose(emb(ids), ref[ids], atol=1e-6)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_gguf_q4_blocks_decode_like_gguf_py(kind):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    rng = np.random.default_rng(0)
    N, K = 4, 64
    head = 4 if kind == "Q4_1" else 2
    blocks = rng.integers(0, 256, size=(N, K // 32, head + 16), dtype=np.uint8)
    blocks[..., 0:2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)  # sane scales, not NaN
    if kind == "Q4_1":
        blocks[..., 2:4] = np.frombuffer(np.float16(-0.07).tobytes(), np.uint8)
    raw = blocks.reshape(N, -1)
    expected = dequantize(raw, GGMLQuantizationType[kind]).reshape(N, K)
    q, d, m = Q.q4_blocks(raw, kind, (N, K))
    ours = (q.float().view(N, K // 32, 32) * d[..., None] + m[..., None]).view(N, K).numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-6)


def test_choices_for_the_machine_and_bad_input():
    small, big = 1_000_000, 135_000_000
    assert Q.choose("cpu", None, "auto", small, lambda: True) == (torch.float32, None)
    dtype, quant = Q.choose("cpu", None, "auto", big, lambda: True)
    assert quant == "gguf" and dtype == (torch.bfloat16 if Q.cpu_has_bf16() else torch.float32)
    assert Q.choose("cpu", torch.float32, "auto", big, lambda: False) == (torch.float32, "int8")
    assert Q.choose("cpu", None, None, big, lambda: True)[1] is None
    assert Q.choose("cuda", None, "auto", big, lambda: True) == (torch.bfloat16, None)
    with pytest.raises(MMChatError, match="CPU only"):
        Q.choose("cuda", None, "int4", big, lambda: True)
    with pytest.raises(MMChatError, match="unknown quantization"):
        Q.parse_quant("int3")
    with pytest.raises(MMChatError, match="unknown dtype"):
        Q.parse_dtype("float8")
    assert Q.parse_dtype("bf16") is torch.bfloat16 and Q.parse_quant("none") is None
    assert threads.physical_cores() >= 1 and threads.choose_threads() >= 1


def test_many_rows_run_on_a_packed_bf16_copy_that_equals_the_quantized_weight(monkeypatch):
    if not Q.dense_ok() or not Q.unpack_int4_ok():
        pytest.skip("oneDNN packs bf16 weights only on CPUs with AVX-512 (or AVX-NE-CONVERT); this one has neither")
    monkeypatch.setattr(Q, "DENSE_ROWS", 16)
    g = torch.Generator().manual_seed(2)
    w = torch.randn(128, 96, generator=g)
    lin4 = Q.Int4Linear(96, 128, False, torch.bfloat16)
    lin4.weight, lin4.scales_and_zeros = Q.pack_int4(*Q.int4_groups(w), torch.bfloat16)
    lin8 = Q.Int8Linear(96, 128, False, torch.bfloat16)
    q, sc = Q.int8_rows(w)
    lin8.weight, lin8.scales = q, sc.to(torch.bfloat16)
    head = Q.Int8x2Linear(96, 128, False, torch.bfloat16)
    head.hi, head.lo, head.hi_sz, head.lo_sz = Q.pack_int8x2(*Q.int8_groups(w), torch.bfloat16)
    for lin in (lin4, lin8, head):
        few, many = torch.randn(2, 96, generator=g).bfloat16(), torch.randn(40, 96, generator=g).bfloat16()
        kernel = lin(few)  # the weight-only kernel
        assert lin._packed is None
        dense = lin(torch.cat([few, many]))[:2]  # 42 rows: the packed copy
        assert lin._packed is not None
        # both are the same weight in bf16 arithmetic: equal up to bf16 rounding of the sums
        assert torch.allclose(dense.float(), kernel.float(), atol=0.05, rtol=0.02), (dense - kernel).abs().max()


def test_compile_choice():
    assert Q.choose_compile("auto", "cpu") is False and Q.choose_compile("off", "cpu") is False
    assert Q.choose_compile(False, "cpu") is False
    with pytest.raises(MMChatError, match="unknown compile setting"):
        Q.choose_compile("fast", "cpu")


@pytest.mark.slow
def test_compiled_decode_step_gives_the_eager_tokens(tmp_path, monkeypatch):
    """A tiny random Llama: greedy tokens after compiling the decode step (one row and three rows) are the eager
    ones, and inductor wrote its output under the given cache dir."""
    from mmchat.config import get_config
    from mmchat.generate import SamplingParams, generate_ids
    from mmchat.model import Transformer
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    torch.manual_seed(0)
    model = Transformer(get_config("tiny")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    prompts = [[5, 17, 99, 3], [7, 7, 1], [200, 4, 4, 4, 4, 9]]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    eager = [generate_ids(model, [p], params)[0] for p in prompts], generate_ids(model, prompts, params)
    Q.compile_decode(model, tmp_path / "inductor", progress=False)
    assert model._compiled_block is not None
    compiled = [generate_ids(model, [p], params)[0] for p in prompts], generate_ids(model, prompts, params)
    assert compiled == eager
    assert any((tmp_path / "inductor").rglob("*.py"))
    model.compile_decode(False)
    assert [generate_ids(model, [p], params)[0] for p in prompts] == eager[0]


# -- the real model ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(smollm2_path):
    from mmchat.formats.load import load_checkpoint
    return load_checkpoint(smollm2_path)


def _ppl(model, ids):
    from mmchat.bench import perplexity
    return perplexity(model, ids)


@pytest.mark.slow
def test_every_fast_path_keeps_perplexity_within_2_percent(checkpoint, smollm2_path):
    from mmchat.api import build_model
    ids = checkpoint.tokenizer.encode(TEXT)
    assert len(ids) > 150
    reference = _ppl(build_model(checkpoint.config, checkpoint.tensors, torch.float32), ids)
    assert 1 < reference < 100  # a real model reading English
    paths = {"bf16": (torch.bfloat16, None), "int8": (torch.bfloat16, "int8"), "int4": (torch.bfloat16, "int4"),
             "gguf": (torch.bfloat16, "gguf"), "gguf, float32": (torch.float32, "gguf")}
    for name, (dtype, scheme) in paths.items():
        model = build_model(checkpoint.config, checkpoint.tensors, dtype)
        if scheme:
            Q.quantize(model, scheme, str(smollm2_path))
            assert any(isinstance(m, tuple(Q.LINEARS.values())) for m in model.modules())
        ratio = _ppl(model, ids) / reference
        assert abs(ratio - 1) < 0.02, f"{name}: perplexity {ratio:.4f}x the float32 reference"


@pytest.mark.slow
def test_cache_round_trip_and_greedy_output_of_the_exact_path(smollm2_path, tmp_path, monkeypatch):
    """float32 without quantization is exact: greedy decoding with the KV cache equals recomputing the whole
    sequence every step; loading again from the converted-weights cache gives the same logits."""
    import mmchat
    from mmchat.generate import SamplingParams, generate_ids
    monkeypatch.setenv("MMCHAT_HOME", str(tmp_path))
    first = mmchat.load(str(smollm2_path), dtype="float32", quant=None, progress=False)
    files = sorted(p.name for p in (tmp_path / "converted").iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".safetensors")
    second = mmchat.load(str(smollm2_path), dtype="float32", quant=None, progress=False)
    ids = first.encode("The capital of France is")
    with torch.inference_mode():
        a, b = first.model(torch.tensor([ids])), second.model(torch.tensor([ids]))
    assert torch.equal(a, b)
    assert second.encode(TEXT) == first.encode(TEXT) and second.template.source == first.template.source

    new = generate_ids(first.model, [ids], SamplingParams(max_tokens=8, temperature=0.0))[0]
    seq = list(ids)
    with torch.inference_mode():
        for _ in range(8):  # no cache: the whole sequence each step
            seq.append(int(first.model(torch.tensor([seq]))[0, -1].argmax()))
    assert new == seq[len(ids):]


@pytest.mark.slow
def test_quantized_model_from_cache_equals_the_fresh_one(smollm2_path, tmp_path, monkeypatch):
    import mmchat
    monkeypatch.setenv("MMCHAT_HOME", str(tmp_path))
    fresh = mmchat.load(str(smollm2_path), quant="gguf", progress=False)
    cached = mmchat.load(str(smollm2_path), quant="gguf", progress=False)
    assert Q.kinds_of(cached.model) == Q.kinds_of(fresh.model)
    from mmchat import kernels
    assert isinstance(cached.model.layers[0].mlp.w_up, Q.BlockQ4Linear if kernels.available() else Q.Int4Linear)
    assert (cached.model.fused_blocks is not None) == kernels.available()
    ids = torch.tensor([fresh.encode("Hello, how are you today?")])
    with torch.inference_mode():
        assert torch.equal(fresh.model(ids), cached.model(ids))
    assert not list((tmp_path / "converted").glob("*.tmp"))
    assert math.isfinite(float(cached.model(ids).float().sum()))
