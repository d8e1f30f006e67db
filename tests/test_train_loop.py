"""The training loop: pretraining learns, resume continues exactly, accumulation and DDP give the same curve as one
big batch, checkpoints survive kill -9, Ctrl-C saves, bad settings fail with one line, and the head and the loss
run only where the loss mask is true with the values and gradients of the whole logits, masked."""
import os
import signal
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import pytest
import torch

import torch.nn.functional as F

from mmchat.cli import main
from mmchat.config import CONFIGS
from mmchat.errors import MMChatError
from mmchat.model import Transformer
from mmchat.train.cpu_step import numpy_openblas
from mmchat.train.loop import ChunkedNLL, Trainer, TrainConfig, atomic_save, load_checkpoint_file
from mmchat.train.lora import apply_lora
from mmchat.train.pretrain import pretrain

CORPUS = str(resources.files("mmchat") / "data" / "tiny_corpus.txt")


def small_cfg(**kw):
    base = dict(max_steps=6, batch_size=4, seq_len=32, lr=3e-3, min_lr=3e-4, warmup_steps=1, eval_every=0,
                eval_batches=2, save_every=0, progress=False, seed=7)
    base.update(kw)
    return TrainConfig(**base)


def losses(result):
    return [h["loss"] for h in result["history"]]


@pytest.mark.slow
def test_pretraining_beats_unigram_entropy(tmp_path):
    """A 0.1M-parameter GPT on a 12 KB corpus: held-out loss ends well below the corpus's unigram entropy (what a
    model that ignores context reaches), so it learnt to use context."""
    cfg = small_cfg(max_steps=150, batch_size=16, seq_len=64, warmup_steps=15, eval_every=75, eval_batches=4)
    result = pretrain("tiny", [CORPUS], tmp_path / "run", cfg)
    entropy, final = result["unigram_entropy"], result["evals"][-1]["loss"]
    assert final < entropy - 0.6, (final, entropy)
    assert result["evals"][0]["loss"] > final  # still improving between the two evals
    assert (tmp_path / "run" / "tb").is_dir() and any((tmp_path / "run" / "tb").iterdir())


def test_resume_continues_exactly(tmp_path):
    full = pretrain("tiny", [CORPUS], tmp_path / "full", small_cfg(max_steps=6))
    half = pretrain("tiny", [CORPUS], tmp_path / "half", small_cfg(max_steps=6, stop_at=3))  # "interrupted"
    assert losses(half) == losses(full)[:3]
    resumed = pretrain("tiny", [CORPUS], tmp_path / "half", small_cfg(max_steps=6), resume=True)
    assert losses(resumed) == losses(full)  # the same curve, to the last bit
    a = load_checkpoint_file(tmp_path / "full" / "checkpoint.pt")["model"]
    b = load_checkpoint_file(tmp_path / "half" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(MMChatError, match="already holds a checkpoint"):
        pretrain("tiny", [CORPUS], tmp_path / "full", small_cfg(max_steps=6))


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    big = pretrain("tiny", [CORPUS], tmp_path / "big", small_cfg(max_steps=4, batch_size=4, grad_accum=1))
    acc = pretrain("tiny", [CORPUS], tmp_path / "acc", small_cfg(max_steps=4, batch_size=1, grad_accum=4))
    assert losses(acc) == pytest.approx(losses(big), abs=1e-5)
    assert losses(big)[-1] < losses(big)[0]


@pytest.mark.slow
def test_compiled_blocks_train_the_same_and_resume(tmp_path):
    """compile=True (torch.compile of each block) gives the eager loss curve within float noise, through an
    interruption and --resume; the eval and sample at the end run eagerly."""
    eager = pretrain("tiny", [CORPUS], tmp_path / "eager", small_cfg(max_steps=4))
    pretrain("tiny", [CORPUS], tmp_path / "compiled", small_cfg(max_steps=4, stop_at=2, compile=True))
    resumed = pretrain("tiny", [CORPUS], tmp_path / "compiled", small_cfg(max_steps=4, compile=True), resume=True)
    assert losses(resumed) == pytest.approx(losses(eager), rel=1e-4)
    assert resumed["evals"][-1]["loss"] == pytest.approx(eager["evals"][-1]["loss"], rel=1e-4)
    assert losses(eager)[-1] < losses(eager)[0]


@pytest.mark.slow
def test_kill_9_mid_save_leaves_the_previous_checkpoint(tmp_path):
    """A process saving a 40 MB checkpoint over and over is killed at random moments; what is on disk always loads
    and is one of the complete versions."""
    path = tmp_path / "checkpoint.pt"
    atomic_save({"version": -1, "w": torch.zeros(10)}, path)
    script = (f"import torch, sys; from mmchat.train.loop import atomic_save\n"
              f"w = torch.randn(10_000_000)\n"
              f"for i in range(10_000):\n"
              f"    atomic_save({{'version': i, 'w': w}}, {str(path)!r}); print(i, flush=True)\n")
    for delay in (0.5, 1.3):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # at least one save finished
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpt = load_checkpoint_file(path)
        assert ckpt["version"] >= 0 and ckpt["w"].shape == (10_000_000,)


def run_cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "mmchat", *args], capture_output=True, text=True, timeout=300, **kw)


