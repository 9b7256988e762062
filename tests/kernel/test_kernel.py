"""The kernel's syscall functions and its engine inbox, in-process and step by step.

No sockets: calls are real Call objects whose outbox is a list, and the test runs the
engine loop by hand (apply the inbox, step), so the order of events is exact: a cancel
before the first step, a death with work queued, a long text still being tokenized.
"""
from __future__ import annotations

import contextlib

import signal
import socket
import threading
import time

import pytest

from llmos.kernel import Engine
from llmos.kernel.load import EMBEDDED
from llmos.kernel.syscall import Call, ConnState, SyscallTable, install
from llmos.syscalls import Sys, wire
from llmos.syscalls.home import Home
from llmos.syscalls.types import ProcState
from tests.kernel.engines import supervisor

TOKEN = "owner-token"
T = 30


class Outbox:
    """Where the calls' replies and events go: a list, and an Event per reply."""

    def __init__(self):
        self.sent: list = []
        self.replied = threading.Condition()

    def post(self, peer, cid, kind, data):
        with self.replied:
            self.sent.append((peer, cid, kind, data))
            self.replied.notify_all()

    def reply(self, peer, cid, timeout=T):
        """The (kind, body) of call cid's reply; waits up to timeout for it."""
        def find():
            for p, c, kind, data in self.sent:
                if p == peer and c == cid and kind == "msg":
                    return wire.decode_reply(data)[1:]
        with self.replied:
            assert self.replied.wait_for(find, timeout), f"no reply to call {cid}"
            return find()

    def events(self, peer, cid):
        return [d for p, c, kind, d in self.sent if p == peer and c == cid and kind == "ev"]


class ManualPool:
    """Stands in for the tokenizer workers: runs what was submitted when the test says."""

    def __init__(self):
        self.jobs = []

    def submit(self, fn):
        self.jobs.append(fn)

    def run(self):
        jobs, self.jobs = self.jobs, []
        for fn in jobs:
            fn()

    def shutdown(self, **kw):
        pass


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained("tiny", num_blocks=64, poison=True)


@contextlib.contextmanager
def stepped_kernel(tmp_path, engine, name: str, path):
    """A Supervisor on engine (default model `name`, from path), driven by hand:
    tokenizing waits on a ManualPool, answers land in an Outbox. Shut down on leaving."""
    home = Home(tmp_path / "home")
    home.log_dir.mkdir(parents=True)
    kern = supervisor(home, engine, name, path, TOKEN)
    kern.tokenizers = ManualPool()
    kern.outbox = Outbox()
    try:
        yield kern
    finally:
        kern.loop.start()                      # so the deaths of shutdown are released
        kern.procs.shutdown(grace=1)
        kern.loop.stop()
        kern.close()


@pytest.fixture
def k(tmp_path, engine):
    with stepped_kernel(tmp_path, engine, "tiny", EMBEDDED["tiny"]) as kern:
        yield kern
    for rid in list(engine.requests):          # the engine is shared by the module
        engine.abort(rid)
    for cid in list(engine.contexts):
        engine.context_free(cid)
    assert engine.blocks.usage()["used"] == 0


def run(k) -> None:
    """Apply the inbox and step until the engine is idle; publish a snapshot."""
    while True:
        k.loop._drain(block=False)
        if not k.loop.models.has_work():
            break
        k.loop.models.step()
    k.loop._publish()


_socketpairs = []    # kept open for the session: a connection's fd must stay valid


def conn(k, token=TOKEN, peer=b"peer") -> ConnState:
    """An authenticated connection on a real unix socket to ourselves: its peer credentials
    are this test process's, as the owner's would be."""
    c = ConnState(peer)
    pair = socket.socketpair()
    _socketpairs.append(pair)
    c.fd = pair[0].fileno()
    k.hello(c, token)
    c.authenticated = True
    return c


_ids = iter(range(1, 1 << 30))


def call(k, c: ConnState, nr: Sys, cid: int | None = None, **args):
    """Dispatch syscall nr on connection c through the real table; returns the call id."""
    table = SyscallTable()
    install(table, k)
    cid = next(_ids) if cid is None else cid
    the_call = Call(c, cid, int(nr), k.outbox.post)
    c.calls[cid] = the_call
    table.dispatch(the_call, args)
    return cid


