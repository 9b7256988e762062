"""The syscall server with test handlers, over real ipc sockets, driven raw and by the client."""
import os
import random
import stat

import msgpack
import pytest
import zmq

from llmos.kernel.endpoints import check_endpoint, hard_cap
from llmos.kernel.server import Server
from llmos.syscalls import Connection, Sys, SyscallError, wire
from tests.syscalls.conftest import TOKEN, Raw, wait_for
from tests.syscalls.test_args import BAD


def test_socket_is_0600_and_removed_on_close(sockdir, handlers):
    path = f"{sockdir}/k.sock"
    s = Server(f"ipc://{path}", handlers.table()).start()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    s.close()
    assert not os.path.exists(path)


def test_ping_hello_and_calls(server):
    with Connection(server.endpoint, token=TOKEN) as c:
        assert c.hello == {"pid": 42}
        assert c.call(Sys.PING) == {}
        assert c.call(Sys.GETPID) == 42
        assert c.call(Sys.TOKENIZE, text="héllo") == {"echo": "héllo"}
        table = c.call(Sys.SYSCALLS)["syscalls"]
        assert [e["nr"] for e in table] == list(range(len(Sys)))
        assert table[Sys.GENERATE]["name"] == "generate" and table[Sys.KILL]["implemented"] is True
        assert table[Sys.KILL]["args"]["sig"]["default"] == "TERM"
        assert c.call(Sys.KILL, pid=3, sig=9) == {"echo": {"pid": 3, "sig": "KILL"}}


def test_before_hello_only_ping_and_hello(server):
    with Connection(server.endpoint) as c:
        assert c.call(Sys.PING) == {}
        with pytest.raises(SyscallError) as e:
            c.call(Sys.GETPID)
        assert e.value.code == "EACCES"
        with pytest.raises(SyscallError) as e:
            c.call(Sys.HELLO, token="wrong")
        assert e.value.code == "EACCES"
        assert c.call(Sys.HELLO, token=TOKEN) == {"pid": 42}
        assert c.call(Sys.GETPID) == 42


def test_wrong_token_refuses_the_connection(server):
    with pytest.raises(SyscallError) as e:
        Connection(server.endpoint, token="wrong")
    assert e.value.code == "EACCES"


def test_handler_errors(server):
    with Connection(server.endpoint, token=TOKEN) as c:
        for nr, code in [(Sys.CONTEXT_INFO, "EIO"), (Sys.CONTEXT_FREE, "ESRCH"), (99, "ENOSYS")]:
            with pytest.raises(SyscallError) as e:
                c.call(nr, context=1)
            assert e.value.code == code
        with pytest.raises(SyscallError) as e:
            c.call(Sys.EXIT, status=0)
        assert e.value.code == "EIO" and "unencodable" in e.value.msg
        assert c.call(Sys.PING) == {}


def bad_messages(rng):
    """[(label, needs_hello, frames, code, id, words)]: over a thousand malformed calls."""
    out = []
    for i in range(400):
        blob = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 64)))
        try:
            wire.decode_request([blob])
            continue
        except SyscallError as e:
            out.append(("random", False, [blob], e.code, None, ""))
    for i, v in enumerate([0, 2, "1", None, 1.0, True, [1]] * 15):
        h = msgpack.packb({"v": v, "id": 1000 + i, "nr": 0, "a": {}})
        out.append(("version", False, [h], "EPROTO", 1000 + i, "wire version"))
    for i in range(100):
        nr = rng.choice([len(Sys), len(Sys) + 1, 99, 1 << 40, -1, -(1 << 62)])
        out.append(("unknown nr", True, [wire.encode_request(2000 + i, nr, {})], "ENOSYS", 2000 + i, "no syscall"))
    for i in range(5):
        for j, (nr, args, code, words) in enumerate(BAD):
            cid = 3000 + i * 1000 + j
            frame = wire.encode_request(cid, nr, args)
            if len(frame) > hard_cap(64 << 10):
                continue                    # see test_past_the_hard_cap_the_peer_is_dropped
            if len(frame) > 64 << 10:
                out.append(("oversized arg", True, [frame], "E2BIG", None, "exceeds"))
            else:
                out.append(("bad arg", True, [frame], code, cid, words))
    for i in range(40):
        frame = wire.encode_request(9000 + i, Sys.TOKENIZE, {"text": "x" * (70 << 10)})
        out.append(("oversized", True, [frame], "E2BIG", None, "exceeds 65536"))
    for i, nr in enumerate([Sys.GETPID, Sys.SYSCALLS, Sys.GENERATE, Sys.TOKENIZE, Sys.WAIT] * 20):
        out.append(("before hello", False, [wire.encode_request(10000 + i, nr, {})], "EACCES", 10000 + i, "hello first"))
    for i in range(50):
        frame = wire.encode_request(11000 + i, Sys.HELLO, {"token": "guess%d" % i})
        out.append(("wrong token", False, [frame], "EACCES", 11000 + i, "bad token"))
    for i in range(30):
        h = msgpack.packb({"v": 1, "id": 12000 + i, "nr": 0, "a": {"k": msgpack.ExtType(1, b"x")}})
        out.append(("ext", False, [h], "EPROTO", None, "ext types"))
    rng.shuffle(out)
    return out


