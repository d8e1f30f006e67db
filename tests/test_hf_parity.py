"""Logit and greedy-token parity with HF transformers on tiny random Llama and GPT-2 checkpoints that the tests
build and save (safetensors and pytorch_model.bin), each with a BPE tokenizer trained here."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import mmchat  # noqa: E402
from mmchat.generate import SamplingParams  # noqa: E402
import tiny_models as tm  # noqa: E402

# (model kind, weights file, tokenizer as vocab.json + merges.txt, GPT-2 names without the `transformer.` prefix)
FOLDERS = {
    "llama-safetensors": ("llama", "safetensors", False, False),
    "llama-bin": ("llama", "bin", False, False),
    "llama-tied-safetensors": ("llama-tied", "safetensors", False, False),
    "gpt2-safetensors": ("gpt2", "safetensors", False, False),
    "gpt2-bin-vocab-merges": ("gpt2", "bin", True, False),
    "gpt2-bin-original-names": ("gpt2", "bin", True, True),
}
TEXTS = tm.PROMPTS + ["  two  spaces\n\n\nnewlines\tand a tab", "emoji 😀🚀 café 1234567", "<|im_start|>user\nhi"]


@pytest.fixture(scope="module", params=list(FOLDERS))
def pair(request):
    kind, weights, vocab_merges, bare = FOLDERS[request.param]
    folder = tm.hf_folder(kind, weights, vocab_merges, bare)
    return tm.hf_model(kind), mmchat.load(str(folder), progress=False), folder


def test_config_read_from_folder(pair):
    hf, llm, _ = pair
    c = hf.config
    assert llm.config.vocab_size == c.vocab_size and llm.config.arch == ("gpt2" if c.model_type == "gpt2" else "llama")
    if c.model_type == "llama":
        assert (llm.config.n_head, llm.config.n_kv_head) == (c.num_attention_heads, c.num_key_value_heads) == (4, 2)
    assert llm.config.tie_embeddings == bool(c.tie_word_embeddings)
    # tied means one tensor, not two equal copies
    assert (llm.model.lm_head.weight is llm.model.tok_embeddings.weight) == bool(c.tie_word_embeddings)


def test_tokenizer_matches_transformers(pair):
    _, llm, folder = pair
    ref = transformers.AutoTokenizer.from_pretrained(str(folder))
    for text in TEXTS:
        ids = llm.encode(text)
        assert ids == ref(text, add_special_tokens=False)["input_ids"], text
        assert llm.tokenizer.decode(ids, skip_special=False) == text


def test_last_position_logits_match(pair):
    hf, llm, _ = pair
    for text in tm.PROMPTS:
        ids = torch.tensor([llm.encode(text)])
        with torch.no_grad():
            ref = hf(ids).logits[0, -1]  # (V,)
            ours = llm.model(ids)[0, -1]
        assert ref.std() > 1.0  # far from uniform
        assert (ours - ref).abs().max() < 1e-4, text


def hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    hf.generation_config.eos_token_id = None  # run the full n tokens (ours: ignore_eos), else both stop early
    hf.generation_config.pad_token_id = 0
    out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      do_sample=False, max_new_tokens=n)
    return out[0, len(ids):].tolist()


def test_greedy_continuations_match_hf_generate(pair):
    """32 greedy tokens for several prompts, identical to HF generate(do_sample=False); ours decodes all the
    prompts together in one batch."""
    hf, llm, _ = pair
    prompts = [llm.encode(t) for t in tm.PROMPTS]
    ours = llm.complete(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    for ids, c in zip(prompts, ours):
        ref = hf_greedy(hf, ids, 32)
        assert len(ref) == 32 and c.token_ids == ref
    assert len({tuple(c.token_ids) for c in ours}) == len(prompts)


def readme_gpt2_example() -> str:
    """The README's GPT-2 sampling snippet, exactly as written there."""
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = readme.split("```python")[1:]
    code = next(b.split("```")[0] for b in blocks if 'mmchat.load("path/to/gpt2")' in b)
    return code


def run_readme_example(code: str, folder) -> list[str]:
    printed = []
    namespace = {"mmchat": mmchat, "print": lambda *a, **k: printed.append(" ".join(map(str, a)))}
    exec(compile(code.replace("path/to/gpt2", str(folder)), "README.md", "exec"), namespace)
    return printed


def test_readme_gpt2_example_runs_on_a_gpt2_folder():
    import re
    code = readme_gpt2_example()
    assert '"Hello, how are you?"' in code and "max_tokens=50" in code
    n = int(re.search(r"\bn=(\d+)", code).group(1))
    folder = tm.hf_folder("gpt2", "bin", True, True)  # laid out like OpenAI's original GPT-2 release
    printed = run_readme_example(code, folder)
    assert n >= 2 and len(printed) == n
    assert len(set(printed)) == n  # distinct samples
    for text in printed:
        assert text and "Hello, how are you?" not in text  # only the new part
    assert run_readme_example(code, folder) == printed  # the seed makes it repeatable