def until(pred, timeout=T):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def answer(k, c, cid):
    return k.outbox.reply(c.peer, cid)


def test_generate_through_the_inbox_equals_the_engine(k, engine):
    c = conn(k)
    cid = call(k, c, Sys.GENERATE, prompt="12+47=", max_tokens=8)
    assert k.ps(0, True)[0].state is ProcState.READY          # accepted: owned before the engine saw it
    run(k)
    kind, r = answer(k, c, cid)
    assert kind == "ok" and r["text"] == "59" and r["finish_reason"] == "stop"
    assert k.ps(0, True)[0].tokens_out == 3 and k.ps(0, True)[0].state is ProcState.SLEEPING


def test_cancel_before_the_first_step_reaches_the_request(k, engine):
    c = conn(k)
    steps = engine.stats["steps"]
    cid = call(k, c, Sys.GENERATE, prompt="12+47=", max_tokens=400, ignore_eos=True)
    done = call(k, c, Sys.CANCEL, call=cid)             # before the engine ran the submit
    assert answer(k, c, done) == ("ok", {})
    run(k)
    kind, r = answer(k, c, cid)
    assert kind == "ok" and r["finish_reason"] == "abort" and r["token_ids"] == []
    assert engine.stats["steps"] == steps               # it never ran
    assert k.procs.get(c.pid).requests == {}


def test_cancel_while_the_prompt_is_being_tokenized(k, engine):
    c = conn(k)
    steps = engine.stats["steps"]
    cid = call(k, c, Sys.GENERATE, prompt="12+47= " * 1000, max_tokens=4)
    assert k.tokenizers.jobs                             # a long text goes to a worker
    assert answer(k, c, call(k, c, Sys.CANCEL, call=cid)) == ("ok", {})
    k.tokenizers.run()
    run(k)
    assert answer(k, c, cid)[1]["finish_reason"] == "abort"
    assert engine.stats["steps"] == steps and not engine.requests


def test_a_dead_process_queued_generate_never_starts(k, engine):
    c = conn(k)
    steps = engine.stats["steps"]
    cid = call(k, c, Sys.GENERATE, prompt="12+47=", max_tokens=400, ignore_eos=True)
    ctx = call(k, c, Sys.CONTEXT_CREATE, system="You are tiny.")
    assert answer(k, c, call(k, c, Sys.EXIT, status=3)) == ("ok", {})   # returns at once
    proc = k.procs.get(c.pid)
    assert proc.state is ProcState.ZOMBIE and not proc.waitable   # released by the engine
    run(k)
    assert proc.waitable and proc.exit_status == 3
    assert answer(k, c, cid)[1]["finish_reason"] == "abort"
    assert answer(k, c, ctx)[1][0] == "ESRCH"            # never made: its process had exited
    assert engine.stats["steps"] == steps and not engine.contexts
    assert engine.blocks.usage()["used"] == 0


def test_kill_with_work_queued_cancels_it(k, engine):
    owner = conn(k)
    agent = k.procs.spawn(["/bin/sleep", "30"], parent=owner.pid, log_dir=k.home.log_dir)
    a = conn(k, agent.token, b"agent")
    cids = [call(k, a, Sys.GENERATE, prompt="12+47=", max_tokens=200, ignore_eos=True)
            for _ in range(3)]
    k.loop._drain(block=False)
    engine.step()                                        # two running, one more queued
    cids.append(call(k, a, Sys.GENERATE, prompt="1+1=", max_tokens=2))
    assert answer(k, owner, call(k, owner, Sys.KILL, pid=agent.pid, sig="KILL")) == ("ok", {})
    run(k)
    for cid in cids:
        assert answer(k, a, cid)[1]["finish_reason"] == "abort"
    until(lambda: not k.procs.get(agent.pid).alive)      # the reaper saw it die
    status = call(k, owner, Sys.WAIT, pid=agent.pid, timeout=T)
    run(k)                                               # the engine releases it
    assert answer(k, owner, status)[1] == {"pid": agent.pid, "exited": True,
                                           "status": -signal.SIGKILL}


