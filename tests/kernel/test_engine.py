"""The engine against Hugging Face transformers on the same random-weight checkpoints.

Every checkpoint is written to disk by transformers and loaded back by llmos' own
loader, in float32; outputs must be token-identical to transformers' greedy decoding.
"""
import random

import pytest
import torch

from llmos.kernel import Engine, KVOutOfMemory, EngineError
from tests.checkpoints import make_checkpoint

KINDS = ["llama", "qwen2", "qwen3", "mistral"]
NEW_TOKENS = 32
PROMPT_LENS = [1, 7, 16, 17, 40]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {kind: make_checkpoint(kind, root / kind) for kind in KINDS}


def prompts_for(vocab: int, lens=PROMPT_LENS, seed=0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lens]


def hf_greedy(path, prompts, new_tokens=NEW_TOKENS) -> list[list[int]]:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None       # as ignore_eos: decode every token
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=new_tokens, pad_token_id=0)
            out.append(gen[0, len(p):].tolist())
    return out


DRIVER = "cpu"


@pytest.fixture(autouse=True, params=["cpu", "sim"])
def driver(request, monkeypatch):
    """Every engine test runs on the cpu driver and on the sim plugin driver."""
    monkeypatch.setitem(globals(), "DRIVER", request.param)
    return request.param


def engine_for(path, **kw) -> Engine:
    kw.setdefault("num_blocks", 64)
    kw.setdefault("driver", DRIVER)
    kw.setdefault("dtype", "float32")   # token identity with transformers is a float32 promise
    return Engine.from_pretrained(str(path), poison=True, **kw)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_matches_transformers(ckpts, kind):
    engine = engine_for(ckpts[kind])
    prompts = prompts_for(engine.config.vocab_size)
    got = engine.generate(prompts, max_tokens=NEW_TOKENS, ignore_eos=True)
    want = hf_greedy(ckpts[kind], prompts)
    for p, c, w in zip(prompts, got, want):
        assert c.token_ids == w, f"prompt of {len(p)} tokens"
        assert c.finish_reason == "length"
    assert engine.blocks.num_free_blocks == engine.num_blocks


def test_batched_equals_alone(ckpts):
    engine = engine_for(ckpts["llama"], max_num_batched_tokens=24)  # forces chunked prefill
    prompts = prompts_for(engine.config.vocab_size, seed=1)
    batched = engine.generate(prompts, max_tokens=20, ignore_eos=True)
    for p, b in zip(prompts, batched):
        alone = engine.generate([p], max_tokens=20, ignore_eos=True)[0]
        assert alone.token_ids == b.token_ids


def test_prefix_cache_hit_same_output_fewer_tokens(ckpts):
    engine = engine_for(ckpts["qwen2"])
    shared = prompts_for(engine.config.vocab_size, lens=[48], seed=2)[0]
    first = engine.generate([shared + [5, 6]], max_tokens=16, ignore_eos=True)[0]
    computed = engine.stats["computed_tokens"]
    again = engine.generate([shared + [5, 6]], max_tokens=16, ignore_eos=True)[0]
    assert again.token_ids == first.token_ids
    assert again.usage.cached_tokens == 48
    assert engine.stats["computed_tokens"] - computed == 50 - 48 + 15
    cold = engine_for(ckpts["qwen2"], enable_prefix_caching=False)
    assert cold.generate([shared + [5, 6]], max_tokens=16, ignore_eos=True)[0].token_ids \
        == first.token_ids


def test_salt_keeps_owners_apart(ckpts):
    engine = engine_for(ckpts["llama"])
    prompt = prompts_for(engine.config.vocab_size, lens=[40], seed=3)[0]
    for salt, cached in ((b"a", 0), (b"a", 32), (b"b", 0)):
        req = engine.add_request(prompt, max_tokens=1, salt=salt)
        while engine.has_work():
            engine.step()
        assert req.usage.cached_tokens == cached, salt


