"""GGUF round trip: tiny Llama and GPT-2 models written with gguf-py's GGUFWriter, laid out as llama.cpp's
converter writes them (tensor names, metadata, Q/K row permutation, tokenizer), in every supported quant type.

Two references: transformers loading the same GGUF (it dequantizes independently, so the logits must agree
tightly for every type), and the original float HF model (agreement within what each quant type loses).
gguf-py can write F32..Q5_1 itself but cannot quantize K types (NotImplementedError); tests/tiny_models.py has
small Q2_K..Q6_K writers, checked below against gguf-py's reader and, where installed, llama.cpp itself."""
import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import mmchat  # noqa: E402
from mmchat.errors import MMChatError  # noqa: E402
from mmchat.formats import gguf as ours_gguf  # noqa: E402
from mmchat.formats.load import load_checkpoint  # noqa: E402
from mmchat.generate import SamplingParams  # noqa: E402
import tiny_models as tm  # noqa: E402

# largest relative RMS error of all logits vs the float model (these random models amplify weight error ~5x)
REL_TOL = {"F32": 1e-6, "F16": 0.005, "BF16": 0.03, "Q8_0": 0.06, "Q6_K": 0.25, "Q5_0": 0.45, "Q5_1": 0.45,
           "Q5_K": 0.45, "Q4_0": 0.8, "Q4_1": 0.8, "Q4_K": 0.8, "Q3_K": 1.2, "Q2_K": 1.5}
TEXT = "Hello, how are you? The capital of France is"