def test_exit_holding_contexts_frees_them(k, engine):
    c = conn(k)
    ids = [call(k, c, Sys.CONTEXT_CREATE, messages=[{"role": "user", "content": "add 1 2"}])
           for _ in range(3)]
    run(k)
    ctxs = [answer(k, c, i)[1]["context"] for i in ids]
    gen = call(k, c, Sys.GENERATE, prompt="12+47=", context=ctxs[0], max_tokens=4)
    fork = call(k, c, Sys.CONTEXT_FORK, context=ctxs[1])
    run(k)
    assert answer(k, c, gen)[0] == "ok" and answer(k, c, fork)[0] == "ok"
    assert engine.blocks.usage()["used"] > 0 and len(engine.contexts) == 4
    assert k.ps(0, True)[0].contexts == 4 and k.ps(0, True)[0].kv_blocks > 0
    acct = k.procs.get(c.pid).acct
    call(k, c, Sys.EXIT, status=0)
    run(k)
    assert not engine.contexts and engine.blocks.usage()["used"] == 0
    assert acct.kv == {"device": 0, "host": 0, "disk": 0}


def test_two_connections_of_one_process_keep_their_calls_apart(k, engine):
    owner = conn(k)
    agent = k.procs.spawn(["/bin/sleep", "30"], parent=owner.pid, log_dir=k.home.log_dir)
    a1, a2 = conn(k, agent.token, b"one"), conn(k, agent.token, b"two")
    assert a1.pid == a2.pid == agent.pid
    first = call(k, a1, Sys.GENERATE, cid=7, prompt="12+47=", max_tokens=30, ignore_eos=True)
    second = call(k, a2, Sys.GENERATE, cid=7, prompt="12+47=", max_tokens=30, ignore_eos=True)
    assert len(k.procs.get(agent.pid).requests) == 2      # same call id, two entries
    call(k, a1, Sys.CANCEL, call=first)
    run(k)
    assert answer(k, a1, first)[1]["finish_reason"] == "abort"
    assert answer(k, a2, second)[1]["finish_reason"] == "length"
    assert len(answer(k, a2, second)[1]["token_ids"]) == 30
    k.peer_gone(a2)                                      # a spawned process lives on
    assert k.procs.get(agent.pid).alive


def test_a_vanished_connection_cancels_its_calls(k, engine):
    c = conn(k)
    call(k, c, Sys.GENERATE, prompt="12+47=", max_tokens=200, ignore_eos=True)
    k.peer_gone(c)                                       # an attached program's only connection
    proc = k.procs.get(c.pid)
    assert proc.state is ProcState.ZOMBIE
    run(k)
    assert not engine.requests and proc.waitable and proc.exit_status is None


def test_stop_and_cont_pause_the_work_and_ps_shows_it(k, engine):
    owner = conn(k)
    agent = k.procs.spawn(["/bin/sleep", "30"], parent=owner.pid, log_dir=k.home.log_dir)
    a = conn(k, agent.token, b"agent")
    cid = call(k, a, Sys.GENERATE, prompt="12+47=", max_tokens=40, ignore_eos=True, stream=True)
    k.loop._drain(block=False)
    engine.step()
    k.loop._published = 0.0
    k.loop._publish()
    state = {r.pid: r.state for r in k.ps(0, True)}
    assert state[agent.pid] is ProcState.RUNNING and state[owner.pid] is ProcState.SLEEPING
    call(k, owner, Sys.KILL, pid=agent.pid, sig="STOP")
    run(k)                                               # nothing runs while stopped
    assert {r.pid: r.state for r in k.ps(0, True)}[agent.pid] is ProcState.STOPPED
    made = sum(len(e["token_ids"]) for e in k.outbox.events(a.peer, cid))
    assert 0 < made < 40
    later = call(k, a, Sys.GENERATE, prompt="1+1=", max_tokens=2)   # queued paused too
    run(k)
    call(k, owner, Sys.KILL, pid=agent.pid, sig="CONT")
    run(k)
    assert len(answer(k, a, cid)[1]["token_ids"]) == 40 and answer(k, a, later)[0] == "ok"
    assert k.procs.get(agent.pid).acct.generated_tokens >= 42


