"""LoRA adapters (start equal to the base, train only themselves, merge exactly) and supervised fine-tuning on the
shipped customer-service chats, end to end from a model pretrained here."""
from importlib import resources

import pytest
import torch

from mmchat.config import get_config
from mmchat.errors import MMChatError
from mmchat.train.export import load_run
from mmchat.train.loop import TrainConfig, load_checkpoint_file
from mmchat.train.lora import LoRALinear, apply_lora, merge_lora
from mmchat.train.pretrain import build_model, pretrain
from mmchat.train.sft import sft

CORPUS = str(resources.files("mmchat") / "data" / "tiny_corpus.txt")
CHATS = str(resources.files("mmchat") / "data" / "shop_support.jsonl")


@pytest.mark.parametrize("config", ["tiny", "tiny-gpt2"])
def test_lora_starts_at_base_trains_only_adapters_and_merges_exactly(config):
    torch.manual_seed(0)
    model = build_model(get_config(config), seed=0)
    x = torch.randint(0, 512, (2, 24))  # (B, T)
    base_logits = model(x).detach()
    n_train = apply_lora(model, rank=4, alpha=8, targets="q,v,o,down")
    assert torch.allclose(model(x), base_logits)  # B = 0: the adapted model starts as the base
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert n_train == sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    wqkv = model.layers[0].attn.wqkv
    assert isinstance(wqkv, LoRALinear) and wqkv.adapted == [True, False, True]  # q and v, not k
    # a few optimizer steps so the adapters are not zero
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        lora_logits = model(x)
    assert not torch.allclose(lora_logits, base_logits, atol=1e-3)
    k_rows = wqkv.delta_weight()[wqkv.slices[1][0]:wqkv.slices[1][1]]
    assert torch.count_nonzero(k_rows) == 0  # K rows untouched
    assert merge_lora(model) == 3 * model.cfg.n_layer  # wqkv, wo and w_down of every block
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    with torch.no_grad():
        merged_logits = model(x)
    assert torch.allclose(merged_logits, lora_logits, atol=1e-5)


@pytest.mark.parametrize("config", ["tiny", "tiny-gpt2"])
def test_bf16_lora_casts_the_frozen_weights_once_with_the_same_steps(config, tmp_path):
    """Under bf16 autocast the frozen base weights are cast to bf16 once (FrozenCasts), not at every forward: the
    steps give bit-identical losses and adapters to plain autocast, and outside a step the model holds its fp32
    weights (the head still tied to the embeddings where it was)."""
    from mmchat.train.loop import Trainer
    from mmchat.train.lora import lora_state

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (2, 17), generator=g)  # (B, T+1)

    class Rows:
        def train_batch(self, step, micro, n_micro, batch_size, rank=0, world=1):
            return ids[:, :-1], ids[:, 1:], torch.ones(2, 16, dtype=torch.bool)

    runs = {}
    for copies in (True, False):
        model = build_model(get_config(config), seed=0)
        apply_lora(model, rank=4, alpha=8, targets="q,k,v,o")
        weights = {n: p for n, p in model.named_parameters()}
        cfg = TrainConfig(batch_size=2, seq_len=16, lr=1e-2, warmup_steps=1, precision="bf16", device="cpu",
                          progress=False)
        trainer = Trainer(model, Rows(), cfg, tmp_path / str(copies), meta={}, state_fn=lora_state)
        if not copies:
            trainer.frozen_casts = None  # autocast casts every frozen weight at every forward
        runs[copies] = [trainer._train_step(step)["loss"] for step in range(3)], lora_state(model)
        if copies:  # one bf16 copy per frozen Linear (base projections, MLP, head), made at the first step only
            n_frozen = sum(isinstance(m, torch.nn.Linear) and not m.weight.requires_grad for m in model.modules())
            assert len(trainer.frozen_casts.copies) == n_frozen > 0
            assert all(c.dtype == torch.bfloat16 for _, c in trainer.frozen_casts.copies.values())
        assert {n: p for n, p in model.named_parameters()} == weights  # the same fp32 Parameters after steps
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert (model.lm_head.weight is model.tok_embeddings.weight) == model.cfg.tie_embeddings
    (losses_copies, state_copies), (losses_plain, state_plain) = runs[True], runs[False]
    assert losses_copies == losses_plain and losses_copies[-1] < losses_copies[0]
    assert all(torch.equal(state_copies[k], state_plain[k]) for k in state_plain)


def test_lora_rejects_unknown_targets():
    model = build_model(get_config("tiny"), seed=0)
    with pytest.raises(MMChatError, match="unknown LoRA target 'qq'"):
        apply_lora(model, targets="q,qq")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny GPT pretrained here for a few steps: its tokenizer knows ChatML, so it can be fine-tuned on chats."""
    out = tmp_path_factory.mktemp("pre") / "run"
    pretrain("tiny", [CORPUS], out, TrainConfig(max_steps=3, batch_size=4, seq_len=64, eval_every=0, eval_batches=1,
                                                save_every=0, progress=False))
    return out


def sft_cfg(**kw):
    base = dict(max_steps=4, batch_size=2, seq_len=255, lr=3e-3, min_lr=3e-4, warmup_steps=1, eval_every=0,
                eval_batches=2, save_every=0, progress=False, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def test_sft_lora_learns_resumes_and_merges(pretrained, tmp_path):
    lora = {"rank": 4, "alpha": 8, "targets": "q,k,v,o"}
    full = sft(str(pretrained), CHATS, tmp_path / "a", sft_cfg(max_steps=6), lora=lora)
    half = sft(str(pretrained), CHATS, tmp_path / "b", sft_cfg(max_steps=6, stop_at=3), lora=lora)
    assert half["stopped"] and half["step"] == 3
    resumed = sft(str(pretrained), CHATS, tmp_path / "b", sft_cfg(max_steps=6), lora=lora, resume=True)
    curve = [h["loss"] for h in full["history"]]
    assert [h["loss"] for h in resumed["history"]] == curve  # LoRA runs resume exactly too
    assert curve[-1] < curve[0]
    ckpt = load_checkpoint_file(tmp_path / "a" / "checkpoint.pt")
    assert ckpt["model"] and all(".lora_" in k for k in ckpt["model"])  # only adapters are saved
    # the run reloads as a plain model whose weights are base + merged adapters: same logits as the LoRA model
    lora_model = full["llm"].model
    merged = load_run(tmp_path / "a")
    x = torch.tensor([merged.render_chat([{"role": "user", "content": "How much is shipping?"}])])
    with torch.no_grad():
        assert torch.allclose(merged.model(x), lora_model(x), atol=1e-5)
    assert not any(isinstance(m, LoRALinear) for m in merged.model.modules())


def test_sft_full_fine_tune_trains_every_weight(pretrained, tmp_path):
    result = sft(str(pretrained), CHATS, tmp_path / "full", sft_cfg(max_steps=3))
    before = load_checkpoint_file(pretrained / "checkpoint.pt")["model"]
    after = load_checkpoint_file(tmp_path / "full" / "checkpoint.pt")["model"]
    assert set(after) == set(before)
    assert all(not torch.equal(before[k], after[k]) for k in before if k.endswith("wqkv.weight"))
    assert result["history"][-1]["loss"] < result["history"][0]["loss"]
