"""The client Connection: shared by threads, deadlines, and a dead kernel."""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from llmos.syscalls import CallTimeout, Connection, KernelDead, Sys, SyscallError
from tests.syscalls.conftest import TOKEN, wait_for

DEAD_BOUND = 15.0    # s: a silent kernel is KernelDead after ~3 s (dead_after); generous for CI

CHILD = r"""
import sys, threading
from llmos.kernel.server import Server
from llmos.kernel.syscall import PENDING, SyscallTable
from llmos.syscalls import Sys
t = SyscallTable()
t.register(Sys.HELLO, lambda call, args: {"pid": 1})
t.register(Sys.WAIT, lambda call, args: PENDING)          # never answered
Server(sys.argv[1], t).start()
print("ready", flush=True)
threading.Event().wait()
"""


def test_eight_threads_share_one_connection(server, handlers):
    errors, results = [], {}
    with Connection(server.endpoint, token=TOKEN, timeout=20) as c:
        def worker(k):
            try:
                got = []
                for i in range(60):
                    if i % 3 == 0:
                        got.append(c.call(Sys.WAIT, pid=k * 1000 + i + 1, timeout=0.02)["pid"] == k * 1000 + i + 1)
                    elif i % 3 == 1:
                        got.append(c.call(Sys.TOKENIZE, text=f"{k}-{i}") == {"echo": f"{k}-{i}"})
                    else:
                        evs = list(c.stream(Sys.GENERATE, prompt="x", max_tokens=20, stream=True))
                        got.append(sum((e["token_ids"] for e in evs), []) == list(range(20)))
                results[k] = got
            except Exception as e:      # pragma: no cover - reported below
                errors.append(e)
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads)
        assert not errors and all(all(r) and len(r) == 60 for r in results.values()) and len(results) == 8


def test_calls_are_in_flight_at_once(server, handlers):
    with Connection(server.endpoint, token=TOKEN) as c:
        threads = [threading.Thread(target=c.call, args=(Sys.WAIT,), kwargs={"pid": k, "timeout": 0.5})
                   for k in range(1, 9)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert handlers.max_in_flight == 8           # all in flight at once, not one by one


def test_call_timeout_cancels_the_call(server, handlers):
    with Connection(server.endpoint, token=TOKEN) as c:
        with pytest.raises(CallTimeout) as e:
            c.call(Sys.WAIT, pid=0, _timeout=0.3)
        assert e.value.code == "ETIMEDOUT"
        cid = handlers.never[0].id
        assert wait_for(lambda: cid in handlers.cancelled)
        assert c.call(Sys.PING) == {}


def test_abandoned_stream_is_cancelled(server, handlers):
    with Connection(server.endpoint, token=TOKEN) as c:
        g = c.stream(Sys.GENERATE, prompt="x", max_tokens=100000, stream=True)
        next(g)
        g.close()
        assert wait_for(lambda: handlers.cancelled)
        assert c.call(Sys.PING) == {}


def test_unencodable_argument_is_einval(server):
    with Connection(server.endpoint, token=TOKEN) as c:
        with pytest.raises(SyscallError) as e:
            c.call(Sys.TOKENIZE, text=object())
        assert e.value.code == "EINVAL"


@pytest.fixture
def child_kernel(sockdir):
    ep = f"ipc://{sockdir}/kernel.sock"
    p = subprocess.Popen([sys.executable, "-c", CHILD, ep], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        yield p, ep
    finally:
        if p.poll() is None:
            p.kill()
        p.wait(10)
        p.stdout.close()


def test_killed_kernel_becomes_kernel_dead_within_5s(child_kernel):
    proc, ep = child_kernel
    c = Connection(ep, token=TOKEN)        # default liveness settings
    outcome = {}

    def waiter(k):
        try:
            c.call(Sys.WAIT, pid=k)
        except Exception as e:
            outcome[k] = (e, time.monotonic())
    threads = [threading.Thread(target=waiter, args=(k,)) for k in range(1, 4)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    killed = time.monotonic()
    os.kill(proc.pid, signal.SIGKILL)
    for t in threads:
        t.join(10)
    assert len(outcome) == 3
    for e, when in outcome.values():
        assert isinstance(e, KernelDead) and e.code == "EDEAD"
        assert when - killed < DEAD_BOUND         # a bounded time, never a hang
    start = time.monotonic()
    with pytest.raises(KernelDead):
        c.call(Sys.PING)
    assert time.monotonic() - start < DEAD_BOUND     # at once in practice: it is known dead
    c.close()


def test_connecting_to_no_kernel_is_kernel_dead(sockdir):
    start = time.monotonic()
    with pytest.raises(KernelDead):
        Connection(f"ipc://{sockdir}/nobody.sock", token=TOKEN)
    assert time.monotonic() - start < DEAD_BOUND
