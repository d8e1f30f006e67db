"""The real SmolLM2-135M-Instruct GGUF: mmchat's fp32 model on the dequantized weights against transformers
loading the same file (it dequantizes with gguf-py too). Loaded once per module; both take seconds."""
import pytest
import torch

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    """Ours in float32 on the dequantized weights, as transformers runs it (mmchat.load would otherwise pick
    the fastest form for the machine, e.g. the Q4 blocks kept); cache=False: no 0.5 GB converted copy on disk."""
    import mmchat
    return mmchat.load(str(smollm2_path), dtype="float32", quant=None, cache=False, progress=False)


@pytest.fixture(scope="module")
def hf(smollm2_path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts(smollm2):
    return [smollm2.encode(p) for p in PROMPTS] + [smollm2.render_chat(CHAT)]


def test_same_shape_and_weights(smollm2, hf):
    c = hf.config
    assert (smollm2.config.n_layer, smollm2.config.n_head, smollm2.config.n_kv_head, smollm2.config.d_model) == \
        (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.hidden_size) == (30, 9, 3, 576)
    # Q rows: ours undoes llama.cpp's permutation; transformers does the same on its side
    q_ours = smollm2.model.layers[3].attn.wqkv.weight[:576]
    assert q_ours.dtype == torch.float32 and torch.equal(q_ours, hf.model.layers[3].self_attn.q_proj.weight)


@pytest.fixture(scope="module")
def continuations(smollm2, prompts):
    """Our greedy 32 tokens for every prompt, decoded together in one batch."""
    from mmchat.generate import SamplingParams
    done = smollm2.complete(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    return [c.token_ids for c in done]


@pytest.fixture(scope="module")
def hf_logits(hf, prompts, continuations):
    """transformers' logits over prompt + our continuation, one forward pass per prompt: (T, V) each."""
    with torch.no_grad():
        return [hf(torch.tensor([p + c])).logits[0] for p, c in zip(prompts, continuations)]


def test_last_position_logits_match(smollm2, prompts, hf_logits):
    for ids, ref in zip(prompts, hf_logits):
        with torch.no_grad():
            ours = smollm2.model(torch.tensor([ids]))[0, -1]  # (V,)
        diff = (ours - ref[len(ids) - 1]).abs().max()
        print(f"{len(ids)}-token prompt: max abs logit difference {diff:.2e} (logit std {ours.std():.2f})")
        assert diff < 5e-4, diff  # measured: up to ~5e-5 on logits of std ~3.5
        assert ours.argmax() == ref[len(ids) - 1].argmax()


def test_greedy_continuations_match(smollm2, prompts, continuations, hf_logits):
    """At every step transformers' most likely next token, given the same prefix, is the one we chose: so its
    greedy decoding produces exactly our 32 tokens."""
    for ids, ours, ref in zip(prompts, continuations, hf_logits):
        assert len(ours) == 32
        assert ref[len(ids) - 1: -1].argmax(-1).tolist() == ours, smollm2.decode(ours)
    assert "Paris" in smollm2.decode(continuations[0]) and "Paris" in smollm2.decode(continuations[-1])


def test_greedy_chat_answer_equals_hf_generate(smollm2, hf, prompts, continuations):
    ids = prompts[-1]
    hf.generation_config.eos_token_id, hf.generation_config.pad_token_id = None, 2
    ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      do_sample=False, max_new_tokens=32)[0, len(ids):].tolist()
    assert ref == continuations[-1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none on this machine")
def test_the_same_engine_runs_on_a_gpu(smollm2, prompts, smollm2_path):
    """On a GPU the same model code runs there (chosen by itself when one is present): float32 logits as the CPU's,
    and the automatic choice (bf16) continues "The capital of France is" with the same first greedy tokens."""
    import mmchat
    from mmchat.generate import SamplingParams, generate_ids
    gpu = mmchat.load(str(smollm2_path), dtype="float32", quant=None, cache=False, progress=False, device="cuda")
    assert next(gpu.model.parameters()).device.type == "cuda"
    with torch.inference_mode():
        for ids in prompts:
            cpu_logits = smollm2.model(torch.tensor([ids]))[0, -1]
            gpu_logits = gpu.model(torch.tensor([ids], device="cuda"))[0, -1].cpu()
            assert torch.allclose(gpu_logits, cpu_logits, atol=2e-3, rtol=1e-3)
    auto = mmchat.load(str(smollm2_path), cache=False, progress=False)  # a GPU is present: it is picked
    assert next(auto.model.parameters()).device.type == "cuda"
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    assert generate_ids(auto.model, [prompts[0]], params) == generate_ids(smollm2.model, [prompts[0]], params)
