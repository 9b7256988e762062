"""TCP done properly: a kernel listening on tcp admits only CURVE clients whose key is on
its allow-list (kernel/zap.py), read again at every connection; the key, not the routing
id, identifies a connection; a non-loopback address without CURVE is refused at boot.
First against the server with test handlers (fast), then against a real kernel."""
from __future__ import annotations

import socket
import subprocess
import sys
import time

import msgpack
import pytest
import zmq
from click.testing import CliRunner

from llmos.kernel.peers import peer_address, peer_credentials
from llmos.syscalls.net import is_loopback
from llmos.kernel.endpoints import check_listen
from llmos.kernel.server import Server
from llmos.syscalls import Connection, KernelDead, Sys, keys, wire
from llmos.syscalls.home import Home
from llmos.userland import connect
from llmos.userland.cli import main as cli
from tests.kernels import ROOT, short_home, start_kernel, stop_kernel
from tests.syscalls.conftest import TOKEN

T = 30                  # seconds any wait may take
REFUSED = 5             # seconds a refused client may take to hear it

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the server, with test handlers ------------------------------------------------------
@pytest.fixture
def tcp(sockdir, handlers):
    """(server, its tcp url, its public key, {name: key pair}, the allow-list it reads)."""
    public, secret = zmq.curve_keypair()
    pairs = {name: zmq.curve_keypair() for name in ("alice", "bob", "eve")}
    allowed = {pairs[n][0].decode(): n for n in ("alice", "bob")}
    server = Server(f"ipc://{sockdir}/k.sock", handlers.table(), listen="tcp://127.0.0.1:*",
                    curve_secret_key=secret, allowed=lambda: dict(allowed)).start()
    try:
        yield server, server.bound[1], public, pairs, allowed
    finally:
        server.close()


def curve_client(url, server_key, pair, **kw) -> Connection:
    return Connection(url, TOKEN, timeout=T, curve_server_key=server_key, curve_keypair=pair, **kw)


def raw_curve(url, server_key, pair, identity: bytes):
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.ROUTING_ID, identity)
    s.curve_publickey, s.curve_secretkey = pair
    s.curve_serverkey = server_key
    s.connect(url)
    return s


def ask(sock, cid: int, nr: int, **args) -> dict:
    sock.send(wire.encode_request(cid, nr, args))
    assert sock.poll(T * 1000), "no reply"
    return msgpack.unpackb(sock.recv(), raw=False)


def test_an_allowed_key_connects_and_names_its_connection(tcp):
    server, url, public, pairs, _ = tcp
    with curve_client(url, public, pairs["alice"]) as c:
        assert c.call(Sys.GETPID) == 42
        [conn] = server.connections()
        assert (conn.key, conn.key_name) == (pairs["alice"][0].decode(), "alice")
        assert "key alice" in conn.name()
    deadline = time.monotonic() + T                  # the server sees alice leave (an event,
    while server.connections() and time.monotonic() < deadline:   # not at once: a race seen
        time.sleep(0.01)                                           # in a busy CI run)
    with Connection(server.endpoint, TOKEN, timeout=T) as c:      # ipc: no CURVE, no key
        assert c.call(Sys.GETPID) == 42
        assert [conn.key for conn in server.connections()] == [None]


def test_an_unknown_key_is_refused_at_once(tcp):
    server, url, public, pairs, _ = tcp
    start = time.monotonic()
    with pytest.raises(KernelDead, match="refused this client's CURVE key"):
        curve_client(url, public, pairs["eve"])
    assert time.monotonic() - start < REFUSED
    with pytest.raises(KernelDead, match="handshake"):                 # not the kernel's key
        curve_client(url, zmq.curve_keypair()[0], pairs["alice"])
    assert server.connections() == []


def test_a_plain_tcp_client_is_not_served(tcp):
    _, url, _, _, _ = tcp
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(url)
    s.send(wire.encode_request(1, Sys.PING, {}))
    assert not s.poll(1000)
    s.close()


def test_the_allow_list_is_read_at_every_connection(tcp):
    _, url, public, pairs, allowed = tcp
    with curve_client(url, public, pairs["alice"]) as open_one:
        del allowed[pairs["alice"][0].decode()]                       # revoked
        with pytest.raises(KernelDead, match="refused"):
            curve_client(url, public, pairs["alice"])
        assert open_one.call(Sys.GETPID) == 42                        # open ones stay
    allowed[pairs["eve"][0].decode()] = "eve"                          # allowed, no restart
    with curve_client(url, public, pairs["eve"]) as c:
        assert c.call(Sys.GETPID) == 42


def test_a_routing_id_reused_under_another_key_is_not_the_old_session(tcp):
    server, url, public, pairs, _ = tcp
    first = raw_curve(url, public, pairs["alice"], b"same-id")
    assert ask(first, 1, Sys.HELLO, token=TOKEN)["ok"] is True
    first.close()
    deadline = time.monotonic() + T
    while True:
        second = raw_curve(url, public, pairs["bob"], b"same-id")
        second.send(wire.encode_request(2, Sys.GETPID, {}))
        if second.poll(2000):                      # libzmq may refuse the id for a moment
            reply = msgpack.unpackb(second.recv(), raw=False)
            break
        second.close()
        assert time.monotonic() < deadline, "the id was never accepted again"
    assert reply["ok"] is False and reply["e"]["code"] == "EACCES"
    [conn] = server.connections()
    assert (conn.key_name, conn.authenticated) == ("bob", False)
    second.close()