@pytest.mark.slow
def test_ctrl_c_saves_and_resume_continues(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "mmchat", "train", "pretrain", "--config", "tiny", "--data", CORPUS,
                             "--out", str(out), "--max-steps", "100000", "--batch-size", "2", "--seq-len", "32",
                             "--save-every", "0", "--eval-every", "0", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # wait until training has started (the TensorBoard folder appears once the loop begins)
    deadline = time.time() + 120
    while not (out / "tb").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert "continue with --resume" in output
    step = load_checkpoint_file(out / "checkpoint.pt")["step"]
    assert 0 < step < 100000
    r = run_cli("train", "pretrain", "--config", "tiny", "--data", CORPUS, "--out", str(out), "--max-steps",
                str(step + 2), "--batch-size", "2", "--seq-len", "32", "--eval-every", "0", "--no-progress",
                "--resume")
    assert r.returncode == 0, r.stderr
    ckpt = load_checkpoint_file(out / "checkpoint.pt")
    assert ckpt["step"] == step + 2 and [h["step"] for h in ckpt["history"]] == list(range(step + 2))


def test_bad_input_fails_with_one_line(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases = [
        (["train", "pretrain", "--config", "tiny", "--data", str(empty)], "is empty"),
        (["train", "pretrain", "--config", "nope", "--data", CORPUS], "unknown config 'nope'"),
        (["train", "pretrain", "--config", "gpt2", "--data", CORPUS, "--batch-size", "100000", "--seq-len", "1024"],
         "GiB but"),
        (["train", "sft", "--model", "smollm2", "--data", str(empty)], "is empty"),
        (["export", str(tmp_path), "--to", "hf", "--out", str(tmp_path / "x")], "holds no checkpoint.pt"),
    ]
    for args, message in cases:
        if args[0] == "train":
            args = args + ["--out", str(tmp_path / "o"), "--no-progress"]
        assert main(args) == 2, args
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, lines)


DDP_RUN = ["train", "pretrain", "--config", "tiny", "--data", CORPUS, "--max-steps", "5", "--seq-len", "32",
           "--lr", "3e-3", "--warmup-steps", "2", "--eval-every", "0", "--no-progress", "--seed", "7"]


def torchrun(*launcher_args, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launcher_args, "-m", "mmchat", *DDP_RUN,
                             "--batch-size", "2", "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def assert_same_training(one_dir, two_dir):
    h1 = load_checkpoint_file(one_dir / "checkpoint.pt")["history"]
    h2 = load_checkpoint_file(two_dir / "checkpoint.pt")["history"]
    l1, l2 = [h["loss"] for h in h1], [h["loss"] for h in h2]
    assert l2 == pytest.approx(l1, abs=1e-5)
    assert l2[-1] < l2[0]
    w1 = load_checkpoint_file(one_dir / "checkpoint.pt")["model"]
    w2 = load_checkpoint_file(two_dir / "checkpoint.pt")["model"]
    # AdamW divides by sqrt(v): on weights whose gradient is near zero, float-order differences in the reductions
    # grow to ~1e-5 after 5 steps at lr 3e-3 (each step moves a weight by up to 3e-3)
    assert all(torch.allclose(w1[k], w2[k], atol=5e-5) for k in w1)


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    one = run_cli(*DDP_RUN, "--batch-size", "4", "--out", str(out))
    assert one.returncode == 0, one.stderr
    return out


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path, one_process_run):
    """DDP with 2 processes x 2 rows gives the loss curve of 1 process x 4 rows (gloo on CPU)."""
    two = torchrun("--nproc_per_node", "2", "--master_port", "29533", out=tmp_path / "two")
    _, err = two.communicate(timeout=300)
    assert two.returncode == 0, err[-3000:]
    assert_same_training(one_process_run, tmp_path / "two")


@pytest.mark.slow
def test_torchrun_two_machines_match_one(tmp_path, one_process_run):
    """Two launchers joined by torchrun's c10d rendezvous, as on two machines (here both on loopback, one process
    each): the same loss curve as 1 process x 4 rows."""
    rdzv = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:29544",
            "--rdzv-id", "mmchat-test"]
    nodes = [torchrun(*rdzv, out=tmp_path / "two") for _ in range(2)]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-3000:]
    assert_same_training(one_process_run, tmp_path / "two")


