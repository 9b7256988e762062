"""Tests that attack a real kernel: batches of fuzzed calls of every syscall number (and
of numbers that are none, and of frames that are no request), pipelined on one owner's
connection, with generate at the extremes of sampling.

Every call gets exactly one answer: a result, or an error code of syscalls/errors.py,
never EIO (a handler's bug, or a request that failed in its own sampling); an argument
the spec refuses is refused with the code and name the spec gives. Afterwards the kernel
is alive, its log holds no traceback, and no KV block is held by a finished call.
The examples are fixed (tests/fuzz.py FUZZ), so a CI run is reproducible.
"""
from __future__ import annotations

import collections
import math
import time

import msgpack
import pytest
import zmq
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from llmos.syscalls import Connection, Sys, wire
from llmos.syscalls.chat import Messages
from llmos.syscalls.errors import CODES, EDEAD, EIO, ENOSYS, ETIMEDOUT, SyscallError
from llmos.syscalls.home import Home, read_token
from llmos.syscalls.specs import SPECS
from tests.fuzz import FUZZ, TEXT, WEIRD_TEXT, call_args, frames, valid
from tests.kernels import running_kernel

T = 60                      # seconds: the bound on every wait
BATCHES, CALLS = 2, 120     # 240 fuzzed calls in all
FIRST_ID = 0x5EED << 32     # our call ids: far from those of the junk frames' headers
VOCAB = 423                 # the tiny model's
NO_PID = st.integers(1 << 24, (1 << 31) - 1)    # pids are below 2**22: no such process
NO_NR = st.integers(-(1 << 63), (1 << 63) - 1).filter(lambda n: n not in SPECS)
KERNEL_CODES = CODES - {EIO, ETIMEDOUT, EDEAD}  # EIO is a kernel bug; the others client-side

# Numbers fuzzed only with arguments their spec refuses, so that they never run:
MUST_FAIL = {
    Sys.SPAWN: "would start processes (argv from the fuzzer)",
    Sys.EXIT: "would end the fuzzing process in the middle of its batch (it exits at the end)",
    Sys.SETRLIMIT: "would limit the fuzzing process itself (calls=0: its generates refused)",
}

PROMPTS = ["12+47=", "reverse a b c =", "x", "\U0001F600 \u202e \0"]
EXTREMES = {
    "temperature": st.sampled_from([0, 0.0, -0.0, 5e-324, 1e-300, 1e-6, 1e-5, 1.0, 100,
                                    1e5, math.inf, math.nan]),
    "top_k": st.sampled_from([0, 1, 2, VOCAB - 1, VOCAB, VOCAB + 1, 1 << 20]),
    "top_p": st.sampled_from([5e-324, 1e-300, 1e-9, 0.5, 1.0, 0.0, 1.0 + 2 ** -52]),
    "min_p": st.sampled_from([0.0, 5e-324, 0.5, 1.0 - 2 ** -53, 1.0]),
    "seed": st.sampled_from([-(1 << 63), (1 << 63) - 1, 0, -1, 1 << 63]),
    "stop": st.lists(WEIRD_TEXT.filter(bool), max_size=3) | st.just(["x" * 256]) | st.just([""]),
    "stop_token_ids": st.lists(st.integers(0, VOCAB + 5), max_size=3)
                      | st.just([(1 << 31) - 1]),
    "ignore_eos": st.booleans(), "stream": st.booleans(),
}
extreme_generate = st.fixed_dictionaries(
    {"prompt": st.sampled_from(PROMPTS), "max_tokens": st.sampled_from([0, 1, 2, 4])},
    optional=EXTREMES)