def test_a_thousand_bad_messages_each_get_the_precise_error(server):
    cases = bad_messages(random.Random(1234))
    assert len(cases) >= 1000
    anon, authed = Raw(server.endpoint), Raw(server.endpoint)
    try:
        assert authed.call(1, Sys.HELLO, token=TOKEN)["ok"] is True
        for label, needs_hello, frames, code, cid, words in cases:
            sock = authed if needs_hello else anon
            sock.send(*frames)
            reply = sock.recv()
            assert reply["ok"] is False, (label, reply)
            assert reply["e"]["code"] == code, (label, frames[0][:80], reply)
            assert reply["id"] == cid, (label, reply)
            assert words in reply["e"]["msg"], (label, reply)
        assert authed.call(5, Sys.GETPID) == {"v": 1, "id": 5, "ok": True, "r": 42}
        assert anon.call(6, Sys.PING)["ok"] is True
    finally:
        anon.close()
        authed.close()
    with Connection(server.endpoint, token=TOKEN) as c:
        assert c.call(Sys.GETPID) == 42


def test_past_the_hard_cap_the_peer_is_dropped_and_the_server_lives(server, raw):
    assert raw.call(1, Sys.HELLO, token=TOKEN)["ok"]
    raw.send(wire.encode_request(2, Sys.TOKENIZE, {"text": "x" * hard_cap(64 << 10)}))
    assert not raw.sock.poll(300)
    with Connection(server.endpoint, token=TOKEN) as c:
        assert c.call(Sys.GETPID) == 42


def test_duplicate_call_id_and_binary_frames(raw, handlers):
    assert raw.call(1, Sys.HELLO, token=TOKEN)["ok"]
    raw.send(wire.encode_request(7, Sys.WAIT, {"pid": 0}))
    assert wait_for(lambda: handlers.never)
    reply = raw.call(7, Sys.PING)
    assert reply["e"] == {"code": "EINVAL", "msg": "call id 7 is already in flight"}
    raw.send(wire.encode_request(8, Sys.PING, {}), b"\x00" * 100)
    assert raw.recv()["ok"] is True
    raw.send(wire.encode_request(9, Sys.PING, {}), b"\x00" * (65 << 10))
    assert raw.recv()["e"]["code"] == "E2BIG"


def test_a_vanished_peer_is_reported_and_its_late_reply_dropped(server, handlers):
    r = Raw(server.endpoint)
    assert r.call(1, Sys.HELLO, token=TOKEN)["ok"]
    r.send(wire.encode_request(2, Sys.WAIT, {"pid": 5, "timeout": 0.3}))
    assert wait_for(lambda: handlers.in_flight == 1)
    r.close()
    assert wait_for(lambda: handlers.gone, timeout=5)
    assert handlers.gone[0].pid == 42 and handlers.gone[0].gone
    with Connection(server.endpoint, token=TOKEN) as c:
        assert c.call(Sys.PING) == {}