def test_auto_precision_uses_bf16_only_where_it_is_faster():
    from mmchat.quantize import cpu_has_bf16
    from mmchat.train.loop import use_bf16
    cpu = torch.device("cpu")
    assert use_bf16("auto", cpu, 1_000_000) is False  # a small model: the casts cost more than they save
    assert use_bf16("auto", cpu, 135_000_000) is cpu_has_bf16()
    assert use_bf16("fp32", cpu, 135_000_000) is False and use_bf16("bf16", cpu, 1_000) is True


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_nll_matches_cross_entropy(dtype):
    """The loop's loss, chunk by chunk in float32, gives F.cross_entropy(logits.float())'s values and gradients
    (several chunks: 70 rows of a 50k vocabulary), and leaves the logits as they were."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(70, 50_000, generator=g) * 4).to(dtype).requires_grad_()  # (N, V)
    targets = torch.randint(0, 50_000, (70,), generator=g)  # (N,)
    weights = torch.rand(70, generator=g)  # (N,) as the loss mask and scale would
    before = logits.detach().clone()
    ours = ChunkedNLL.apply(logits, targets)
    (ours * weights).sum().backward()
    grad_ours, logits.grad = logits.grad, None
    ref = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    (ref * weights).sum().backward()
    assert ours.dtype == torch.float32 and torch.allclose(ours, ref, atol=1e-5)
    assert grad_ours.dtype == dtype
    # float32 rounding of the log-sum-exp over 50k terms; bf16: one rounding of the float32 gradient either way,
    # so at most one bf16 step apart (2^-7 relative at worst)
    rtol = 1e-4 if dtype == torch.float32 else 2 ** -6
    assert torch.allclose(grad_ours.float(), logits.grad.float(), rtol=rtol, atol=1e-7)
    assert torch.equal(logits.detach(), before)


class FixedRows:
    """The loop's data: the same batch at every step and for eval."""

    def __init__(self, x, y, mask):
        self.batch = (x, y, mask)

    def train_batch(self, step, micro, n_micro, batch_size, rank=0, world=1):
        return self.batch

    def eval_batches(self, n, batch_size):
        yield self.batch


def tiny_llama(lora: bool) -> Transformer:
    """A random llama-style model with the head tied to the embeddings, LoRA adapters not zero when asked for."""
    torch.manual_seed(0)
    model = Transformer(CONFIGS["tiny"]).train()
    assert model.lm_head.weight is model.tok_embeddings.weight
    if lora:
        apply_lora(model, rank=4, alpha=8, targets="q,k,v,o,down")
        for p in model.parameters():
            if p.requires_grad:
                p.data.normal_(0, 0.05)  # B = 0 at the start would hide the adapters' gradients
    return model