def narrowed(contexts: list[int]) -> dict:
    """Valid values a real kernel can run in a test: a few tokens, short texts, no pid that
    exists (the owner may signal anything), contexts that exist or not, calls of this batch."""
    handle = st.sampled_from(contexts) | st.integers(0, (1 << 63) - 1)
    model = st.just("tiny") | TEXT
    short = st.text(max_size=48) | st.sampled_from(PROMPTS)
    msgs = valid(Messages(max_len=3, content_len=48))
    ids = st.lists(st.integers(0, VOCAB + 5), max_size=24)
    return {
        Sys.GENERATE: dict(max_tokens=st.integers(0, 4), prompt=short, messages=msgs,
                           token_ids=ids, context=handle, model=model,
                           stop_token_ids=st.lists(st.integers(0, VOCAB + 5), max_size=3)),
        Sys.TOKENIZE: dict(text=short | st.sampled_from([4096, 4097, 16385]).map("é".__mul__),
                           model=model),
        Sys.DETOKENIZE: dict(token_ids=ids | st.just([5] * 5000), model=model),
        Sys.CONTEXT_CREATE: dict(system=short, messages=msgs, model=model),
        Sys.CONTEXT_FORK: dict(context=handle), Sys.CONTEXT_FREE: dict(context=handle),
        Sys.CONTEXT_INFO: dict(context=handle),
        Sys.CANCEL: dict(call=st.integers(FIRST_ID, FIRST_ID + CALLS)),
        Sys.KILL: dict(pid=NO_PID), Sys.NICE: dict(pid=NO_PID), Sys.GETRLIMIT: dict(pid=NO_PID),
        Sys.WAIT: dict(pid=NO_PID, timeout=st.floats(0, 0.5)),
    }


@st.composite
def batch(draw, contexts: list[int]):
    """CALLS items: ("call", nr, args, expected) with expected as call_args gives it (None:
    the spec takes them; "any": not judged here), or ("frame", bytes) of no particular sense.
    Every syscall number comes once with fuzzed arguments, then anything, in any order."""
    narrow, strategies = narrowed(contexts), {}

    def fuzzed(nr):
        if nr not in strategies:
            strategies[nr] = call_args(SPECS[nr], narrow.get(nr), must_fail=nr in MUST_FAIL)
        return ("call", nr, *draw(strategies[nr]))
    items = [fuzzed(nr) for nr in sorted(SPECS)]
    while len(items) < CALLS:
        kind = draw(st.integers(0, 9))
        if kind == 0 and draw(st.booleans()):
            items.append(("frame", draw(frames)))
        elif kind == 0:
            nr = draw(NO_NR)
            items.append(("call", nr, draw(st.dictionaries(TEXT, TEXT, max_size=2)),
                          (ENOSYS, f"no syscall {nr}")))
        elif kind <= 3:
            items.append(("call", Sys.GENERATE, draw(extreme_generate), "any"))
        else:
            items.append(fuzzed(draw(st.sampled_from(sorted(SPECS)))))
    return draw(st.permutations(items))


@pytest.fixture(scope="module")
def kernel():
    """(Home, Popen) of a kernel on tiny whose freed KV blocks are poisoned (NaN)."""
    with running_kernel(env={"LLMOS_KV_POISON": "1"}) as (home, proc):
        yield Home(home), proc


class Peer:
    """A raw DEALER said hello as the owner: send frames, take every answer with a deadline."""

    def __init__(self, home: Home):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(home.socket_url)
        self.pid = self.ask(Sys.HELLO, token=read_token(home))["pid"]

    def ask(self, nr, **args):
        """One call at a time: its result, or raises SyscallError."""
        self.sock.send(wire.encode_request(1, nr, args))
        while True:
            assert self.sock.poll(T * 1000), f"no answer to {Sys(nr).name}"
            reply = wire.decode_reply(self.sock.recv())
            if reply.kind == "ok":
                return reply.body
            if reply.kind == "error":
                raise SyscallError(*reply.body)

    def answers(self, expected: collections.Counter) -> dict:
        """Take answers until `expected` (a count per call id) are in: {id: [Reply]}."""
        got, deadline = collections.defaultdict(list), time.monotonic() + T
        while sum(len(v) for v in got.values()) < sum(expected.values()):
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(left * 1000):
                missing = [cid for cid, n in expected.items() if len(got[cid]) < n]
                raise AssertionError(f"no answer to calls {missing[:10]}")
            reply = wire.decode_reply(self.sock.recv())
            if reply.kind != "event":
                got[reply.id].append(reply)
                assert len(got[reply.id]) <= expected[reply.id], f"a second answer to {reply.id}"
        return got

    def send(self, items: list) -> tuple[collections.Counter, dict]:
        """Send a batch without waiting: (answers expected per call id, {id: call item})."""
        expected, sent = collections.Counter(), {}
        for i, item in enumerate(items):
            if item[0] == "frame":
                frame = item[1]
                try:
                    cid = wire.decode_request([frame]).id
                except SyscallError as e:
                    cid = e.call_id              # None: the kernel cannot say which call
            else:
                _, nr, args, _ = item
                cid = FIRST_ID + i
                frame = msgpack.packb({"v": 1, "id": cid, "nr": nr, "a": args}, use_bin_type=True)
                sent[cid] = item
            self.sock.send(frame)
            expected[cid] += 1
        return expected, sent

    def close(self):
        self.sock.close(linger=0)