def test_close_cancels_calls_in_flight(sockdir, handlers):
    s = Server(f"ipc://{sockdir}/k.sock", handlers.table()).start()
    r = Raw(s.endpoint)
    try:
        assert r.call(1, Sys.HELLO, token=TOKEN)["ok"]
        r.send(wire.encode_request(2, Sys.WAIT, {"pid": 0}))
        assert wait_for(lambda: handlers.never)
        s.close()
        reply = r.recv()
        assert reply["id"] == 2 and reply["e"] == {"code": "ECANCELED", "msg": "kernel shutting down"}
        assert handlers.never[0].reply(1) is False     # a late reply is ignored, not an error
    finally:
        r.close()


def test_streaming_in_order_and_complete(server):
    with Connection(server.endpoint, token=TOKEN) as c:
        g = c.stream(Sys.GENERATE, prompt="x", max_tokens=500, stream=True)
        text, ids = "", []
        while True:
            try:
                ev = next(g)
            except StopIteration as stop:
                assert stop.value == {"tokens": 500}
                break
            text += ev["text"]
            ids += ev["token_ids"]
        assert text == "ab" * 500 and ids == list(range(500))
        assert c.call(Sys.GENERATE, prompt="x", max_tokens=50) == {"tokens": 50}


def test_deltas_coalesce_for_a_slow_reader(sockdir, handlers):
    """A reader that does not read while 2,000 deltas of 8 KiB are produced gets fewer,
    larger deltas, with all text and token ids in order."""
    handlers.delta_text = "z" * 8192
    s = Server(f"ipc://{sockdir}/k.sock", handlers.table(), hwm=4).start()
    r = Raw(s.endpoint)
    r.sock.setsockopt(zmq.RCVHWM, 4)
    try:
        assert r.call(1, Sys.HELLO, token=TOKEN)["ok"]
        r.send(wire.encode_request(2, Sys.GENERATE, {"prompt": "x", "max_tokens": 2000, "stream": True}))
        import time
        time.sleep(1.0)         # the slow reader
        events, text, ids = 0, 0, []
        while True:
            m = r.recv(timeout=10)
            if "ev" in m:
                events += 1
                text += len(m["r"]["text"])
                ids += m["r"]["token_ids"]
            else:
                assert m["r"] == {"tokens": 2000}
                break
        assert text == 2000 * 8192 and ids == list(range(2000))
        assert events < 2000
    finally:
        r.close()
        s.close()


def test_client_merges_deltas_it_has_not_taken(server):
    import time
    with Connection(server.endpoint, token=TOKEN) as c:
        g = c.stream(Sys.GENERATE, prompt="x", max_tokens=300, stream=True)
        first = next(g)
        time.sleep(0.5)
        rest = list(g)
        assert len(rest) < 299
        assert first["token_ids"] + sum((e["token_ids"] for e in rest), []) == list(range(300))


def test_endpoints():
    assert check_endpoint("ipc:///tmp/x.sock", False) == "/tmp/x.sock"
    assert check_endpoint("tcp://127.0.0.1:5555", False) is None
    for bad in ["tcp://0.0.0.0:5555", "tcp://10.1.2.3:1", "tcp://*:5555"]:
        with pytest.raises(ValueError, match="CURVE"):
            check_endpoint(bad, False)
    assert check_endpoint("tcp://0.0.0.0:5555", True) is None
    with pytest.raises(ValueError, match="unsupported"):
        check_endpoint("inproc://x", False)


def test_tcp_loopback_and_curve(handlers):
    with pytest.raises(ValueError, match="CURVE"):
        Server("tcp://0.0.0.0:0", handlers.table())
    if not zmq.has("curve"):
        pytest.skip("libzmq without CURVE")
    pub, sec = zmq.curve_keypair()
    s = Server("tcp://127.0.0.1:0", handlers.table(), curve_secret_key=sec).start()
    try:
        port = s._sock.getsockopt(zmq.LAST_ENDPOINT).decode().rsplit(":", 1)[1]
        with Connection(f"tcp://127.0.0.1:{port}", token=TOKEN, curve_server_key=pub) as c:
            assert c.call(Sys.GETPID) == 42
    finally:
        s.close()
