"""The engine loop on a thread of its own: commands from many threads, a fatal crash."""
import threading

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
