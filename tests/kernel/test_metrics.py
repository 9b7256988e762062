"""The metrics syscall (kernel/metrics.py): after a known workload every counter equals
what was sent, the histograms count what they should, and the processes are bounded.

In-process and step by step (as tests/kernel/test_kernel.py: the engine loop is run by
hand, so what runs in which step is exact), then once against a real kernel through the
SDK. Each test has an engine of its own: a model's counters count from its load.
"""
from __future__ import annotations

import threading

import pytest

from llmos.kernel import Engine, tunables
from llmos.kernel.load import EMBEDDED
from llmos.syscalls import Sys
from llmos.syscalls.types import MemInfo, Metrics, ProcMetrics
from tests.kernel.test_containment import Broken
from tests.kernel.test_kernel import answer, call, conn, run, stepped_kernel
from tests.kernels import running_kernel, until

T = 60
PROMPTS = ["12+47=", "reverse a b c =", "33+18="]
FIVE = dict(max_tokens=5, ignore_eos=True)        # greedy, exactly five tokens


@pytest.fixture
def k(tmp_path):
    engine = Engine.from_pretrained("tiny", num_blocks=64, poison=True)
    with stepped_kernel(tmp_path, engine, "tiny", EMBEDDED["tiny"]) as kern:
        yield kern


def metrics(k, c) -> Metrics:
    kind, r = answer(k, c, call(k, c, Sys.METRICS))
    assert kind == "ok", r
    return Metrics.from_wire(r)


def tiny(m: Metrics):
    [model] = m.models
    assert model.model == "tiny"
    return model


def publish(k) -> None:
    k.loop._publish(force=True)


def test_counters_equal_the_workload(k):
    engine = k.loop.models.slots["tiny"].engine
    c = conn(k)
    fives = [call(k, c, Sys.GENERATE, prompt=p, **FIVE) for p in PROMPTS]
    cancelled = call(k, c, Sys.GENERATE, prompt="x", max_tokens=400, ignore_eos=True)
    failing = call(k, c, Sys.GENERATE, prompt="y", max_tokens=5, temperature=1.0, seed=1)
    k.loop._drain(block=False)                 # the five are accepted by the engine: waiting
    publish(k)
    m = tiny(metrics(k, c))
    assert (m.running, m.waiting, m.requests) == (0, 5, dict.fromkeys(
        ("stop", "length", "abort", "error"), 0))
    engine.requests[k.procs.get(c.pid).requests[(c.peer, failing)]].generator = Broken()
    k.loop.models.step()                       # prefill: a first token each, but the failing
    k.loop.models.step()                       # one's draw raises; then a decode step
    publish(k)
    m = tiny(metrics(k, c))
    assert (m.running, m.waiting, m.requests["error"]) == (4, 0, 1)
    assert m.ttft.count == 4 and m.tpot.count == 0 and m.e2e.count == 1
    assert answer(k, c, call(k, c, Sys.CANCEL, call=cancelled)) == ("ok", {})
    run(k)

    done = [answer(k, c, cid)[1] for cid in fives + [cancelled]]
    assert [d["finish_reason"] for d in done] == ["length"] * 3 + ["abort"]
    assert [len(d["token_ids"]) for d in done] == [5, 5, 5, 2]
    assert answer(k, c, failing)[1][0] == "EIO"
    failed_prompt = len(engine.tokenizer.encode("y"))
    m = tiny(metrics(k, c))
    assert m.requests == {"stop": 0, "length": 3, "abort": 1, "error": 1}
    assert m.generated_tokens == 17 == engine.stats["generated_tokens"]
    assert m.prompt_tokens == sum(d["usage"]["prompt_tokens"] for d in done) + failed_prompt
    assert m.computed_tokens == m.prompt_tokens - sum(d["usage"]["cached_tokens"] for d in done)
    assert (m.running, m.waiting, m.preemptions, m.swapped_blocks) == (0, 0, 0, 0)
    kind, mem = answer(k, c, call(k, c, Sys.MEMINFO))
    assert m.kv == MemInfo.from_wire(mem).models["tiny"].kv and m.kv.used == 0
    # A token each but the failing one's; a time between tokens for those with two or more;
    # an end for all five.
    assert (m.ttft.count, m.tpot.count, m.e2e.count) == (4, 4, 5)
    for h, bounds in ((m.ttft, tunables.TTFT_BUCKETS), (m.tpot, tunables.TPOT_BUCKETS),
                      (m.e2e, tunables.E2E_BUCKETS)):
        assert h.bounds == list(bounds) and len(h.counts) == len(bounds) + 1
        assert sum(h.counts) == h.count and h.sum >= 0
    assert m.ttft.sum <= m.e2e.sum

    ps = k.ps(c.pid, True)[0]
    assert metrics(k, c).procs == [ProcMetrics(c.pid, ps.name, 5, ps.tokens_in, 17)]
    assert metrics(k, c).others == ProcMetrics(0, "other", 0, 0, 0)


