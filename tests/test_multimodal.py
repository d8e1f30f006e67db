"""Images into the LM: generated scenes, the projector splice through the engine, the image-row LoRA, adapter
files, errors, and a smoke run of `mmchat train vision`. A tiny random Llama stands in where the language does
not matter; tests/test_vision_chat.py asks the real SmolLM2 with the shipped adapter."""
import random
import sys
from pathlib import Path

import pytest
import torch

import mmchat
from mmchat.errors import MMChatError
from mmchat.generate import SamplingParams, generate
from mmchat.multimodal import projector as P
from mmchat.multimodal import scenes, vision

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models as tm  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    path = tm.workdir() / "llama-vision"
    if not path.exists():
        tm.save_hf_folder(tm.llama_model(tm.tokenizer().get_vocab_size(), ctx=512, seed=5), tm.tokenizer(), path)
    return mmchat.load(str(path), progress=False)


def random_adapter(cfg, lora: bool = True, seed: int = 0) -> P.Adapter:
    torch.manual_seed(seed)
    proj = P.Projector(cfg.d_model, hidden=32)
    factors = {}
    if lora:
        for i in range(cfg.n_layer):
            wqkv = (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim
            factors[f"layers.{i}.attn.wqkv"] = (torch.randn(4, cfg.d_model), torch.randn(wqkv, 4) * 0.5)
    meta = {"d_model": cfg.d_model, "n_layer": cfg.n_layer, "vocab_size": cfg.vocab_size, "hidden": 32}
    return P.Adapter(proj.eval(), factors, meta)


# -- scenes ------------------------------------------------------------------------------------------------------
def test_scenes_are_reproducible_and_splits_differ():
    a, b = scenes.make_scene("train", 7), scenes.make_scene("train", 7)
    assert a == b and scenes.draw(a).tobytes() == scenes.draw(b).tobytes()
    train = {repr(scenes.make_scene("train", i).things) for i in range(50)}
    val = {repr(scenes.make_scene("val", i).things) for i in range(50)}
    assert not train & val


def test_drawn_scene_has_the_colour_and_count_it_claims():
    ndimage = pytest.importorskip("scipy.ndimage", reason="scipy comes with scikit-image (the 'test' extra)")
    import numpy as np
    clean = [s for s in (scenes.make_scene("val", i) for i in range(40)) if s.clean]
    assert len(clean) >= 30
    for s in clean:
        if s.word and s.colour == "black":
            continue  # the word is black too
        im = np.asarray(scenes.draw(s)).astype(int)  # (224, 224, 3)
        mask = np.abs(im - np.array(scenes.COLOURS[s.colour])).sum(-1) < 10  # pixels of exactly that colour
        _, blobs = ndimage.label(mask)
        assert blobs == s.count, s


def test_questions_answers_and_grading():
    s = scenes.Scene("star", "blue", [scenes.Thing(40, 40, 20), scenes.Thing(150, 150, 20)], (240, 240, 240))
    qa = {k: a for k, _, a in scenes.questions(s, random.Random(0))}
    assert set(qa) == {"colour", "shape", "count"}  # no position question with two things, no word
    for kind, ans in qa.items():
        assert scenes.grade(kind, s, ans), (kind, ans)
    assert scenes.caption(s) == "Two blue stars."
    assert not scenes.grade("colour", s, "They are blue and red.")
    assert not scenes.grade("count", s, "There are 3.")
    assert scenes.grade("count", s, "I see two stars")
    assert not scenes.grade("shape", s, "circles")


# -- prompts and the splice ---------------------------------------------------------------------------------------
def test_image_prompt_layout(tiny):
    tiny.vision_adapter = random_adapter(tiny.config, lora=False)
    img = scenes.draw(scenes.make_scene("val", 0))
    msgs = [{"role": "user", "content": [{"type": "text", "text": "What is it?"}, {"type": "image", "image": img}]}]
    ids, blocks = tiny.chat_prompt(msgs)
    (start, block), = blocks
    assert block.shape == (P.IMAGE_TOKENS, tiny.config.d_model)
    assert ids[start: start + P.IMAGE_TOKENS] == [P.placeholder_id(tiny.tokenizer)] * P.IMAGE_TOKENS
    text = tiny.decode(ids)
    assert P.IMAGE_SYSTEM in text and text.index("What is it?") > text.index(P.IMAGE_SYSTEM)
    ids2, blocks2 = tiny.chat_prompt("What is it?", images=[img])  # the images= shortcut: image first
    assert len(ids2) == len(ids) and blocks2[0][0] != start


def test_engine_splices_images_like_a_full_embedding_prompt(tiny):
    tiny.vision_adapter = random_adapter(tiny.config, lora=False)
    imgs = [scenes.draw(scenes.make_scene("val", i)) for i in (1, 2)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    outs = []
    for img in imgs + imgs[:1]:  # the third repeats the first after another image used the same slot
        ids, blocks = tiny.chat_prompt("Describe it.", images=[img])
        got = [t.token for _, _, t in tiny.stream_ids([ids], params, images=[blocks])]
        # reference: one embedding tensor for the whole prompt, decoded by generate() without the engine
        emb = P.splice(tiny.model.embed(torch.tensor([ids]))[0].clone(), [blocks[0][0]], [blocks[0][1]])
        ref = [t.token for step in generate(tiny.model, [ids], params, prompt_embeds=[emb]) for t in step]
        assert got == ref
        outs.append(got)
    assert outs[0] == outs[2]
    without = [t.token for _, _, t in tiny.stream_ids([ids], params)]  # placeholder embeddings, no image
    assert without != outs[0] or without != outs[1]


def test_lora_changes_only_rows_with_images(tiny):
    model = tiny.model
    adapter = random_adapter(tiny.config, lora=True, seed=3)
    x = torch.randint(0, 50, (1, 12)).repeat(2, 1)  # (2, 12), the same row twice
    with torch.inference_mode():
        plain = model(x)
        adapter.attach_lora(model)
        try:
            model.adapter_rows = torch.tensor([True, False])
            mixed = model(x)
        finally:
            model.adapter_rows = None
        after = model(x)
    torch.testing.assert_close(mixed[1], plain[1])
    torch.testing.assert_close(after, plain)  # no image rows: the base model exactly
    assert (mixed[0] - plain[0]).abs().max() > 1e-3


def test_adapter_file_round_trip(tmp_path, tiny):
    a = random_adapter(tiny.config, lora=True)
    a.save(tmp_path / "a.safetensors")
    b = P.Adapter.load(tmp_path / "a.safetensors")
    assert b.fits(tiny.config) and b.meta["hidden"] == 32 and set(b.lora) == set(a.lora)
    grid = torch.rand(1, vision.FEATURES, 7, 7) * 6  # the encoder's channels and the cell colours
    torch.testing.assert_close(b.projector(grid), a.projector(grid), atol=2e-2, rtol=2e-2)  # stored in fp16
    # an adapter trained before the cell colours were added reads the first 1280 channels
    old = P.Adapter(P.Projector(tiny.config.d_model, d_in=vision.CHANNELS, hidden=32).eval(), {}, a.meta)
    old.save(tmp_path / "old.safetensors")
    again = P.Adapter.load(tmp_path / "old.safetensors")
    assert again.projector.d_in == vision.CHANNELS
    torch.testing.assert_close(again.projector(grid), old.projector(grid[:, : vision.CHANNELS]), atol=2e-2, rtol=2e-2)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(MMChatError, match="not an mmchat image adapter"):
        P.Adapter.load(tmp_path / "bad.safetensors")


# -- errors -------------------------------------------------------------------------------------------------------
def test_model_without_projector_is_a_clear_error(tiny):
    tiny.vision_adapter = None
    img = scenes.draw(scenes.make_scene("val", 0))
    with pytest.raises(MMChatError, match="has no image projector") as e:
        tiny.chat("What colour?", images=[img])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("part, message", [
    ({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, "not fetched"),
    ({"type": "image_url", "image_url": {}}, "needs image_url.url"),
    ({"type": "video", "video": "x"}, "unsupported content part type"),
])
def test_bad_parts(part, message):
    with pytest.raises(MMChatError, match=message):
        P.flatten_messages([{"role": "user", "content": [part]}])


def test_corrupt_image_in_chat(tiny):
    tiny.vision_adapter = random_adapter(tiny.config, lora=False)
    with pytest.raises(MMChatError, match="not a readable image"):
        tiny.chat([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8gd29ybGQ="}}]}])


# -- training -----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_vision_smoke(tmp_path, monkeypatch):
    """Two steps of stage 2 on a tiny model: the loop runs, the adapter is written and fits the model."""
    from mmchat.multimodal import vision
    real = vision.weights_path()  # the encoder's weights from the user's cache (pulled once)
    monkeypatch.setenv("MMCHAT_HOME", str(tmp_path / "home"))  # scene features cached here, not in the user's
    monkeypatch.setattr(vision, "weights_path", lambda progress=True: real)
    path = tm.workdir() / "llama-vision-train"
    if not path.exists():
        tm.save_hf_folder(tm.llama_model(tm.tokenizer().get_vocab_size(), ctx=512, seed=6), tm.tokenizer(), path)
    from mmchat.multimodal.train import align
    from mmchat.train.loop import TrainConfig
    cfg = TrainConfig(max_steps=2, batch_size=2, eval_every=0, eval_batches=1, save_every=0, warmup_steps=1,
                      progress=False, lr=1e-3)
    result = align(2, tmp_path / "run", cfg, model=str(path), n_train=6, n_eval=2)
    assert result["step"] == 2 and all(r["loss"] > 0 for r in result["history"])
    adapter = P.Adapter.load(result["adapter"])
    llm = mmchat.load(str(path), progress=False)
    assert adapter.fits(llm.config) and adapter.lora and adapter.meta["stage"] == 2
    assert (tmp_path / "run" / "checkpoint.pt").exists()



def test_train_vision_init_from_an_adapter_without_cell_colours_says_what_to_do(tmp_path):
    from mmchat.multimodal.train import align
    from mmchat.train.loop import TrainConfig
    old = P.Adapter(P.Projector(64, d_in=vision.CHANNELS, hidden=32).eval(), {},
                    {"d_model": 64, "n_layer": 2, "vocab_size": 100, "hidden": 32})
    old.save(tmp_path / "old.safetensors")
    with pytest.raises(MMChatError) as e:
        align(2, tmp_path / "run", TrainConfig(max_steps=1, progress=False), model="no-such-model",
              init=str(tmp_path / "old.safetensors"))
    msg = str(e.value)
    assert "\n" not in msg and "1280" in msg and "--stage 1" in msg


def test_chat_session_keeps_the_image_for_later_turns(tiny, tmp_path):
    from mmchat.chat.session import Chat
    tiny.vision_adapter = random_adapter(tiny.config, lora=True)
    picture = tmp_path / "scene.png"
    scenes.draw(scenes.make_scene("val", 4)).save(picture)
    chat = Chat(tiny, store=False, temperature=0.0, max_tokens=4)
    first = chat.send("What colour?", images=[str(picture)])
    assert chat.messages[0].meta["images"] == [str(picture.resolve())] and chat.messages[1].content == first.strip()
    blocks_turn1 = chat._image_blocks
    chat.send("And the shape?")  # the image is still part of what the model sees
    assert chat._image_blocks is not None and len(chat._image_blocks) == 1
    assert chat._image_blocks[0][0] == blocks_turn1[0][0]  # same place: the earlier turns render the same
    with pytest.raises(MMChatError, match="no such image file"):
        chat.send("this one?", images=[str(tmp_path / "missing.png")])


def test_image_rows_decode_with_their_lora_on_the_fused_kernels():
    """On mmchat's fused decode step (quantized models on its own CPU kernels) a batch with image rows takes the
    module path, so the adapter's LoRA shapes every answer token, not only the first (from the prompt)."""
    from mmchat import kernels
    from mmchat import quantize as Q
    from mmchat.config import ModelConfig
    from mmchat.model import Transformer
    if not kernels.available():
        pytest.skip("mmchat's kernels need an x86-64 CPU with AVX2 and a C compiler")
    cfg = ModelConfig(arch="llama", vocab_size=160, n_layer=2, d_model=64, n_head=4, n_kv_head=2, d_ff=128,
                      max_seq_len=64, tie_embeddings=True)
    torch.manual_seed(0)
    model = Q.quantize(Transformer(cfg).eval(), "int4")
    model.fused_blocks = kernels.FusedBlocks(model)
    random_adapter(cfg, lora=True).attach_lora(model)
    prompt, step = torch.randint(0, 160, (1, 6)), torch.tensor([[7]])

    def decode(rows, fused):
        model.fused_blocks, model.adapter_rows = fused, rows
        with torch.inference_mode():
            model.setup_cache(1, 16, torch.float16)  # the fused blocks' cache, on either path
            model(prompt, torch.arange(6)[None])
            return model(step, torch.tensor([[6]]))[:, -1]  # (1, V)

    fused = model.fused_blocks
    with_lora = decode(torch.tensor([True]), None)  # the module path, LoRA on
    assert torch.allclose(decode(torch.tensor([True]), fused), with_lora)
    assert not torch.allclose(decode(None, fused), with_lora, atol=1e-3)  # text rows: fused, no LoRA
