"""The engine loop on a thread of its own: commands from many threads, a fatal crash."""
import threading
import time

import pytest

from llmos.kernel import Engine
from llmos.syscalls import Sys
from llmos.syscalls.home import Home
from llmos.syscalls.types import ProcState
from tests.kernel.engines import supervisor
from tests.kernel.test_kernel import TOKEN, Outbox, call, conn

T = 60


@pytest.fixture
def kernel(tmp_path, checkpoints):
    engine = Engine.from_pretrained(str(checkpoints["llama"]), num_blocks=64, poison=True)
    home = Home(tmp_path / "home")
    home.log_dir.mkdir(parents=True)
    k = supervisor(home, engine, "llama", checkpoints["llama"], TOKEN)
    k.outbox = Outbox()
    k.loop.start()
    yield k
    k.loop.stop()
    k.procs.shutdown(grace=1)
    k.close()


def test_calls_from_many_threads_match_in_process(kernel, checkpoints):
    prompts = [[5 + i, 6, 7, 8 + i] for i in range(8)]
    want = Engine.from_pretrained(str(checkpoints["llama"]), num_blocks=64).generate(
        prompts, max_tokens=12, ignore_eos=True)
    results: dict[int, list] = {}

    def agent(i: int) -> None:
        c = conn(kernel, peer=b"agent%d" % i)
        cid = call(kernel, c, Sys.GENERATE, token_ids=prompts[i], max_tokens=12,
                   ignore_eos=True, stream=True)
        kind, r = kernel.outbox.reply(c.peer, cid, T)
        streamed = [t for e in kernel.outbox.events(c.peer, cid) for t in e["token_ids"]]
        assert streamed == r["token_ids"]
        results[i] = r["token_ids"]

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(T)
    assert [results[i] for i in range(8)] == [c.token_ids for c in want]


def test_a_crash_is_fatal_and_fails_what_is_queued(kernel):
    crashed = threading.Event()
    kernel.loop.on_crash = lambda exc: crashed.set()

    def boom():
        raise RuntimeError("broken invariant")

    c = conn(kernel)
    kernel.loop.models.slots["llama"].engine.step = boom
    first = call(kernel, c, Sys.GENERATE, prompt="1+1=", max_tokens=4)
    assert crashed.wait(T) and not kernel.loop.alive
    later = call(kernel, c, Sys.GENERATE, prompt="1+1=", max_tokens=4)
    assert kernel.outbox.reply(c.peer, later, T)[1][0] == "ECANCELED"
    assert "broken invariant" in kernel.outbox.reply(c.peer, later, T)[1][1]
    del first                     # in the engine when it broke: the server's close answers it
    child = kernel.procs.attach("child", parent=c.pid)
    kernel.procs.detach(child.pid, 5)           # a death is still released, not left hanging
    assert kernel.procs.get(child.pid).waitable
    assert kernel.procs.get(child.pid).state is ProcState.ZOMBIE


def test_work_waiting_for_a_loading_model_goes_with_its_process(kernel, checkpoints, tmp_path,
                                                                monkeypatch):
    from llmos.kernel.registry import ModelSpec
    gate = tmp_path / "go"
    monkeypatch.setenv("LLMOS_FAULT", f"load-wait:{gate}")      # the load is held until gate
    kernel.registry.boot(ModelSpec("qwen", str(checkpoints["qwen3"])))
    owner = conn(kernel)
    agent = kernel.procs.spawn(["/bin/sleep", "30"], parent=owner.pid, log_dir=kernel.home.log_dir)
    a = conn(kernel, agent.token, b"agent")
    cid = call(kernel, a, Sys.GENERATE, token_ids=[5, 6, 7], model="qwen", max_tokens=8)
    canceled = call(kernel, a, Sys.GENERATE, token_ids=[5, 6], model="qwen", max_tokens=8)
    slot = until_slot(kernel, "qwen", waiting=2)
    assert call_ok(kernel, a, Sys.CANCEL, call=canceled)
    assert kernel.outbox.reply(a.peer, canceled, T)[1]["finish_reason"] == "abort"
    kernel.procs.kill(agent.pid, "KILL", caller=owner.pid)      # dies while its call waits
    deadline = time.monotonic() + T
    while slot.waiting and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not slot.waiting                                     # taken out, not left to run
    gate.touch()
    deadline = time.monotonic() + T
    while slot.state != "ready" and time.monotonic() < deadline:
        time.sleep(0.01)
    engine = slot.engine
    assert engine is not None and not engine.requests and engine.stats["generated_tokens"] == 0
    assert not kernel.procs.get(agent.pid).requests
    del cid


def test_a_context_freed_before_its_model_loaded_is_never_made(kernel, checkpoints, tmp_path,
                                                                monkeypatch):
    from llmos.kernel.registry import ModelSpec
    gate = tmp_path / "go"
    monkeypatch.setenv("LLMOS_FAULT", f"load-wait:{gate}")
    kernel.registry.boot(ModelSpec("qwen", str(checkpoints["qwen3"])))
    owner = conn(kernel)
    agent = kernel.procs.spawn(["/bin/sleep", "30"], parent=owner.pid, log_dir=kernel.home.log_dir)
    a = conn(kernel, agent.token, b"agent")
    create = call(kernel, a, Sys.CONTEXT_CREATE, model="qwen")
    slot = until_slot(kernel, "qwen", waiting=1)
    [guessed] = kernel.procs.get(agent.pid).contexts      # ids count up: an agent can guess
    assert call_ok(kernel, a, Sys.CONTEXT_FREE, context=guessed)
    gate.touch()
    assert kernel.outbox.reply(a.peer, create, T)[1][0] == "ESRCH"
    deadline = time.monotonic() + T
    while slot.state != "ready" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert slot.engine is not None and not slot.engine.contexts and slot.idle()


def until_slot(kernel, name, waiting, timeout=T):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        slot = kernel.loop.models.slots.get(name)
        if slot is not None and len(slot.waiting) >= waiting:
            return slot
        time.sleep(0.01)
    raise AssertionError(f"no {waiting} commands waiting for {name}")


def call_ok(kernel, c, nr, **args) -> bool:
    cid = call(kernel, c, nr, **args)
    return kernel.outbox.reply(c.peer, cid, T)[0] == "ok"