def check_answer(nr, args, expected, reply, cancelled: bool) -> None:
    what = f"{nr!r} {args!r:.300}: {reply!r:.300}"
    if reply.kind == "error":
        code, msg = reply.body
        assert code in KERNEL_CODES, what
        if expected not in (None, "any"):
            assert (code, msg[:len(expected[1])]) == expected, what
    else:
        assert expected in (None, "any"), what
    if nr == Sys.GENERATE and expected == "any" and runs(args):     # sampled, then it ends
        ends = ("stop", "length", "abort") if cancelled else ("stop", "length")
        assert reply.kind == "ok" and reply.body["finish_reason"] in ends, what


def runs(args) -> bool:
    """Whether a generate from extreme_generate must run: the spec takes it, and its stop
    token ids are the model's."""
    try:
        SPECS[Sys.GENERATE].validate(args)
    except SyscallError:
        return False
    return all(t < VOCAB for t in args.get("stop_token_ids", []))


@settings(FUZZ, max_examples=BATCHES, phases=[Phase.explicit, Phase.generate])
@given(data=st.data())
def test_every_fuzzed_call_is_answered_and_nothing_leaks(kernel, data):
    home, proc = kernel
    peer = Peer(home)
    contexts = [peer.ask(Sys.CONTEXT_CREATE)["context"],
                peer.ask(Sys.CONTEXT_CREATE, system="You are tiny.")["context"]]
    expected, sent = peer.send(data.draw(batch(contexts), "batch"))
    got = peer.answers(expected)
    cancelled = {a.get("call") for _, nr, a, _ in sent.values()
                 if nr == Sys.CANCEL and type(a.get("call")) is int}
    for cid, (_, nr, args, want) in sent.items():
        check_answer(nr, args, want, got[cid][0], cid in cancelled)
    for replies in got.values():
        for r in replies:
            assert r.kind == "ok" or r.body[0] in KERNEL_CODES, r
            if r.kind == "ok" and isinstance(r.body, dict) and "context" in r.body:
                contexts.append(r.body["context"])
    for ctx in set(contexts):
        try:
            peer.ask(Sys.CONTEXT_FREE, context=ctx)
        except SyscallError as e:
            assert e.code == "ESRCH", e          # a fuzzed call freed it already
    until(lambda: peer.ask(Sys.MEMINFO)["procs"].get(str(peer.pid), 0) == 0)  # nothing held
    peer.ask(Sys.EXIT, status=0)
    peer.close()
    assert proc.poll() is None


def until(pred, timeout=T):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_the_kernel_lives_on_and_holds_no_block(kernel):
    """After the fuzzing (this runs second): alive, every KV block free, no traceback logged."""
    home, proc = kernel
    c = Connection(home.socket_url, read_token(home), timeout=T)
    assert c.call(Sys.PING) == {}
    assert c.call(Sys.GENERATE, prompt="12+47=", max_tokens=8)["text"] == "59"
    until(lambda: c.call(Sys.MEMINFO)["kv"]["used"] == 0)
    c.close()
    assert proc.poll() is None
    assert "Traceback" not in home.kernel_log.read_text()