def test_loopback_and_listen_checks():
    assert all(map(is_loopback, ["127.0.0.1", "127.3.2.1", "::1", "localhost", "::ffff:127.0.0.1"]))
    assert not any(map(is_loopback, ["0.0.0.0", "10.1.2.3", "*", "eth0", "::", None, "x.org"]))
    check_listen("tcp://127.0.0.1:5555", False)
    check_listen("tcp://[::1]:5555", False)
    check_listen("tcp://0.0.0.0:5555", True)
    for bad, curve in [("tcp://0.0.0.0:5555", False), ("tcp://*:5555", False),
                       ("ipc:///tmp/x.sock", True)]:
        with pytest.raises(ValueError):
            check_listen(bad, curve)


def test_a_tcp_peer_has_an_address_and_no_credentials():
    """SO_PEERCRED on a tcp socket answers uid -1 rather than failing: the owner check
    took every tcp peer for a foreign uid."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        with socket.create_connection(listener.getsockname(), timeout=T) as client:
            accepted, _ = listener.accept()
            with accepted:
                assert peer_credentials(accepted.fileno()) is None
                assert peer_address(accepted.fileno()) == "127.0.0.1"
                assert client.fileno() >= 0
    a, b = socket.socketpair()
    with a, b:
        assert peer_address(a.fileno()) is None
        assert peer_credentials(a.fileno())[1] >= 0


# ---- a real kernel -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def kernel():
    """(home, tcp url) of a kernel listening on 127.0.0.1 with CURVE; client keys laptop
    (allowed) and stranger (not) in its home."""
    home = Home(short_home())
    keys.create_client(home, "laptop")
    keys.create_client(home, "stranger")
    keys.allow(home, "laptop")
    url = f"tcp://127.0.0.1:{free_port()}"
    proc = start_kernel(home.path, "--listen", url)
    yield home, url
    stop_kernel(proc)


def test_a_remote_owner_works_end_to_end(kernel):
    home, url = kernel
    with connect(home.path, url=url, key="laptop", timeout=T) as k:
        assert k.owner and k.home is None
        assert k.generate("12+47=", max_tokens=3).usage.completion_tokens == 3
        assert [p.pid for p in k.ps()] == [k.pid]
    assert "CURVE connection from 127.0.0.1: key laptop" in home.kernel_log.read_text()


def test_the_environment_names_the_kernel_and_the_key(kernel, monkeypatch):
    home, url = kernel
    for name, value in [("LLMOS_HOME", str(home.path)), ("LLMOS_URL", url),
                        ("LLMOS_KEY", str(home.keys_dir / "clients" / "laptop.key")),
                        ("LLMOS_SERVER_KEY", str(home.keys_dir / "server.pub"))]:
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("LLMOS_SOCKET", raising=False)
    with connect(timeout=T) as k:
        assert k.owner and "tcp://" in repr(k)


def test_an_unknown_key_is_refused(kernel):
    home, url = kernel
    start = time.monotonic()
    with pytest.raises(KernelDead, match="refused this client's CURVE key"):
        connect(home.path, url=url, key="stranger", timeout=T)
    assert time.monotonic() - start < REFUSED


def test_a_revoked_key_is_refused_at_its_next_connection(kernel):
    home, url = kernel
    keys.create_client(home, "temp")
    run = CliRunner().invoke
    assert run(cli, ["keys", "allow", "temp", "--home", str(home.path)]).exit_code == 0
    with connect(home.path, url=url, key="temp", timeout=T) as open_one:
        result = run(cli, ["keys", "revoke", "temp", "--home", str(home.path)])
        assert result.exit_code == 0, result.output
        with pytest.raises(KernelDead, match="refused"):
            connect(home.path, url=url, key="temp", timeout=T)
        open_one.ping()                                   # an open connection stays
    assert run(cli, ["keys", "allow", "temp", "--home", str(home.path)]).exit_code == 0
    with connect(home.path, url=url, key="temp", timeout=T) as k:
        k.ping()


def test_a_non_loopback_listen_without_curve_is_refused(tmp_path):
    home = str(tmp_path)
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "llmos.kernel", "--home", home, "--listen",
                           "tcp://0.0.0.0:5555", "--no-curve"], cwd=ROOT, capture_output=True,
                          text=True, timeout=T)
    assert done.returncode == 2 and "needs CURVE" in done.stderr
    assert time.monotonic() - start < T / 2                # refused before the model loads
    result = CliRunner().invoke(cli, ["up", "--home", home, "--listen", "tcp://0.0.0.0:5555",
                                      "--no-curve"])
    assert result.exit_code == 1 and "needs CURVE" in result.output
