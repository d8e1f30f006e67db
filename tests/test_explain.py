"""Explain: attention weights from the written-out softmax, the logit lens, and the pictures."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from mmchat.api import LLM
from mmchat.chat.template import ChatTemplate
from mmchat.config import get_config
from mmchat.explain.report import explain, save_report
from mmchat.model import Transformer


class CharTokenizer:
    """Enough of a tokenizer for explain(): one id per byte."""
    def encode(self, text):
        return list(text.encode())[:64]

    def token_text(self, i):
        return chr(i)


@pytest.fixture(scope="module")
def tiny_llm():
    torch.manual_seed(0)
    cfg = get_config("tiny")
    model = Transformer(cfg).eval()
    return LLM(model, CharTokenizer(), ChatTemplate(None))


def test_attention_rows_are_causal_distributions(tiny_llm):
    ex = explain(tiny_llm, "hello there")
    L, H, T, _ = ex.attention.shape
    assert (L, H, T) == (tiny_llm.config.n_layer, tiny_llm.config.n_head, len("hello there"))
    np.testing.assert_allclose(ex.attention.sum(-1), 1.0, atol=1e-5)  # each query's weights sum to one
    assert np.all(np.triu(ex.attention, k=1) == 0)  # no query looks at a later key


def test_token_probs_and_last_layer_lens_match_the_logits(tiny_llm):
    text = "abcabc"
    ex = explain(tiny_llm, text)
    ids = torch.tensor([list(text.encode())])
    with torch.no_grad():
        probs = tiny_llm.model(ids)[0].softmax(-1)  # (T, V), the fast attention path
    for t, tp in enumerate(ex.token_probs, start=1):
        assert tp["prob"] == pytest.approx(float(probs[t - 1, ids[0, t]]), rel=1e-4)
    # the logit lens at the last layer is the model's own prediction
    assert ex.lens_ids[-1].tolist() == probs.argmax(-1).tolist()
    assert ex.next_tokens[0][0] == chr(int(probs[-1].argmax()))


def test_report_files(tiny_llm, tmp_path):
    ex = explain(tiny_llm, "a picture")
    paths = save_report(ex, tmp_path, tiny_llm.tokenizer, layer=1, head=2)
    for p in paths:
        assert p.exists() and p.stat().st_size > 0
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "tokens.json").read_text())
    assert len(data["token_probs"]) == len("a picture") - 1


@pytest.mark.slow
def test_explain_cli_bad_layer_is_one_line(smollm2_path, tmp_path):
    r = subprocess.run([sys.executable, "-m", "mmchat", "explain", "--model", str(smollm2_path), "--out",
                        str(tmp_path), "--layer", "99", "Hello"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "--layer must be in 0..29" in r.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_explain_cli_on_smollm2(smollm2_path, tmp_path):
    r = subprocess.run([sys.executable, "-m", "mmchat", "explain", "--model", str(smollm2_path), "--out",
                        str(tmp_path), "The capital of France is Paris. The capital of Germany is"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "next: ·Berlin" in r.stdout  # the model's top next token, read off the same forward pass
    assert {p.name for p in tmp_path.iterdir()} == {"attention_grid.png", "attention_head.png", "logit_lens.png",
                                                   "tokens.json"}