@pytest.mark.parametrize("qtype", list(tm.K_QUANTIZERS))
def test_k_quant_writer_round_trips_through_gguf_py(qtype):
    """The test's K-quant blocks read back (with gguf-py's dequantizer) within half a quantization step."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize, quantize
    with pytest.raises(NotImplementedError):
        quantize(np.zeros((1, 256), np.float32), Q[qtype])  # why the test writes these itself
    x = np.random.default_rng(0).standard_normal((6, 512)).astype(np.float32)
    back = dequantize(tm.quantize(x, qtype)[0], Q[qtype])
    levels = {"Q2_K": 3, "Q3_K": 7, "Q4_K": 15, "Q5_K": 31, "Q6_K": 63}[qtype]
    step = (x.max() - x.min()) / levels
    assert np.abs(back - x).max() < 0.75 * step
    assert np.abs(back - x).mean() < 0.3 * step


def test_rope_permutation_is_undone():
    w = torch.randn(4 * 16, 8)
    assert torch.equal(ours_gguf.unpermute_rope_rows(tm.permute_for_gguf(w, 4), 4), w)
    assert not torch.equal(tm.permute_for_gguf(w, 4), w)


@pytest.fixture(scope="module")
def float_logits():
    ids = torch.tensor([tm.tokenizer().encode(TEXT).ids])
    out = {}
    with torch.no_grad():
        for kind in ("llama-256", "gpt2-256"):
            out[kind] = tm.hf_model(kind)(ids).logits[0]  # (T, V)
    return ids, out


@pytest.mark.parametrize("kind", ["llama-256", "gpt2-256"])
@pytest.mark.parametrize("qtype", tm.QUANT_TYPES)
def test_gguf_round_trip(kind, qtype, float_logits):
    ids, ref_float = float_logits
    path = tm.gguf_file(kind, qtype)
    ckpt = load_checkpoint(path)
    hf = tm.hf_model(kind)
    assert ckpt.config.arch == kind.split("-")[0] and ckpt.config.n_layer == 2
    if kind.startswith("llama"):
        assert (ckpt.config.n_head, ckpt.config.n_kv_head, ckpt.config.tie_embeddings) == (4, 2, False)
    assert ckpt.tokenizer.encode(TEXT) == ids[0].tolist()  # tokenizer rebuilt from the GGUF vocab + merges
    assert ckpt.chat_template == tm.CHAT_TEMPLATE

    llm = mmchat.load(str(path), progress=False)
    with torch.no_grad():
        ours = llm.model(ids)[0]  # (T, V)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()(ids).logits[0]
    assert (ours - theirs).abs().max() < 1e-4  # same dequantized weights, same function
    rel = ((ours - ref_float[kind]).norm() / ref_float[kind].norm()).item()
    print(f"{kind} {qtype}: relative logit error vs the float model {rel:.4f}")
    assert rel < REL_TOL[qtype], rel
    if qtype == "F32":
        assert (ours[-1] - ref_float[kind][-1]).abs().max() < 1e-4
        prompts = [llm.encode(t) for t in tm.PROMPTS[:3]]
        got = llm.complete(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
        hf.generation_config.eos_token_id, hf.generation_config.pad_token_id = None, 0
        for p, c in zip(prompts, got):
            ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              do_sample=False, max_new_tokens=32)[0, len(p):].tolist()
            assert c.token_ids == ref


def test_unsupported_quant_type_is_named(tmp_path):
    from gguf import GGMLQuantizationType as Q
    hf = tm.hf_model("llama-256")
    raw = np.random.default_rng(1).integers(0, 255, (128, 256 // 32 * 18), dtype=np.uint8)  # IQ4_NL blocks
    path = tm.write_gguf(tmp_path / "iq4nl.gguf", hf, tm.tokenizer(), "F16",
                         raw_tensors={"blk.0.attn_k.weight": (raw, Q.IQ4_NL)})
    with pytest.raises(MMChatError, match=r"IQ4_NL.*supported: F32") as e:
        load_checkpoint(path)
    assert "blk.0.attn_k.weight" in str(e.value) and "\n" not in str(e.value)


def test_unsupported_architecture_is_named(tmp_path):
    path = tm.write_gguf(tmp_path / "bert.gguf", tm.hf_model("llama-256"), tm.tokenizer(), "F32", arch="bert")
    with pytest.raises(MMChatError, match="unsupported architecture 'bert'"):
        load_checkpoint(path)


@pytest.mark.parametrize("cut", [0.5, 0.02, 0.0005])
def test_truncated_gguf_is_refused(tmp_path, cut):
    data = tm.gguf_file("llama-256", "Q8_0").read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: max(8, int(len(data) * cut))])
    with pytest.raises(MMChatError, match="cut.gguf") as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)


def test_garbage_after_magic_is_refused(tmp_path):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(b"GGUF" + np.random.default_rng(2).integers(0, 255, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(MMChatError, match="garbage.gguf"):
        load_checkpoint(path)


@pytest.mark.parametrize("kind", ["llama-256", "gpt2-256"])
@pytest.mark.parametrize("qtype", tm.QUANT_TYPES)
def test_llama_cpp_reads_the_same_model(kind, qtype):
    """llama.cpp (its own reader, dequantizer and RoPE) on the same files: the same tokens and close logits.
    This checks the test's writers (names, Q/K row order, K-quant blocks) against the format's home, and our
    reading against an implementation that shares no code with gguf-py. llama.cpp keeps its KV cache in F16 and
    quantizes activations to 8 bits for quantized matmuls, hence the looser bound there."""
    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama_cpp (llama-cpp-python) is not installed: it is a benchmark dependency, not a test one")
    path = tm.gguf_file(kind, qtype)
    ids = tm.tokenizer().encode(TEXT).ids
    ref_model = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    assert ref_model.tokenize(TEXT.encode(), add_bos=False, special=True) == ids
    ref_model.eval(ids)
    ref = torch.tensor(np.array(ref_model.scores[: len(ids)]))  # (T, V)
    with torch.no_grad():
        ours = mmchat.load(str(path), progress=False).model(torch.tensor([ids]))[0]
    rel = ((ours - ref).norm() / ref.norm()).item()
    assert rel < {"F32": 0.003, "F16": 0.003, "BF16": 0.02}.get(qtype, 0.08), rel  # BF16: activations too
