"""One request's failure stays that request's: the engine step survives it, fails only
that request (EIO, with the reason), and every other request runs as if it were not
there. A failure of the model forward is the whole engine's and still leaves step().
"""
import logging
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmos.kernel import Engine
from llmos.kernel.sampling import SamplingParams, sample
from tests.kernels import running_kernel

T = 60          # seconds: the bound on every wait here
PROMPTS = ["12+47=", "reverse a b c =", "33+18=", "reverse d o g ="]
GREEDY = dict(temperature=0.0)
# Options the spec admits at their edges; each of these must decode exactly as greedy.
AS_GREEDY = [dict(temperature=1e-300), dict(temperature=1e-45), dict(temperature=5e-324),
             dict(temperature=1.0, top_p=1e-9), dict(temperature=1.0, top_p=5e-324),
             dict(temperature=1.0, min_p=1.0), dict(temperature=100.0, top_k=1)]
SEEDED = dict(temperature=1.0, seed=7)


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained("tiny", num_blocks=64, poison=True)


def run(engine, jobs, setup=None, check_free=True) -> list:
    """Run (prompt, options) jobs batched to the end; the last RequestOutput of each, in
    order. `setup(i, req)` may alter request i once it is queued."""
    reqs = [engine.add_request(p, **{"max_tokens": 8, "ignore_eos": True, **o}) for p, o in jobs]
    for i, req in enumerate(reqs):
        if setup is not None:
            setup(i, req)
    last = {}
    for _ in range(200):
        if not engine.has_work():
            break
        last.update((d.request_id, d) for d in engine.step() if d.finished)
    assert not engine.has_work(), "the batch did not finish in 200 steps"
    assert not check_free or engine.blocks.num_free_blocks == engine.num_blocks
    return [last[r.id] for r in reqs]


def tokens_alone(engine, prompt, options) -> list[int]:
    out, = run(engine, [(prompt, options)])
    assert out.error is None
    return out.completion.token_ids


# ---- sampling at the edges of the spec ----------------------------------------------------

def test_edge_options_decode_as_greedy_and_leave_the_batch_alone(engine):
    jobs = [(PROMPTS[i % len(PROMPTS)], o) for i, o in enumerate(AS_GREEDY)]
    jobs += [(PROMPTS[0], SEEDED), (PROMPTS[1], GREEDY)]
    outs = run(engine, jobs)
    for (prompt, options), out in zip(jobs, outs):
        assert out.error is None and out.completion.finish_reason == "length", options
        want = tokens_alone(engine, prompt, SEEDED if options is SEEDED else GREEDY)
        assert out.completion.token_ids == want, options


@settings(max_examples=300, deadline=None)
@given(temperature=st.floats(0, 100), top_k=st.integers(0, 1 << 20),
       top_p=st.floats(0, 1, exclude_min=True), min_p=st.floats(0, 1),
       scale=st.sampled_from([1e-30, 1.0, 1e4, 1e30]), seed=st.integers(0, 2**31))
def test_every_admitted_option_samples_a_token(temperature, top_k, top_p, min_p, scale, seed):
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(seed)) * scale
    p = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p).check(50)
    tokens = sample(logits, [p, SamplingParams()], [None, None])
    assert all(isinstance(t, int) and 0 <= t < 50 for t in tokens), tokens


def test_nan_logits_fail_a_sampled_row_and_leave_greedy_rows_deterministic():
    logits = torch.randn(3, 50)
    logits[0] = float("nan")
    logits[1, 7] = float("inf")
    p = SamplingParams(temperature=1.0)
    out = sample(logits, [p, p, SamplingParams()], [None, None, None])
    assert isinstance(out[0], FloatingPointError) and isinstance(out[1], FloatingPointError)
    assert out[2] == int(logits[2].argmax())
    assert sample(logits[:1], [SamplingParams()], [None]) == sample(logits[:1], [SamplingParams()], [None])


# ---- one request breaks: only it fails ------------------------------------------------------

class Broken:
    """Stands for a request's generator, detokenizer or tokenizer; every use raises."""
    def __getattr__(self, name):
        raise RuntimeError(f"broken {name}")


