"""Fixtures for the syscall layer: a short socket dir, a table of test handlers, and the
kernel's server (kernel/server.py) serving them, as the peer of the client under test."""
import os
import shutil
import tempfile
import threading
import time

import msgpack
import pytest
import zmq

from llmos.kernel.server import Server
from llmos.kernel.syscall import PENDING, SyscallTable
from llmos.syscalls import Sys, SyscallError, wire

TOKEN = "sekrit"


@pytest.fixture
def sockdir():
    """A 0700 directory with a short path (ipc paths are limited to ~100 bytes)."""
    d = tempfile.mkdtemp(prefix="llmos-", dir="/tmp")
    os.chmod(d, 0o700)
    yield d
    shutil.rmtree(d, ignore_errors=True)


class Handlers:
    """Test handlers; records what the server did (in flight, cancels, peers gone)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0
        self.cancelled, self.gone = [], []
        self.never = []             # calls that are never answered (until the test ends)
        self.delta_text = "ab"

    def table(self) -> SyscallTable:
        t = SyscallTable()
        t.register(Sys.HELLO, self.hello)
        t.register(Sys.GETPID, lambda call, args: call.conn.pid)
        t.register(Sys.TOKENIZE, lambda call, args: {"echo": args["text"]})
        t.register(Sys.WAIT, self.slow)
        t.register(Sys.GENERATE, self.generate)
        t.register(Sys.CANCEL, self.cancel)
        t.register(Sys.CONTEXT_INFO, self.broken)
        t.register(Sys.CONTEXT_FREE, lambda call, args: (_ for _ in ()).throw(SyscallError("ESRCH", "no context")))
        t.register(Sys.EXIT, self.unencodable)
        for nr in Sys:
            if not t.entry(nr).handler:
                t.register(nr, lambda call, args: {"echo": args})
        return t

    def hello(self, call, args):
        if args["token"] != TOKEN:
            raise SyscallError("EACCES", "bad token")
        call.conn.pid = 42
        return {"pid": 42}

    def slow(self, call, args):
        """wait(pid, timeout): replies {"pid"} after timeout seconds from another thread;
        pid 0 is never answered."""
        if args["pid"] == 0:
            self.never.append(call)
            return PENDING
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

        def done():
            with self.lock:
                self.in_flight -= 1
            call.reply({"pid": args["pid"]})
        threading.Timer(args["timeout"] or 0.0, done).start()
        return PENDING

    def generate(self, call, args):
        """max_tokens deltas of delta_text (token id = index), from another thread."""
        n = args["max_tokens"] or 0

        def run():
            for i in range(n):
                call.event({"text": self.delta_text, "token_ids": [i]})
            call.reply({"tokens": n})
        threading.Thread(target=run, daemon=True).start()
        return PENDING

    def cancel(self, call, args):
        self.cancelled.append(args["call"])
        return None

    def broken(self, call, args):
        raise RuntimeError("handler bug")

    def unencodable(self, call, args):
        return object()


@pytest.fixture
def handlers():
    return Handlers()


@pytest.fixture
def server(sockdir, handlers):
    s = Server(f"ipc://{sockdir}/kernel.sock", handlers.table(), max_message=64 << 10,
               on_peer_gone=handlers.gone.append).start()
    yield s
    s.close()


class Raw:
    """A raw DEALER for malformed traffic: send frames, get one decoded reply (with timeout)."""

    def __init__(self, endpoint):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, *frames):
        self.sock.send_multipart(list(frames))

    def call(self, cid, nr, **args):
        self.send(wire.encode_request(cid, nr, args))
        return self.recv()

    def recv(self, timeout=5.0):
        assert self.sock.poll(int(timeout * 1000)), "no reply within timeout"
        return msgpack.unpackb(self.sock.recv(), raw=False)

    def close(self):
        self.sock.close(linger=0)


@pytest.fixture
def raw(server):
    r = Raw(server.endpoint)
    yield r
    r.close()


def wait_for(pred, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return False