@pytest.mark.parametrize("swap_blocks", [0, 32], ids=["recompute", "swap"])
def test_small_pool_preempts_and_gives_same_outputs(ckpts, swap_blocks):
    prompts = prompts_for(128, lens=[30, 25, 20, 35, 28, 33, 22, 26], seed=4)
    big = engine_for(ckpts["llama"], num_blocks=64)
    want = [c.token_ids for c in big.generate(prompts, max_tokens=24, ignore_eos=True)]
    # one request needs up to 4 blocks: eight of them need 30
    small = engine_for(ckpts["llama"], num_blocks=8, num_swap_blocks=swap_blocks)
    got = [c.token_ids for c in small.generate(prompts, max_tokens=24, ignore_eos=True)]
    assert got == want
    assert small.scheduler.num_preemptions > 0
    if swap_blocks:
        assert small.swapper.swapped_out > 0 and small.swapper.swapped_in == small.swapper.swapped_out
        assert small.swapper.host.num_free_blocks == swap_blocks
    assert small.blocks.num_free_blocks == 8
    small.blocks.check_invariants()


def test_sim_driver_of_small_capacity_swaps_and_loses_nothing(ckpts, monkeypatch):
    """The sim plugin (examples/llmos-driver-sim) stands in for a small accelerator."""
    monkeypatch.setenv("LLMOS_SIM_MEMORY", "64K")
    path = ckpts["mistral"]
    prompts = prompts_for(128, lens=[40, 33, 27, 45, 38, 30], seed=8)
    big = engine_for(path, driver="cpu")
    want = [c.token_ids for c in big.generate(prompts, max_tokens=20, ignore_eos=True)]
    sim = Engine.from_pretrained(str(path), driver="sim", kv_memory="64K", poison=True)
    need = sum(-(-(len(p) + 20) // 16) for p in prompts)
    assert sim.num_blocks < need / 2       # the whole workload needs over twice the pool
    got = [c.token_ids for c in sim.generate(prompts, max_tokens=20, ignore_eos=True)]
    assert got == want
    assert sim.swapper.swapped_out > 0
    with pytest.raises(ValueError, match="does not fit"):
        Engine.from_pretrained(str(path), driver="sim", kv_memory="128K")


def test_request_that_can_never_fit_is_refused(ckpts):
    engine = engine_for(ckpts["llama"], num_blocks=4)
    with pytest.raises(KVOutOfMemory, match="needs 5 KV blocks"):
        engine.add_request(list(range(3, 60)), max_tokens=20)
    with pytest.raises(EngineError, match="context length"):
        engine.add_request([3], max_tokens=10 ** 9)
    with pytest.raises(EngineError, match="top_p"):
        engine.add_request([3], top_p=0.0)
    with pytest.raises(EngineError, match="token ids"):
        engine.add_request([3, 10 ** 6])
    with pytest.raises(EngineError, match="messages"):
        engine.add_request(messages=[{"role": "wizard", "content": "hi"}])
    with pytest.raises(EngineError, match="messages"):
        engine.add_request(messages=["hi"])
    with pytest.raises(EngineError, match="prompt"):
        engine.add_request(42)
    with pytest.raises(EngineError, match="not a sampling option"):
        engine.add_request([3], temprature=0.5)
    assert engine.generate([[3, 4]], max_tokens=2)[0].finish_reason in ("length", "stop")


def test_multi_turn_context_computes_only_new_tokens(ckpts):
    engine = engine_for(ckpts["qwen3"])
    vocab = engine.config.vocab_size
    turn1, turn2 = prompts_for(vocab, lens=[20, 9], seed=5)
    ctx = engine.context_create(turn1)
    r1 = engine.add_request([], context=ctx, max_tokens=8, ignore_eos=True)
    while engine.has_work():
        engine.step()
    r2 = engine.add_request(turn2, context=ctx, max_tokens=8, ignore_eos=True)
    while engine.has_work():
        engine.step()
    assert r2.usage.prompt_tokens == 20 + 8 + 9
    assert r2.usage.computed_tokens == 1 + 9     # last reply token + the new turn
    full = turn1 + r1.output_ids + turn2
    assert engine.generate([full], max_tokens=8, ignore_eos=True)[0].token_ids == r2.output_ids
    engine.context_free(ctx)
    assert engine.blocks.num_free_blocks == engine.num_blocks


def test_a_chat_turn_brings_the_part_of_the_closing_its_context_lacks():
    from llmos.kernel.engine import continued
    closing, turn = [7, 8], [1, 2]                  # e.g. <|im_end|> "\n", then the turn
    assert continued([5, 7, 8], closing, turn) == [1, 2]        # a system prompt alone
    assert continued([5, 7], closing, turn) == [8, 1, 2]        # a reply stopped at <|im_end|>
    assert continued([5, 6], closing, turn) == [7, 8, 1, 2]     # one cut by max_tokens
    assert continued([], closing, turn) == [7, 8, 1, 2]


def test_fork_continues_like_recompute(ckpts):
    engine = engine_for(ckpts["mistral"])
    vocab = engine.config.vocab_size
    base, a, b = prompts_for(vocab, lens=[21, 5, 6], seed=6)   # 21: a partial last block
    parent = engine.context_create(base)
    engine.add_request([], context=parent, max_tokens=0)
    while engine.has_work():
        engine.step()
    child = engine.context_fork(parent)
    used = engine.num_blocks - engine.blocks.num_free_blocks
    ra = engine.add_request(a, context=parent, max_tokens=12, ignore_eos=True)
    rb = engine.add_request(b, context=child, max_tokens=12, ignore_eos=True)
    while engine.has_work():
        engine.step()
    want = engine.generate([base + a, base + b], max_tokens=12, ignore_eos=True)
    assert ra.output_ids == want[0].token_ids and rb.output_ids == want[1].token_ids
    assert rb.usage.cached_tokens == 21 and used == 2      # the child shared both blocks
    for ctx in (parent, child):
        engine.context_free(ctx)
    assert engine.blocks.num_free_blocks == engine.num_blocks


def test_stop_strings_streaming_and_seeds(ckpts):
    engine = engine_for(ckpts["llama"])
    prompt = prompts_for(engine.config.vocab_size, lens=[12], seed=7)[0]
    full = engine.generate([prompt], max_tokens=24, ignore_eos=True)[0]
    assert len(full.text) > 6
    stop = full.text[3:6]
    cut = engine.generate([prompt], max_tokens=24, ignore_eos=True, stop=[stop])[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.find(stop)]
    deltas = []
    engine.add_request(prompt, max_tokens=24, ignore_eos=True, on_event=deltas.append,
                       stream=True)
    while engine.has_work():
        engine.step()
    assert "".join(d.text for d in deltas) == full.text
    assert sum((d.token_ids for d in deltas), []) == full.token_ids
    assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])
    kw = dict(max_tokens=16, temperature=1.0, top_k=20, top_p=0.9, min_p=0.01, seed=11)
    one = engine.generate([prompt], **kw)[0]
    crowd = engine.generate([prompt, prompt[:5], prompt[2:]], **kw)[0]
    assert one.token_ids == crowd.token_ids


