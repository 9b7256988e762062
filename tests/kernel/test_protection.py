"""Protection against local callers, each finding of the security review as a regression
test against a real kernel: budgets before hello, sessions bound to their connection,
privacy between process trees, waits without threads, a spawn that cannot leak rows."""
from __future__ import annotations

import signal
import sys
import textwrap
import time

import msgpack
import psutil
import pytest
import zmq

from llmos.syscalls import Connection, Sys, SyscallError, wire
from llmos.syscalls.home import Home, read_token
from tests.kernels import running_kernel, short_home, start_kernel, stop_kernel

T = 60


@pytest.fixture(scope="module")
def kernel():
    home = Home(short_home())
    proc = start_kernel(home.path)
    yield home, proc
    stop_kernel(proc)


def owner(home) -> Connection:
    return Connection(home.socket_url, read_token(home), timeout=T)


def raw(home, identity: bytes | None = None):
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if identity is not None:
        s.setsockopt(zmq.ROUTING_ID, identity)
    s.connect(home.socket_url)
    return s


def ask(sock, cid: int, nr: int, **args) -> dict:
    sock.send(wire.encode_request(cid, nr, args))
    assert sock.poll(T * 1000), "no reply"
    return msgpack.unpackb(sock.recv(), raw=False)


def until(pred, timeout=T):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_connections_that_never_speak_cannot_hold_the_kernels_fds(kernel):
    # A DEALER that connects and sends nothing was never a guest (guests are counted from
    # their first message), so 300 of them held 300 kernel fds for as long as they liked.
    from llmos.kernel.peers import MAX_GUESTS
    home, proc = kernel
    fds = psutil.Process(proc.pid).num_fds
    c = owner(home)
    base = fds()
    socks = [raw(home) for _ in range(MAX_GUESTS + 100)]
    try:
        for s in socks:                          # each connects; none says a word
            s.getsockopt(zmq.EVENTS)
        until(lambda: fds() >= base + MAX_GUESTS // 2, timeout=T)   # the kernel accepted them
        time.sleep(1.0)                          # ...all of them, had nobody hung up
        assert fds() <= base + MAX_GUESTS + 8, f"{fds() - base} silent connections held"
        assert c.call(Sys.PING) == {}            # the authenticated client is untouched
    finally:
        for s in socks:
            s.close()
        c.close()


def test_guests_cannot_evict_an_authenticated_client(kernel):
    """4,500 pings from fresh identities before hello used to push a heart-beating SDK
    client out of the 4,096-peer table (its process was detached, its contexts freed)."""
    home, _ = kernel
    c = owner(home)
    ctx = c.call(Sys.CONTEXT_CREATE, system="You are tiny.")["context"]
    ctx_sock = zmq.Context.instance()
    for i in range(4500):
        s = ctx_sock.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(home.socket_url)
        s.send(wire.encode_request(1, Sys.PING, {}))
        assert s.poll(T * 1000)                 # answered: the kernel knows this peer
        s.close()
    assert c.call(Sys.CONTEXT_INFO, context=ctx)["id"] == ctx      # still a process
    assert c.hello["pid"] in {r["pid"] for r in c.call(Sys.PS)["procs"]}
    c.close()


def test_a_big_frame_before_hello_is_refused_undecoded(kernel):
    """A 14 MB frame of empty maps before hello decoded into 14 M objects (+991 MiB RSS)."""
    home, proc = kernel
    s = raw(home)
    before = psutil.Process(proc.pid).memory_info().rss
    s.send(b"\x9d" + b"\x80" * (14 << 20))          # an array header, then 14 M empty maps
    assert s.poll(T * 1000)
    reply = msgpack.unpackb(s.recv(), raw=False)
    assert reply["e"]["code"] == "E2BIG" and "before hello" in reply["e"]["msg"]
    assert psutil.Process(proc.pid).memory_info().rss - before < 200 << 20
    assert ask(s, 2, Sys.PING)["ok"] is True
    s.close()


def test_errors_before_hello_do_not_flood_the_log(kernel):
    home, _ = kernel
    s = raw(home)
    size = home.kernel_log.stat().st_size
    for i in range(2000):
        assert ask(s, i, 10_000 + i % 7)["e"]["code"] == "ENOSYS"
    s.close()
    assert home.kernel_log.stat().st_size - size < 2000     # a line a minute, not 2,000


def test_a_client_that_reconnects_at_once_keeps_its_new_session(kernel):
    # The old connection's fd number goes to the new one before the kernel reads the old
    # one's DISCONNECTED; that event dropped the newcomer, whose next call was "say hello
    # first" (2 in 150 rounds on this box; test_daemon's owner-wait test flaked on it).
    home, _ = kernel
    for _ in range(60):
        starter = owner(home)
        pid = starter.call(Sys.SPAWN, argv=["/bin/sh", "-c", "exit 4"])["pid"]
        starter.call(Sys.EXIT, status=0)
        starter.close()
        later = owner(home)
        assert later.call(Sys.WAIT, pid=pid, timeout=T)["status"] == 4
        later.close()


def test_a_reused_routing_id_is_not_the_old_session(kernel):
    """Authentication belonged to the routing id: a new connection that reused an
    authenticated one's id ran ps and spawn as the owner without a token."""
    home, _ = kernel
    first = raw(home, b"owner-id")
    assert ask(first, 1, Sys.HELLO, token=read_token(home))["ok"] is True
    assert ask(first, 2, Sys.PS)["ok"] is True
    first.close()
    reply = None
    deadline = time.monotonic() + T
    while reply is None or reply.get("ok") is None:
        second = raw(home, b"owner-id")
        second.send(wire.encode_request(3, Sys.PS, {}))
        if second.poll(2000):                     # libzmq may refuse the id for a moment
            reply = msgpack.unpackb(second.recv(), raw=False)
        second.close()
        assert time.monotonic() < deadline, "the id was never accepted again"
    assert reply["ok"] is False and reply["e"]["code"] == "EACCES"


def test_a_dead_process_connection_acts_for_nobody(kernel):
    home, _ = kernel
    c = owner(home)
    agent = textwrap.dedent("""
        import os, time
        from llmos.syscalls import Connection, Sys
        from llmos.syscalls.secret import own_token
        c = Connection(os.environ["LLMOS_SOCKET"], own_token(), timeout=60)
        print(c.hello["pid"], own_token(), flush=True)
        time.sleep(60)
    """)
    pid = c.call(Sys.SPAWN, argv=[sys.executable, "-c", agent])["pid"]
    # A second connection says hello with the agent's own secret (here the agent tells
    # it; see test_a_sibling_cannot_take_an_agents_identity) while the agent lives.
    until(lambda: home.proc_log(pid).read_text().startswith(f"{pid} "))
    token = home.proc_log(pid).read_text().split()[1]
    session = Connection(home.socket_url, token, timeout=T)
    assert session.call(Sys.GETPID)["pid"] == pid
    c.call(Sys.KILL, pid=pid, sig="KILL")
    assert c.call(Sys.WAIT, pid=pid, timeout=T)["status"] == -signal.SIGKILL
    with pytest.raises(SyscallError) as e:
        session.call(Sys.PS)
    assert e.value.code == "ESRCH"
    session.close()
    c.close()


def test_agents_see_only_their_tree_and_share_prefixes_only_within_it(kernel):
    home, _ = kernel
    c = owner(home)
    agent = textwrap.dedent("""
        import json, os, sys
        from llmos.userland import connect
        k = connect()
        prompt = sys.argv[1]
        r = k.generate(prompt, max_tokens=1, share=sys.argv[2] or None)
        print(json.dumps({"cached": r.usage.cached_tokens,
                          "seen": sorted(p.pid for p in k.ps()),
                          "mem": sorted(k.meminfo().procs)}), flush=True)
    """)
    prompt = "reverse a b c d e f g h i j k l m n o p q r s t u v w x y z a b c d e f ="

    def run(share=""):
        pid = c.call(Sys.SPAWN, argv=[sys.executable, "-c", agent, prompt, share])["pid"]
        assert c.call(Sys.WAIT, pid=pid, timeout=T)["status"] == 0
        import json
        return pid, json.loads(home.proc_log(pid).read_text())

    first, a = run()
    second, b = run()
    assert a["seen"] == [first] and b["seen"] == [second]     # each its own tree
    assert b["cached"] == 0                                    # no hit across trees
    third, x = run("team")
    fourth, y = run("team")
    assert x["cached"] == 0 and y["cached"] >= 16              # an explicit share group
    c.close()


def test_waits_take_no_thread_each(kernel):
    """One kernel thread per WAIT: 4 connections x 1,000 waits made 4,008 threads."""
    home, proc = kernel
    c = owner(home)
    child = c.call(Sys.SPAWN, argv=["/bin/sleep", "60"])["pid"]
    socks = [raw(home) for _ in range(4)]
    for s in socks:
        assert ask(s, 0, Sys.HELLO, token=read_token(home))["ok"] is True
        for i in range(1, 1001):
            s.send(wire.encode_request(i, Sys.WAIT, {"pid": child, "timeout": T}))
        # one connection's messages are dispatched in order: once this ping is answered,
        # its 1,000 waits are all waiting in the kernel
        assert ask(s, 5000, Sys.PING) == {"v": 1, "id": 5000, "ok": True, "r": {}}
    assert psutil.Process(proc.pid).num_threads() < 40
    c.call(Sys.KILL, pid=child, sig="KILL")
    for s in socks:
        for _ in range(1000):
            assert s.poll(T * 1000)
            reply = msgpack.unpackb(s.recv(), raw=False)
            assert reply["ok"] and reply["r"]["status"] == -signal.SIGKILL
        s.close()
    c.close()


def test_bad_spawns_leak_no_rows(kernel):
    """A NUL in argv or env made Popen raise ValueError; the row was never freed and
    4,095 such calls filled the table (then even the owner's hello was EAGAIN)."""
    home, _ = kernel
    c = owner(home)
    rows = len(c.call(Sys.PS)["procs"])
    bad = [dict(argv=["/bin/echo", "a\0b"]), dict(argv=["/bin/echo"], env={"K": "v\0"}),
           dict(argv=["/bin/echo"], env={"A=B": "v"})]
    for i in range(300):
        with pytest.raises(SyscallError) as e:
            c.call(Sys.SPAWN, **bad[i % 3])
        assert e.value.code == "EINVAL"
    assert len(c.call(Sys.PS)["procs"]) == rows
    other = owner(home)
    assert other.call(Sys.GETPID)["pid"] > 0
    other.close()
    c.close()


def test_an_agent_cannot_say_hello_as_the_owner(kernel):
    """An agent refused EPERM when killing a sibling read HOME/run/token, said hello as
    the owner and killed the sibling."""
    home, _ = kernel
    c = owner(home)
    sibling = c.call(Sys.SPAWN, argv=["/bin/sleep", "60"])["pid"]
    attacker = textwrap.dedent(f"""
        import os
        from llmos.syscalls import Connection, Sys, SyscallError
        from llmos.syscalls.home import Home, read_token
        from llmos.syscalls.secret import own_token
        mine = Connection(os.environ["LLMOS_SOCKET"], own_token(), timeout=60)
        try:
            mine.call(Sys.KILL, pid={sibling}, sig="KILL")
        except SyscallError as e:
            print("own rights:", e.code)
        sock = os.environ["LLMOS_SOCKET"].removeprefix("ipc://")     # HOME/run/kernel.sock
        home = Home(os.path.dirname(os.path.dirname(sock)))
        try:
            stolen = Connection(home.socket_url, read_token(home), timeout=60)
            stolen.call(Sys.KILL, pid={sibling}, sig="KILL")
            print("owner's rights: killed")
        except SyscallError as e:
            print("owner's rights:", e.code)
    """)
    pid = c.call(Sys.SPAWN, argv=[sys.executable, "-c", attacker])["pid"]
    assert c.call(Sys.WAIT, pid=pid, timeout=T)["status"] == 0, home.proc_log(pid).read_text()
    assert home.proc_log(pid).read_text().split("\n")[:2] == ["own rights: EPERM",
                                                             "owner's rights: EACCES"]
    assert c.call(Sys.WAIT, pid=sibling, timeout=0)["exited"] is False    # alive
    c.call(Sys.KILL, pid=sibling, sig="KILL")
    c.close()


# ---- identity: a spawned process's secret ------------------------------------------------

def os_pid_of(c, pid) -> int:
    return next(r["os_pid"] for r in c.call(Sys.PS)["procs"] if r["pid"] == pid)


# Every 64-hex-digit string in a process's environment and in what its open files read
# (a secret's shape), tried as a hello: the attack of a sibling running as the same uid.
THIEF = textwrap.dedent("""
    import os, sys
    from llmos.syscalls import Connection, SyscallError
    victim, seen = sys.argv[1], []
    try:
        with open(f"/proc/{victim}/environ", "rb") as f:
            seen += [v.split(b"=", 1)[-1] for v in f.read().split(b"\\0")]
    except OSError as e:
        print("environ:", e.strerror)
    try:
        fds = os.listdir(f"/proc/{victim}/fd")
    except OSError as e:
        print("fd:", e.strerror)
        fds = []
    for fd in fds:
        try:
            n = os.open(f"/proc/{victim}/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            seen += os.read(n, 1 << 16).split()
        except OSError:
            pass
        finally:
            os.close(n)
    found = {s.decode() for s in seen
             if len(s) == 64 and all(ch in b"0123456789abcdef" for ch in s)}
    became = []
    for secret in found:
        try:
            became.append(Connection(os.environ["LLMOS_SOCKET"], secret, timeout=60).hello["pid"])
        except SyscallError:
            pass
    print("tried", len(found), "became", became, flush=True)
""")


def test_a_sibling_cannot_take_an_agents_identity(kernel):
    """A spawned agent's secret was in its environment (LLMOS_TOKEN) for its whole life: a
    sibling of the same uid read /proc/<pid>/environ, said hello with it and was that
    agent (its rights, its contexts, its children). Now, once the agent has connected,
    neither its environment nor its open files hold the secret."""
    home, _ = kernel
    c = owner(home)
    victim = textwrap.dedent("""
        import time
        from llmos.userland import connect
        a, b = connect(), connect()        # the second from the secret kept in memory
        print(a.pid, b.pid, flush=True)
        time.sleep(60)
    """)
    pid = c.call(Sys.SPAWN, argv=[sys.executable, "-c", victim])["pid"]
    until(lambda: home.proc_log(pid).read_text().strip() == f"{pid} {pid}")
    thief = c.call(Sys.SPAWN, argv=[sys.executable, "-c", THIEF, str(os_pid_of(c, pid))])["pid"]
    assert c.call(Sys.WAIT, pid=thief, timeout=T)["status"] == 0, home.proc_log(thief).read_text()
    assert home.proc_log(thief).read_text().splitlines()[-1].endswith(" became []")
    c.call(Sys.KILL, pid=pid, sig="KILL")
    c.close()


def test_a_secret_taken_before_the_agent_reads_it_is_noticed(kernel, tmp_path):
    """The hand-over's one window: a sibling that reads the pipe (through /proc/<pid>/fd)
    before the agent does gets the secret; the agent's connect() then fails and says so,
    rather than two processes sharing one identity unnoticed."""
    home, _ = kernel
    c = owner(home)
    go = tmp_path / "go"
    slow = textwrap.dedent("""
        import os, sys, time
        from llmos.userland import SyscallError, connect
        while not os.path.exists(sys.argv[1]):
            time.sleep(0.05)
        try:
            connect()
        except SyscallError as e:
            print(e, flush=True)
    """)
    pid = c.call(Sys.SPAWN, argv=[sys.executable, "-c", slow, str(go)])["pid"]
    proc = psutil.Process(os_pid_of(c, pid))
    seen = []

    def token_fd():                  # one read a try: environ is empty while setpriv execs
        seen.append(proc.environ().get("LLMOS_TOKEN_FD"))
        return seen[-1]

    until(token_fd)
    with open(f"/proc/{proc.pid}/fd/{seen[-1]}") as f:
        stolen = f.read().strip()
    thief = Connection(home.socket_url, stolen, timeout=T)
    assert thief.hello["pid"] == pid                      # the window is real ...
    go.touch()
    assert c.call(Sys.WAIT, pid=pid, timeout=T)["status"] == 0
    assert home.proc_log(pid).read_text().startswith(      # ... and the agent notices
        "EACCES: this process's secret was already taken")
    thief.close()
    c.close()


def test_a_program_an_agent_starts_is_not_that_agent(kernel):
    """LLMOS_TOKEN was inherited by whatever an agent started, so each of them was that
    agent. Now a child the agent starts itself has no secret; its connect() falls back to
    the owner's token, which the kernel refuses from below an agent, saying what to do."""
    home, _ = kernel
    c = owner(home)
    agent = textwrap.dedent("""
        import subprocess, sys
        from llmos.userland import connect
        k = connect()
        child = subprocess.run([sys.executable, "-c", "from llmos.userland import connect; "
                                "connect()"], capture_output=True, text=True, timeout=60)
        print(k.pid, child.returncode)
        print(child.stderr.strip().splitlines()[-1] if child.stderr.strip() else "-")
    """)
    pid = c.call(Sys.SPAWN, argv=[sys.executable, "-c", agent])["pid"]
    assert c.call(Sys.WAIT, pid=pid, timeout=T)["status"] == 0, home.proc_log(pid).read_text()
    said, error = home.proc_log(pid).read_text().splitlines()[:2]
    assert said == f"{pid} 1"
    assert "SyscallError: EACCES: hello: the owner's token is refused" in error
    assert "spawn()" in error and "`llmos run`" in error
    c.close()


def test_routing_ids_a_client_chooses_cannot_abort_the_kernel():
    # libzmq numbers a ROUTER's routing ids "\0" + a counter that starts at the C library's
    # first rand(); unseeded, that is 0x6b8b4567 in every kernel. Clients holding the first
    # ids made the next plain connection hit libzmq's assertion: the kernel aborted. (A
    # kernel of its own: the counter of a used one has moved on.)
    with running_kernel() as (path, proc):
        home = Home(path)
        socks = [raw(home, b"\x00" + (0x6B8B4567 + i).to_bytes(4, "big")) for i in range(64)]
        try:
            for s in socks:                      # each connection is registered by now
                assert ask(s, 1, Sys.PING)["ok"]
            c = owner(home)
            assert c.call(Sys.PING) == {} and proc.poll() is None
            c.close()
        finally:
            for s in socks:
                s.close()
