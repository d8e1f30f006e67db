"""The continuous-batching engine against the plain batched generate() on a small random model."""
import asyncio
import time

import pytest
import torch

from mmchat.config import get_config
from mmchat.engine import Engine, EngineBusy
from mmchat.errors import MMChatError
from mmchat.generate import SamplingParams, generate_ids
from mmchat.model import Transformer

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], list(range(10, 80)), [3] * 20, [100, 200, 300, 400]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(get_config("tiny")).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)  # large enough weights that the output varies from token to token
    return m


@pytest.fixture
def engine(model):
    e = Engine(model, eos_token_ids=[], slots=3, max_len=256, prefill_chunk=16)
    yield e
    e.close()


def wait_until(cond, timeout=5.0):
    end = time.time() + timeout
    while not cond() and time.time() < end:
        time.sleep(0.01)
    return cond()


def test_batched_greedy_equals_one_at_a_time(model, engine):
    params = SamplingParams(max_tokens=24, temperature=0)
    alone = [generate_ids(model, [p], params)[0] for p in PROMPTS]
    assert len({tuple(a) for a in alone}) > 1  # the model does not answer everything the same way
    handles = [engine.submit(p, params) for p in PROMPTS]  # 5 requests, 3 slots: two wait, then join
    assert [h.tokens() for h in handles] == alone
    assert engine.stats.max_batch_size == 3
    assert engine.stats.prefilled_tokens == sum(map(len, PROMPTS))


def test_seeded_sampling_is_the_same_alone_and_batched(engine):
    params = SamplingParams(max_tokens=30, temperature=1.0, seed=1234)
    alone = engine.submit(PROMPTS[2], params).tokens()
    others = SamplingParams(max_tokens=30, temperature=1.0)  # unseeded neighbours
    handles = [engine.submit(PROMPTS[0], others), engine.submit(PROMPTS[2], params), engine.submit(PROMPTS[1], others)]
    batched = [h.tokens() for h in handles]
    assert batched[1] == alone
    assert len(set(alone)) > 3  # really sampled, not one repeated token
    other_seed = SamplingParams(max_tokens=30, temperature=1.0, seed=99)
    assert engine.submit(PROMPTS[2], other_seed).tokens() != alone


def test_prefix_reuse_prefills_only_the_new_part(engine):
    params = SamplingParams(max_tokens=10, temperature=0)
    first = engine.submit(PROMPTS[2], params)
    answer = first.tokens()
    before = engine.stats.prefilled_tokens
    follow_up = PROMPTS[2] + answer + [42, 43, 44]  # turn 2 of a conversation
    second = engine.submit(follow_up, params)
    got = second.tokens()
    # everything fed to the cache so far is reused: the prompt and all answer tokens but the last one
    assert second.cached_tokens == len(PROMPTS[2]) + len(answer) - 1
    assert engine.stats.prefilled_tokens - before == len(follow_up) - second.cached_tokens == 4
    engine.model.clear_cache()
    fresh = generate_ids(engine.model, [follow_up], params)[0]  # no reuse, from scratch
    assert got == fresh


def test_requests_sharing_a_system_prompt_compute_it_once(model, engine):
    """Requests that arrive together with the same leading tokens (a chat template's system prompt): the first
    one prefills them, the others copy its keys and values into their own slots, and answer as if alone."""
    system = list(range(120, 150))
    prompts = [system + [5, 6], system + [7, 8, 9], system + [11]]
    params = SamplingParams(max_tokens=12, temperature=0)
    alone = [generate_ids(model, [p], params)[0] for p in prompts]
    handles = [engine.submit(p, params) for p in prompts]
    assert [h.tokens() for h in handles] == alone
    assert engine.stats.copied_tokens == 2 * len(system)
    assert engine.stats.prefilled_tokens == sum(map(len, prompts)) - 2 * len(system)
    assert sorted(h.cached_tokens for h in handles) == [0, len(system), len(system)]


def test_cancel_frees_the_slot_at_once(engine):
    long = SamplingParams(max_tokens=10_000, temperature=0)
    handles = [engine.submit(p, long) for p in PROMPTS[:3]]
    assert wait_until(lambda: engine.running == 3)
    waiting = engine.submit(PROMPTS[3], SamplingParams(max_tokens=5, temperature=0))
    time.sleep(0.1)
    assert engine.queue_length == 1 and waiting.first_token_at is None  # all slots busy
    handles[1].cancel()
    assert len(waiting.tokens()) == 5  # got the freed slot while the others still run
    assert not handles[0].done and not handles[2].done
    for h in handles:
        h.cancel()
    assert wait_until(lambda: engine.running == 0)
    assert engine.stats.cancelled == 3


def test_full_queue_is_refused(model):
    e = Engine(model, slots=1, max_len=256, max_queue=2)
    try:
        long = SamplingParams(max_tokens=250, temperature=0)
        hs = [e.submit([1, 2], long)]
        assert wait_until(lambda: e.running == 1)
        hs += [e.submit([1, 2], long) for _ in range(2)]
        assert e.queue_length == 2
        with pytest.raises(EngineBusy):
            e.submit([1, 2], SamplingParams(max_tokens=4))
        assert e.stats.rejected == 1
        for h in hs:
            h.cancel()
    finally:
        e.close()