def test_abort(ckpts):
    engine = engine_for(ckpts["llama"])
    events = []
    req = engine.add_request([3, 4, 5], max_tokens=30, on_event=events.append)
    engine.step()
    assert engine.abort(req.id)
    assert events[-1].completion.finish_reason == "abort"
    assert not engine.has_work() and engine.blocks.num_free_blocks == engine.num_blocks


def test_embedded_tiny_matches_transformers_and_answers():
    from transformers import AutoModelForCausalLM

    from llmos.kernel.load import resolve_model
    from llmos.kernel.tiny import tasks
    engine = Engine.from_pretrained("tiny", poison=True, driver=DRIVER, dtype="float32")
    assert engine.config.num_key_value_heads < engine.config.num_attention_heads
    cases = [ex + (task,) for task in tasks.TASKS for ex in tasks.examples(task, 4, "test")]
    prompts = [engine.tokenizer.encode_chat(p) if isinstance(p, list) else engine.tokenizer.encode(p)
               for p, _, _ in cases]
    got = engine.generate(prompts, max_tokens=12)
    hf = AutoModelForCausalLM.from_pretrained(resolve_model("tiny"), dtype=torch.float32).eval()
    for ids, c, (_, expected, task) in zip(prompts, got, cases):
        with torch.no_grad():
            want = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12)
        assert c.token_ids == want[0, len(ids):].tolist()
        assert tasks.score(task, c.text, expected), (c.text, expected)


@pytest.mark.parametrize("options, message", [
    ({"kv_memory": "1K"}, "hold no block"),
    ({"kv_memory": "lots"}, "not a size"),
    ({"num_blocks": 0}, "too small"),
    ({"dtype": "int8"}, "dtype"),
    ({"driver": "nope"}, "unknown driver"),
])
def test_bad_engine_options_are_clear_errors(ckpts, options, message):
    with pytest.raises(ValueError, match=message):
        Engine.from_pretrained(str(ckpts["llama"]), **options)