def grads_of(model, loss) -> dict:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("blas", ["torch", "openblas"])
@pytest.mark.parametrize("lora", [False, True])
def test_head_and_loss_only_at_loss_positions_match_full_logits_masked(tmp_path, monkeypatch, lora, blas):
    """The loop's loss (head and loss at the masked positions only) and every gradient equal the whole logits'
    cross entropy times the mask, summed, within float32 rounding; eval gives its mean. One row carries no loss."""
    if blas == "openblas" and numpy_openblas() is None:
        pytest.skip("numpy is not built with OpenBLAS here")
    monkeypatch.setenv("MMCHAT_BLAS", blas)
    model = tiny_llama(lora)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 512, (2, 3, 40), generator=g).unbind(0)  # (B, T) each
    mask = torch.rand(3, 40, generator=g) < 0.4  # (B, T), as an assistant-only mask
    mask[1] = False
    cfg = TrainConfig(batch_size=3, seq_len=40, device="cpu", progress=False)
    trainer = Trainer(model, FixedRows(x, y, mask), cfg, tmp_path, meta={})
    assert (trainer.cpu_step is not None) == (blas == "openblas")
    with torch.no_grad():
        kept = model(x, keep=mask)  # (N, V)
        assert kept.shape == (int(mask.sum()), 512) and torch.allclose(kept, model(x)[mask], atol=1e-5)
    ours = trainer._nll_sum(x, y, mask)
    grads_ours = grads_of(model, ours)
    logits = model(x)  # (B, T, V): the head at every position
    ref = (F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none") * mask.flatten()).sum()
    grads_ref = grads_of(model, ref)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    assert grads_ours.keys() == grads_ref.keys() and len(grads_ref) > 0
    for name, grad in grads_ref.items():  # float32 rounding, relative to each gradient's scale
        assert torch.allclose(grads_ours[name], grad, rtol=1e-4, atol=1e-6 * grad.abs().max()), name
    assert trainer.evaluate() == pytest.approx(ref.item() / int(mask.sum()), rel=1e-5)


@pytest.mark.parametrize("lora", [False, True])
def test_micro_batch_without_loss_positions_under_ddp(tmp_path, monkeypatch, lora):
    """A batch where no position carries loss: loss 0 and every trainable parameter gets a zero gradient (none left
    out), so DDP, which checks at the next forward that every parameter took part in the last backward, goes on;
    here one process under DDP (gloo), which makes the same check."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    monkeypatch.setenv("MMCHAT_BLAS", "torch")
    model = tiny_llama(lora)
    x, y = torch.randint(0, 512, (2, 2, 24), generator=torch.Generator().manual_seed(2)).unbind(0)  # (B, T)
    none = torch.zeros(2, 24, dtype=torch.bool)
    data = FixedRows(x, y, none)
    trainer = Trainer(model, data, TrainConfig(batch_size=2, seq_len=24, device="cpu", progress=False), tmp_path, {})
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        trainer.ddp_model = DDP(model)
        loss = trainer._nll_sum(x, y, none)
        grads = grads_of(trainer.ddp_model, loss)
        assert loss.item() == 0 and len(grads) == sum(p.requires_grad for p in model.parameters())
        assert all(torch.count_nonzero(g) == 0 for g in grads.values())
        assert [trainer._train_step(s)["loss"] for s in range(2)] == [0.0, 0.0]
        data.batch = (x, y, torch.rand(2, 24, generator=torch.Generator().manual_seed(3)) < 0.5)
        assert trainer._train_step(2)["loss"] > 0  # and training goes on
    finally:
        dist.destroy_process_group()
    assert trainer.evaluate() > 0


FREE_AND_MEASURE = """
import ctypes, sys, tempfile, torch
if not hasattr(ctypes.CDLL("libc.so.6"), "mallopt"):
    sys.exit(3)
if sys.argv[1] == "trainer":  # a Trainer on the CPU sets malloc up (cpu_step.keep_freed_memory)
    from mmchat.config import CONFIGS
    from mmchat.model import Transformer
    from mmchat.train.loop import Trainer, TrainConfig
    Trainer(Transformer(CONFIGS["tiny"]), None, TrainConfig(device="cpu", progress=False), tempfile.mkdtemp(), {})
resident_mb = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20
before = resident_mb()
tensor = torch.ones(64 << 20)  # 256 MB, written
del tensor
print(resident_mb() - before)  # what of it the process still holds
"""


def test_training_keeps_freed_memory_for_the_next_step():
    """Once a CPU Trainer exists, memory a step frees stays in the process for the next step's tensors, which then
    need no page faults. Without one, glibc returns a large freed block to the kernel."""
    runs = {how: subprocess.run([sys.executable, "-c", FREE_AND_MEASURE, how], capture_output=True, text=True)
            for how in ("trainer", "default")}
    if runs["default"].returncode == 3:
        pytest.skip("malloc here is not glibc's")
    kept, default = (int(r.stdout) for r in (runs["trainer"], runs["default"]))
    assert kept >= 250 and default < 10