def poison_logits(engine, monkeypatch, victim_ids):
    """The runner returns NaN logits for the victims' rows (as a poisoned KV block would)."""
    real = engine.runner.run

    def run_(items):
        reqs, logits = real(items)
        logits = logits.clone()             # out of inference mode, to be written
        for i, r in enumerate(reqs):
            if r.id in victim_ids:
                logits[i] = float("nan")
        return reqs, logits
    monkeypatch.setattr(engine.runner, "run", run_)


def break_generator(req):
    req.generator = Broken()        # the draw raises (TypeError from multinomial)


def break_stop_strings(req):
    req.detok = Broken()            # append's incremental decode raises


def break_final_decode(req):
    req.tokenizer = Broken()        # take_delta's decode of the whole output raises


@pytest.mark.parametrize("how", ["generator", "stop", "final-decode", "nan-logits"])
def test_a_request_that_breaks_fails_alone_and_the_others_are_untouched(engine, monkeypatch,
                                                                        caplog, how):
    others = [(PROMPTS[0], SEEDED), (PROMPTS[1], GREEDY), (PROMPTS[2], dict(temperature=0.7, seed=3))]
    alone = run(engine, others)
    options = {"generator": dict(temperature=1.0, seed=1), "stop": dict(stop=["zz"]),
               "final-decode": GREEDY, "nan-logits": dict(temperature=1.0)}[how]
    victim = 1                     # in the middle of the batch
    jobs = others[:victim] + [(PROMPTS[3], options)] + others[victim:]
    victims = set()

    def setup(i, req):
        if i != victim:
            return
        victims.add(req.id)
        {"generator": break_generator, "stop": break_stop_strings,
         "final-decode": break_final_decode, "nan-logits": lambda r: None}[how](req)
    if how == "nan-logits":
        poison_logits(engine, monkeypatch, victims)
    with caplog.at_level(logging.ERROR, "llmos.engine"):
        outs = run(engine, jobs, setup)
    failed = outs.pop(victim)
    assert failed.error and failed.error_code == "EIO"
    assert failed.completion.finish_reason == "abort"
    assert [o.error for o in outs] == [None] * len(others)
    assert [o.completion.token_ids for o in outs] == [a.completion.token_ids for a in alone]
    records = [r for r in caplog.records if r.name == "llmos.engine"]
    assert len(records) == 1 and records[0].exc_info and f"request {failed.request_id}" in records[0].getMessage()


def test_a_refused_request_keeps_the_out_of_memory_code():
    # Without paging (and swap), an idle context keeps its blocks: 3 of the 4.
    engine = Engine.from_pretrained("tiny", num_blocks=4, block_size=16, num_swap_blocks=0,
                                    kv_paging=False)
    ctx = engine.context_create(list(range(3, 43)))
    run(engine, [([], dict(context=ctx, max_tokens=1))], check_free=False)
    out, = run(engine, [([50 + i % 20 for i in range(30)], {})], check_free=False)
    assert out.error.startswith("out of KV memory") and out.error_code == "ENOMEM"


def test_a_model_forward_failure_propagates_out_of_step(monkeypatch):
    engine = Engine.from_pretrained("tiny", num_blocks=64)    # left broken: the kernel would exit

    def forward(*args, **kwargs):
        raise RuntimeError("device lost")
    monkeypatch.setattr(engine.model, "forward", forward)
    engine.add_request(PROMPTS[0], max_tokens=4, temperature=1.0)
    engine.add_request(PROMPTS[1], max_tokens=4)
    with pytest.raises(RuntimeError, match="device lost"):
        engine.step()


# ---- the real kernel -------------------------------------------------------------------------

OTHER_PROCESS = """
import sys
from llmos.userland import connect
print(connect(sys.argv[1], timeout=60).generate(prompt="33+18=", max_tokens=8).text)
"""


@pytest.fixture
def kernel_home():
    """(home, Popen) of a kernel on tiny, for this test."""
    with running_kernel() as kernel:
        yield kernel


def test_a_vanishing_temperature_is_greedy_and_the_kernel_lives_on(kernel_home):
    from llmos.userland import connect
    home, proc = kernel_home
    k = connect(home, timeout=T)
    assert k.generate(prompt="12+47=", temperature=1e-300, max_tokens=8).text == "59"
    assert proc.poll() is None
    other = subprocess.run([sys.executable, "-c", OTHER_PROCESS, home], capture_output=True,
                           text=True, timeout=T)
    assert other.returncode == 0, other.stderr
    assert other.stdout.strip() == "51"
    assert proc.poll() is None