def test_bad_requests_are_one_line_errors(engine):
    with pytest.raises(MMChatError, match="empty"):
        engine.submit([], SamplingParams())
    with pytest.raises(MMChatError, match="context window"):
        engine.submit([1] * 500, SamplingParams())
    with pytest.raises(MMChatError, match="vocabulary"):
        engine.submit([1, 10**6], SamplingParams())
    with pytest.raises(MMChatError, match="temperature"):
        engine.submit([1], SamplingParams(temperature=-1))


def test_async_iteration_and_logprobs(engine):
    params = SamplingParams(max_tokens=8, temperature=0, top_logprobs=3)

    async def collect():
        return [t async for t in engine.submit(PROMPTS[0], params)]

    outs = asyncio.run(collect())
    assert [t.token for t in outs] == engine.submit(PROMPTS[0], params).tokens()
    assert outs[-1].finish_reason == "length" and all(t.finish_reason is None for t in outs[:-1])
    for t in outs:  # greedy: the chosen token is the most likely alternative
        assert len(t.top) == 3 and t.top[0][0] == t.token and t.top[0][1] == pytest.approx(t.logprob, abs=1e-5)


def test_eos_stops_with_reason_stop(model):
    params = SamplingParams(max_tokens=20, temperature=0)
    tokens = generate_ids(model, [PROMPTS[0]], params)[0]
    e = Engine(model, eos_token_ids=[tokens[3]], slots=2, max_len=64)
    try:
        outs = list(e.submit(PROMPTS[0], params))
        assert outs[-1].finish_reason == "stop" and outs[-1].token == tokens[3]
        assert len(outs) == tokens.index(tokens[3]) + 1
    finally:
        e.close()


def test_idle_rows_in_a_decode_batch_keep_their_cache(model, engine):
    """Slot 0 finishes while slot 1 still decodes (slot 0 rides along in the batch as an idle row); a follow-up
    that reuses slot 0's cache must still give exactly the from-scratch answer."""
    short, long = SamplingParams(max_tokens=5, temperature=0), SamplingParams(max_tokens=150, temperature=0)
    a = engine.submit(PROMPTS[0], short)
    b = engine.submit(PROMPTS[1], long)
    answer = a.tokens()
    assert not b.done  # b is still decoding, with a's slot idle below it
    follow_up = PROMPTS[0] + answer + [11, 12, 13]
    c = engine.submit(follow_up, short)
    got = c.tokens()
    assert c.cached_tokens == len(PROMPTS[0]) + len(answer) - 1 and not b.done
    b.cancel()
    assert wait_until(lambda: engine.running == 0)  # the engine is idle before this thread uses the model
    engine.model.clear_cache()
    assert got == generate_ids(engine.model, [follow_up], short)[0]


def test_short_requests_pass_a_long_one_and_long_prefills_are_chunked(engine):
    """A long answer does not hold up a short one, and a long prompt (prefilled 16 tokens per step) does not
    stall a sequence that is already decoding: it keeps getting a token every step."""
    long = engine.submit(PROMPTS[1], SamplingParams(max_tokens=200, temperature=0))
    it = iter(long)
    next(it)  # decoding now
    short = engine.submit(PROMPTS[0], SamplingParams(max_tokens=5, temperature=0))
    assert len(short.tokens()) == 5 and not long.done
    before = len(long.generated)
    prompt = list(range(1, 200))  # 199 tokens: 13 chunks of 16
    big = engine.submit(prompt, SamplingParams(max_tokens=1, temperature=0))
    big.tokens()
    during = len(long.generated) - before
    assert during >= 12, during  # one decode step of the long answer per prefill chunk
    long.cancel()


def test_direct_generate_beside_a_running_engine(model, engine):
    """A direct generate() on the engine's model from another thread takes turns with the engine's loop, one
    forward pass at a time, each with its own cache: both get what they get alone."""
    import threading
    params = SamplingParams(max_tokens=40, temperature=0)
    want_direct = generate_ids(model, [PROMPTS[2]], params)[0]
    want_engine = [engine.submit(p, params).tokens() for p in PROMPTS[:3]]
    got = {}
    for _ in range(3):  # a few rounds, so the two really interleave
        handles = [engine.submit(p, params) for p in PROMPTS[:3]]
        t = threading.Thread(target=lambda: got.__setitem__("direct", generate_ids(model, [PROMPTS[2]], params)[0]))
        t.start()
        assert [h.tokens() for h in handles] == want_engine
        t.join()
        assert got["direct"] == want_direct


def test_async_consumers_are_woken_once_per_step_for_all_their_tokens(engine):
    """Many streams on one event loop: every item arrives, and the engine hands the loop one wake-up per step
    (not one per token)."""
    loop_calls = []

    async def main():
        loop = asyncio.get_running_loop()
        original = loop.call_soon_threadsafe

        def counting(callback, *args, **kwargs):
            loop_calls.append(callback)
            return original(callback, *args, **kwargs)

        loop.call_soon_threadsafe = counting
        params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
        handles = [engine.submit(p, params) for p in PROMPTS[:3]]

        async def collect(h):
            return [t.token async for t in h]

        return await asyncio.gather(*(collect(h) for h in handles)), handles

    got, handles = asyncio.run(main())
    assert [len(g) for g in got] == [20, 20, 20]
    assert got == [h.generated for h in handles]
    # 3 streams x 20 tokens (+ their ends) arrive in about 20 decode steps and a few prefills, not 63 wake-ups
    assert len(loop_calls) <= 20 + 3 + 3, len(loop_calls)