def test_processes_are_bounded_and_the_rest_summed(k, monkeypatch):
    monkeypatch.setattr(tunables, "METRICS_PROCS", 2)
    conns = [conn(k, peer=b"p%d" % i) for i in range(4)]
    for i, c in enumerate(conns):            # 1, 2, 3 and 4 tokens out: the last is busiest
        call(k, c, Sys.GENERATE, prompt="12+47=", max_tokens=i + 1, ignore_eos=True)
    run(k)
    rows = {p.pid: p for p in k.ps(conns[0].pid, True)}
    m = metrics(k, conns[0])
    assert [p.pid for p in m.procs] == [conns[3].pid, conns[2].pid]
    assert [(p.requests, p.tokens_out) for p in m.procs] == [(1, 4), (1, 3)]
    rest = [rows[c.pid] for c in conns[:2]]
    assert m.others == ProcMetrics(0, "other", 2, sum(r.tokens_in for r in rest), 1 + 2)
    assert tiny(m).requests["length"] == 4


def test_an_agent_sees_the_processes_of_its_own_tree(k):
    owner = conn(k)
    agent = k.procs.spawn(["/bin/sleep", "30"], parent=owner.pid, log_dir=k.home.log_dir)
    a = conn(k, agent.token, b"agent")
    call(k, owner, Sys.GENERATE, prompt="12+47=", **FIVE)
    call(k, a, Sys.GENERATE, prompt="33+18=", max_tokens=2, ignore_eos=True)
    run(k)
    mine = metrics(k, a)
    assert [(p.pid, p.tokens_out) for p in mine.procs] == [(agent.pid, 2)]
    assert mine.others == ProcMetrics(0, "other", 0, 0, 0)
    assert tiny(mine).generated_tokens == 7        # the model's counters are everyone's
    assert {p.pid for p in metrics(k, owner).procs} == {owner.pid, agent.pid}


def test_a_real_kernel_answers_metrics_through_the_sdk(no_agent_env):
    from llmos.userland import SyscallError, connect
    with running_kernel() as (home, _), connect(home, timeout=T) as kern:
        assert kern.metrics().models[0].requests == dict.fromkeys(
            ("stop", "length", "abort", "error"), 0)
        outs = [kern.generate(p, **FIVE) for p in PROMPTS]
        stream = kern.generate("x", max_tokens=400, ignore_eos=True, stream=True)
        next(stream)                               # it has its first token
        threading.Thread(target=stream.cancel).start()
        with pytest.raises(SyscallError):
            stream.result()

        def settled():
            m = kern.metrics()
            return m if sum(m.models[0].requests.values()) == 4 and not m.models[0].waiting \
                and not m.models[0].running else None
        m = until(settled, "four requests finished", T)
        model = m.models[0]
        assert model.requests == {"stop": 0, "length": 3, "abort": 1, "error": 0}
        aborted = model.generated_tokens - 15
        assert aborted >= 1 and model.ttft.count == 4 and model.e2e.count == 4
        assert model.tpot.count == 3 + (aborted >= 2)
        assert model.prompt_tokens >= sum(o.usage.prompt_tokens for o in outs)
        me = next(p for p in m.procs if p.pid == kern.pid)
        assert (me.requests, me.tokens_out) == (4, model.generated_tokens)
        assert m.uptime > 0 and m.others.pid == 0
