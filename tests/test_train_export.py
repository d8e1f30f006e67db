"""Export of a model trained here: a HuggingFace folder that transformers and mmchat load, a GGUF file that mmchat
and llama.cpp load, all with the same logits and the same greedy text."""
import importlib.util
from importlib import resources

import numpy as np
import pytest
import torch

import mmchat
from mmchat.cli import main
from mmchat.train.export import load_run
from mmchat.train.loop import TrainConfig
from mmchat.train.pretrain import pretrain

CORPUS = str(resources.files("mmchat") / "data" / "tiny_corpus.txt")
PROMPT = "The kettle is filled at the tap, and the bread"
N_GREEDY = 16

needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python is not installed (pip install llama-cpp-python)")


@pytest.fixture(scope="module", params=["tiny", "tiny-gpt2"])
def run(request, tmp_path_factory):
    """A tiny GPT trained long enough that its greedy choices are not near-ties, then exported both ways by the CLI."""
    root = tmp_path_factory.mktemp(request.param)
    pretrain(request.param, [CORPUS], root / "run",
             TrainConfig(max_steps=40, batch_size=8, seq_len=64, lr=3e-3, min_lr=3e-4, warmup_steps=5, eval_every=0,
                         eval_batches=1, save_every=0, progress=False))
    assert main(["export", str(root / "run"), "--to", "hf", "--out", str(root / "hf")]) == 0
    assert main(["export", str(root / "run"), "--to", "gguf", "--out", str(root / "model.gguf")]) == 0
    llm = load_run(root / "run")
    ids = llm.encode(PROMPT)
    with torch.no_grad():
        logits = llm.model(torch.tensor([ids]))[0]  # (T, V)
    return root, llm, ids, logits, greedy(mmchat_next(llm), ids)


def greedy(step_logits, ids: list[int]) -> list[int]:
    """N_GREEDY argmax tokens after ids; step_logits(ids) -> logits (V,) for the next token."""
    ids = list(ids)
    for _ in range(N_GREEDY):
        ids.append(int(np.argmax(step_logits(ids))))
    return ids[-N_GREEDY:]


def mmchat_next(llm):
    def step(ids):
        with torch.no_grad():
            return llm.model(torch.tensor([ids]))[0, -1].numpy()
    return step


@pytest.mark.slow
def test_hf_export_loads_in_transformers_and_mmchat(run):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    root, llm, ids, logits, expected = run
    hf = AutoModelForCausalLM.from_pretrained(str(root / "hf")).eval()
    assert AutoTokenizer.from_pretrained(str(root / "hf"))(PROMPT)["input_ids"] == ids
    with torch.no_grad():
        assert torch.allclose(hf(torch.tensor([ids])).logits[0], logits, atol=1e-4)
    again = mmchat.load(str(root / "hf"), progress=False)
    assert again.encode(PROMPT) == ids
    with torch.no_grad():
        assert torch.allclose(again.model(torch.tensor([ids]))[0], logits, atol=1e-5)

    def hf_step(seq):
        with torch.no_grad():
            return hf(torch.tensor([seq])).logits[0, -1].numpy()
    assert greedy(hf_step, ids) == expected
    assert greedy(mmchat_next(again), ids) == expected


def test_gguf_export_loads_in_mmchat(run):
    root, llm, ids, logits, expected = run
    again = mmchat.load(str(root / "model.gguf"), progress=False)
    assert again.encode(PROMPT) == ids
    with torch.no_grad():
        assert torch.allclose(again.model(torch.tensor([ids]))[0], logits, atol=1e-5)
    assert greedy(mmchat_next(again), ids) == expected


@pytest.mark.slow
@needs_llama_cpp
def test_gguf_export_loads_in_llama_cpp(run):
    import llama_cpp
    root, llm, ids, logits, expected = run
    lm = llama_cpp.Llama(str(root / "model.gguf"), n_ctx=128, logits_all=True, verbose=False, n_threads=1)
    assert lm.tokenize(PROMPT.encode(), add_bos=False, special=False) == ids
    lm.eval(ids)
    scores = np.array(lm.scores[:len(ids)])  # (T, V)
    assert np.abs(scores - logits.numpy()).max() < 1e-3

    out = []  # greedy decoding, one llama.cpp eval per new token
    for _ in range(N_GREEDY):
        out.append(int(np.argmax(lm.scores[lm.n_tokens - 1])))
        lm.eval([out[-1]])
    assert out == expected
    assert lm.detokenize(out).decode() == llm.decode(out)