def test_nice_without_pid_and_permissions(k):
    owner = conn(k)
    agent = k.procs.spawn(["/bin/sleep", "30"], parent=owner.pid, log_dir=k.home.log_dir)
    sibling = k.procs.spawn(["/bin/sleep", "30"], parent=owner.pid, log_dir=k.home.log_dir)
    a = conn(k, agent.token, b"agent")
    assert answer(k, a, call(k, a, Sys.NICE, value=5)) == ("ok", {})
    assert k.procs.get(agent.pid).nice == 5
    kind, (code, msg) = answer(k, a, call(k, a, Sys.NICE, pid=sibling.pid, value=1))
    assert (kind, code) == ("error", "EPERM")
    assert answer(k, owner, call(k, owner, Sys.NICE, pid=sibling.pid, value=-3))[0] == "ok"


def test_model_argument_is_honoured(k):
    c = conn(k)
    ok = call(k, c, Sys.TOKENIZE, text="12+47=", model="tiny")
    bad = call(k, c, Sys.GENERATE, prompt="12+47=", model="llama-70b")
    assert answer(k, c, ok)[0] == "ok"
    kind, (code, msg) = answer(k, c, bad)
    assert (kind, code) == ("error", "ENOENT") and "tiny" in msg
    assert not k.procs.get(c.pid).requests


def test_an_agent_names_models_but_only_the_owner_changes_them_or_names_paths(k, tmp_path):
    owner = conn(k)
    agent = k.procs.spawn(["/bin/sleep", "30"], parent=owner.pid, log_dir=k.home.log_dir)
    a = conn(k, agent.token, b"agent")
    assert answer(k, a, call(k, a, Sys.TOKENIZE, text="12+47=", model="tiny"))[0] == "ok"
    path = str(EMBEDDED["tiny"])
    kind, (code, msg) = answer(k, a, call(k, a, Sys.TOKENIZE, text="1", model=path))
    assert (kind, code) == ("error", "EPERM") and "only the owner" in msg
    assert answer(k, owner, call(k, owner, Sys.TOKENIZE, text="1", model=path))[0] == "ok"
    for nr, args in ((Sys.MODEL_LOAD, {"name": "tiny"}), (Sys.MODEL_UNLOAD, {"name": "tiny"}),
                     (Sys.MODEL_ADD, {"name": "t2", "path": path}), (Sys.MODEL_RM, {"name": "t2"})):
        kind, (code, msg) = answer(k, a, call(k, a, nr, **args))
        assert (kind, code) == ("error", "EPERM") and "only the owner" in msg
    cid = call(k, owner, Sys.MODEL_UNLOAD, name="nope")
    run(k)                                                 # the engine thread answers it
    kind, (code, msg) = answer(k, owner, cid)
    assert (kind, code) == ("error", "ENOENT")


def test_long_texts_are_capped_and_tokenized_off_the_io_thread(k, engine):
    c = conn(k)
    huge = call(k, c, Sys.TOKENIZE, text="x" * (4 << 20))
    kind, (code, msg) = answer(k, c, huge)                # refused before any work
    assert (kind, code) == ("error", "E2BIG") and "512 tokens" in msg
    long = call(k, c, Sys.TOKENIZE, text="12+47= " * 1000)
    assert len(k.tokenizers.jobs) == 1 and not [s for s in k.outbox.sent if s[1] == long]
    k.tokenizers.run()
    assert answer(k, c, long)[1]["token_ids"] == engine.tokenizer.encode("12+47= " * 1000)


def test_wait_timeout_answers_not_exited(k):
    owner = conn(k)
    agent = k.procs.spawn(["/bin/sleep", "30"], parent=owner.pid, log_dir=k.home.log_dir)
    cid = call(k, owner, Sys.WAIT, pid=agent.pid, timeout=0.2)
    assert answer(k, owner, cid)[1] == {"pid": agent.pid, "exited": False, "status": None}
    assert k.procs.get(agent.pid).alive


def test_engine_errors_answer_the_call_and_drop_ownership(k, engine):
    c = conn(k)
    too_long = call(k, c, Sys.GENERATE, token_ids=[5] * 500, max_tokens=100)
    bad_ctx = call(k, c, Sys.GENERATE, prompt="1", context=12345)
    run(k)
    assert answer(k, c, too_long)[1][0] == "EINVAL"
    assert answer(k, c, bad_ctx)[1][0] == "ESRCH"
    assert k.procs.get(c.pid).requests == {}
