"""`mmchat bench`: the report and its JSON line (never timed assertions: only that figures are there and sane)."""
import json
import math

import pytest
import torch

from mmchat.cli import main


@pytest.mark.slow
def test_bench_json_last_line(smollm2_path, capsys):
    code = main(["bench", "--model", str(smollm2_path), "--repeats", "1", "--new-tokens", "4", "--batch", "2",
                 "--prefill-tokens", "40", "--json"])
    out, err = capsys.readouterr()
    assert code == 0
    result = json.loads(out.strip().splitlines()[-1])
    for key in ("decode_tok_s", "prefill_tok_s", "load_s", "peak_rss_mb", "batch_decode_tok_s"):
        assert isinstance(result[key], float) and math.isfinite(result[key]) and result[key] > 0, key
    assert result["prefill_tokens"] == 40 and result["batch"] == 2
    assert "decode" in out and "peak memory" in out  # the human-readable report above it
    assert "run 1/1" in err  # progress while it runs


def test_bench_refuses_bad_numbers(capsys):
    assert main(["bench", "--batch", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--batch must be at least 1" in err[0]


def test_perplexity_is_exp_of_mean_next_token_loss():
    from mmchat.bench import perplexity
    from mmchat.config import get_config
    from mmchat.model import Transformer
    torch.manual_seed(0)
    model = Transformer(get_config("tiny")).eval()
    ids = torch.randint(0, 512, (30,)).tolist()
    with torch.inference_mode():
        logits = model(torch.tensor([ids]))[0]
    expected = math.exp(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item())
    assert perplexity(model, ids) == pytest.approx(expected, rel=1e-5)
    assert math.isfinite(perplexity(model, ids, chunk=7))  # chunks restart their context: close, not equal
