"""End to end: a real kernel process on a real socket, real agent processes.

Agents here speak through the syscall client directly (llmos.syscalls.Connection) so
that these tests check the kernel alone; the SDK has tests of its own.
"""
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from llmos.kernel import Engine
from llmos.syscalls.home import Home, read_token
from tests.kernels import signal_a_thread, start_kernel, stop_kernel
from llmos.syscalls import Connection, KernelDead, Sys, SyscallError

T = 60          # seconds: the bound on every wait here
DEAD_BOUND = 15  # s: a dead kernel is KernelDead after ~3 s; generous for a busy CI machine

AGENT = textwrap.dedent("""
    import os, sys
    from llmos.syscalls import Connection, Sys
    from llmos.syscalls.secret import own_token
    c = Connection(os.environ["LLMOS_SOCKET"], own_token(), timeout=120)
    r = c.call(Sys.GENERATE, token_ids=[int(t) for t in sys.argv[1].split(",")],
               max_tokens=int(sys.argv[2]), ignore_eos=True)
    print(",".join(map(str, r["token_ids"])))
""")


@pytest.fixture(scope="module", params=["cpu", "sim"])
def kernel(tmp_path_factory, request):
    """A kernel shared by the module's tests, on the cpu driver and on the sim plugin
    driver (`llmos up --driver sim`). Tests that end a kernel use own_kernel."""
    home = tmp_path_factory.mktemp(request.param) / "home"
    proc = start_kernel(home, "--driver", request.param)
    yield Home(home), proc
    stop_kernel(proc)


@pytest.fixture(params=["cpu", "sim"])
def own_kernel(tmp_path, request):
    """A kernel of the test's own, which it may kill."""
    home = tmp_path / "home"
    proc = start_kernel(home, "--driver", request.param)
    yield Home(home), proc
    stop_kernel(proc)


def connect(home: Home) -> Connection:
    return Connection(home.socket_url, read_token(home), timeout=T)


def test_second_kernel_on_the_same_home_refuses(kernel):
    home, proc = kernel
    second = subprocess.run([sys.executable, "-m", "llmos.kernel", "--home",
                             str(home.path)], capture_output=True, text=True, timeout=T)
    assert second.returncode == 2 and f"pid {proc.pid}" in second.stderr


def test_sixteen_agents_generate_like_the_engine_and_leave_nothing(kernel):
    home, _ = kernel
    c = connect(home)
    before = c.call(Sys.MEMINFO)["kv"]
    prompts = [[5 + i, 6, 7 + i % 3, 8] for i in range(16)]
    pids = [c.call(Sys.SPAWN, argv=[sys.executable, "-c", AGENT, ",".join(map(str, p)), "12"],
                   name=f"agent{i}")["pid"] for i, p in enumerate(prompts)]
    names = {r["name"] for r in c.call(Sys.PS)["procs"]}
    assert {f"agent{i}" for i in range(16)} <= names
    statuses = [c.call(Sys.WAIT, pid=pid, timeout=T)["status"] for pid in pids]
    assert statuses == [0] * 16, [home.proc_log(p).read_text() for p in pids]
    got = [list(map(int, home.proc_log(p).read_text().split(","))) for p in pids]
    want = Engine.from_pretrained("tiny", num_blocks=64).generate(prompts, max_tokens=12,
                                                                 ignore_eos=True)
    assert got == [w.token_ids for w in want]
    after = c.call(Sys.MEMINFO)["kv"]
    assert after["free"] == before["free"] and after["used"] == before["used"] == 0
    c.close()


def test_sigkill_of_a_streaming_agent_frees_its_blocks(kernel):
    home, _ = kernel
    c = connect(home)
    streamer = textwrap.dedent("""
        import os
        from llmos.syscalls import Connection, Sys
        from llmos.syscalls.secret import own_token
        c = Connection(os.environ["LLMOS_SOCKET"], own_token(), timeout=600)
        for ev in c.stream(Sys.GENERATE, token_ids=list(range(3, 60)), max_tokens=400,
                           ignore_eos=True, stream=True):
            print(len(ev["token_ids"]), flush=True)
    """)
    pid = c.call(Sys.SPAWN, argv=[sys.executable, "-c", streamer], name="streamer")["pid"]
    other = c.call(Sys.SPAWN, argv=[sys.executable, "-c", AGENT, "5,6,7", "30"])["pid"]
    log = home.proc_log(pid)
    deadline = time.monotonic() + T
    while not log.exists() or log.stat().st_size < 20:      # it is streaming
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert c.call(Sys.MEMINFO)["procs"].get(str(pid), {}).get("resident", 0) > 0
    c.call(Sys.KILL, pid=pid, sig="KILL")
    killed = time.monotonic()
    assert c.call(Sys.WAIT, pid=pid, timeout=T)["status"] == -signal.SIGKILL
    while c.call(Sys.MEMINFO)["procs"].get(str(pid)):
        assert time.monotonic() - killed < T, "blocks never freed"
        time.sleep(0.05)
    assert c.call(Sys.WAIT, pid=other, timeout=T)["status"] == 0
    assert len(home.proc_log(other).read_text().split(",")) == 30
    c.close()


def test_sigkill_of_the_kernel_is_kernel_dead_in_bounded_time(own_kernel):
    home, proc = own_kernel
    c = connect(home)
    errors, streaming = [], threading.Event()

    def long_call():
        try:
            for _ in c.stream(Sys.GENERATE, token_ids=[5, 6], max_tokens=500, ignore_eos=True,
                              stream=True):
                streaming.set()
        except KernelDead as e:
            errors.append((time.monotonic(), e))

    t = threading.Thread(target=long_call)
    t.start()
    assert streaming.wait(T)                          # the call is in flight
    os.kill(proc.pid, signal.SIGKILL)
    killed = time.monotonic()
    t.join(T)
    assert errors and errors[0][0] - killed < DEAD_BOUND
    start = time.monotonic()
    with pytest.raises(KernelDead):
        c.call(Sys.PING)
    assert time.monotonic() - start < DEAD_BOUND
    c.close()


def test_second_turn_on_a_context_computes_only_new_tokens(kernel):
    home, _ = kernel
    c = connect(home)
    ctx = c.call(Sys.CONTEXT_CREATE, system="You are tiny.")["context"]
    first = c.call(Sys.GENERATE, messages=[{"role": "user", "content": "add 12 47"}],
                   context=ctx, max_tokens=8)
    second = c.call(Sys.GENERATE, messages=[{"role": "user", "content": "add 38 57"}],
                    context=ctx, max_tokens=8)
    u1, u2 = first["usage"], second["usage"]
    assert u2["cached_tokens"] == u1["prompt_tokens"] + u1["completion_tokens"] - 1
    assert first["text"].strip() == "59"
    # the same conversation recomputed from nothing, in-process, gives the same reply
    engine = Engine.from_pretrained("tiny", num_blocks=64)
    tok = engine.tokenizer
    # the context holds the conversation as the template renders it whole: one BOS, and
    # the newline the template puts after the reply's </s> (the model stopped at </s>)
    full = tok.encode_chat([{"role": "system", "content": "You are tiny."},
                            {"role": "user", "content": "add 12 47"},
                            {"role": "assistant", "content": first["text"]},
                            {"role": "user", "content": "add 38 57"}])
    assert len(full) == u2["prompt_tokens"]
    again = engine.generate([full], max_tokens=8)[0]
    assert again.token_ids == second["token_ids"]
    with pytest.raises(SyscallError) as e:
        c.call(Sys.CONTEXT_INFO, context=ctx + 100)
    assert e.value.code == "ESRCH"
    c.close()


@pytest.mark.parametrize("to_main", [True, False], ids=["to-the-process", "to-another-thread"])
def test_sigterm_shuts_down_cleanly(own_kernel, to_main):
    """SIGTERM stops the kernel and its children. The kernel may deliver the signal to any
    thread not blocking it; given to another thread, it was acted on only when the idle
    engine loop (the main thread) next woke: with nothing queued, never."""
    home, proc = own_kernel
    c = connect(home)
    pid = c.call(Sys.SPAWN, argv=[sys.executable, "-c", "import time; time.sleep(600)"])["pid"]
    child = next(r["os_pid"] for r in c.call(Sys.PS)["procs"] if r["pid"] == pid)
    c.close()
    if to_main:
        proc.send_signal(signal.SIGTERM)
    else:
        signal_a_thread(proc.pid, signal.SIGTERM)
    assert proc.wait(T) == 0
    assert not home.socket_path.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)


def test_a_silent_attached_program_is_reaped_and_a_beating_one_is_not(tmp_path):
    home = Home(tmp_path / "home")
    proc = start_kernel(home.path, "--heartbeat-timeout", "1.5")
    try:
        beating = Connection(home.socket_url, read_token(home), timeout=T, heartbeat=0.3)
        silent = Connection(home.socket_url, read_token(home), timeout=T)
        watcher = Connection(home.socket_url, read_token(home), timeout=T, heartbeat=0.3)
        pids = beating.hello["pid"], silent.hello["pid"]
        deadline = time.monotonic() + T
        while pids[1] in {r["pid"] for r in watcher.call(Sys.PS)["procs"]}:
            assert time.monotonic() < deadline, "the silent program was never reaped"
            time.sleep(0.2)
        assert pids[0] in {r["pid"] for r in watcher.call(Sys.PS)["procs"]}
        for c in (beating, silent, watcher):
            c.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(T)


def test_a_thousand_bad_messages_get_precise_errors_from_the_real_kernel(kernel):
    import random

    from tests.syscalls.conftest import Raw
    from tests.kernel.test_server import bad_messages
    home, _ = kernel
    # The oversized cases of that suite assume a 64 KiB message limit; the kernel's is 16 MiB.
    cases = [c for c in bad_messages(random.Random(7)) if not c[0].startswith("oversized")]
    assert len(cases) >= 1000
    anon, authed = Raw(home.socket_url), Raw(home.socket_url)
    try:
        assert authed.call(1, Sys.HELLO, token=read_token(home))["ok"] is True
        for label, needs_hello, frames, code, cid, _ in cases:
            (authed if needs_hello else anon).send(*frames)
            reply = (authed if needs_hello else anon).recv()
            assert (reply["ok"], reply["e"]["code"], reply["id"]) == (False, code, cid), label
    finally:
        anon.close()
        authed.close()
    c = connect(home)
    assert c.call(Sys.GENERATE, prompt="12+47=", max_tokens=8)["text"] == "59"
    c.close()


def test_llmos_generate_goes_through_a_running_kernel(kernel):
    home, _ = kernel
    run = subprocess.run([sys.executable, "-m", "llmos.userland.cli", "generate", "--home",
                          str(home.path), "12+47="], capture_output=True, text=True, timeout=T)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "59\n" and "[stop; 7 prompt + 3 completion tokens" in run.stderr
    c = connect(home)
    assert c.call(Sys.SYSINFO)["generated_tokens"] >= 3     # the kernel served it
    c.close()


def test_an_engine_crash_fails_waiting_calls_and_the_kernel_exits_nonzero(tmp_path):
    home = Home(tmp_path / "home")
    proc = start_kernel(home.path, env={"LLMOS_FAULT": "engine-crash"})
    try:
        c = connect(home)
        with pytest.raises(SyscallError) as e:
            c.call(Sys.GENERATE, prompt="12+47=", max_tokens=8)
        assert e.value.code in ("ECANCELED", "EDEAD")
        assert proc.wait(T) == 1
        assert not home.socket_path.exists()
        c.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(T)


def test_hello_refuses_odd_tokens_and_a_second_hello(kernel):
    home, _ = kernel
    for token in ("wrong", "ünïcode-tökén", ""):
        with pytest.raises(SyscallError) as e:
            Connection(home.socket_url, token, timeout=T)
        assert e.value.code == "EACCES", token
    c = connect(home)
    with pytest.raises(SyscallError) as e:
        c.call(Sys.HELLO, token=read_token(home))
    assert e.value.code == "EINVAL" and f"process {c.hello['pid']}" in e.value.msg
    assert c.call(Sys.GETPID)["pid"] == c.hello["pid"]
    c.close()


def test_a_huge_tokenize_is_refused_and_long_texts_are_served(kernel):
    """TOKENIZE of 4M characters used to run on the I/O thread for 7.5 s, stalling every
    client; now it is E2BIG at once, and a long text within the cap is tokenized on a
    worker while other calls are served."""
    home, _ = kernel
    c, other = connect(home), connect(home)
    with pytest.raises(SyscallError) as e:
        c.call(Sys.TOKENIZE, text="x" * (4 << 20))
    assert e.value.code == "E2BIG"
    text = "12+47= " * 2000
    result, pings = {}, []
    t = threading.Thread(target=lambda: result.update(c.call(Sys.TOKENIZE, text=text)))
    t.start()
    while t.is_alive():
        pings.append(other.call(Sys.PING))
    t.join(T)
    assert pings and len(result["token_ids"]) >= 2000
    assert other.call(Sys.DETOKENIZE, token_ids=result["token_ids"])["text"] == text
    c.close()
    other.close()


def test_the_kernel_log_records_spawn_signal_exit_and_reap(kernel):
    home, _ = kernel
    c = connect(home)
    me = c.hello["pid"]
    quits = c.call(Sys.SPAWN, argv=["/bin/sh", "-c", "exit 3"], name="quitter")["pid"]
    sleeper = c.call(Sys.SPAWN, argv=["/bin/sleep", "60"], name="sleeper")["pid"]
    c.call(Sys.KILL, pid=sleeper, sig="TERM")
    assert c.call(Sys.WAIT, pid=quits, timeout=T)["status"] == 3
    assert c.call(Sys.WAIT, pid=sleeper, timeout=T)["status"] == -signal.SIGTERM
    c.close()
    log = home.kernel_log.read_text()
    for line in (f"pid {quits} (quitter): spawned by pid {me} as os pid",
                 f"pid {quits} (quitter): exited with status 3",
                 f"pid {quits} (quitter): reaped by pid {me} (status 3)",
                 f"pid {sleeper} (sleeper): SIGTERM from pid {me}",
                 f"pid {sleeper} (sleeper): exited with status -15",
                 f"pid {me} (attached): attached"):
        assert line in log, line
    assert " llmos.proc: pid 0 " not in log               # rows are logged before they are freed


def test_pids_are_not_reused_and_logs_survive_a_reboot(tmp_path):
    home = Home(tmp_path / "home")
    pids = []
    for boot in range(2):
        proc = start_kernel(home.path)
        try:
            c = connect(home)
            for i in range(2):
                pid = c.call(Sys.SPAWN, argv=["/bin/sh", "-c", f"echo boot {boot} run {i}"])["pid"]
                assert c.call(Sys.WAIT, pid=pid, timeout=T)["status"] == 0
                pids.append(pid)
            c.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(T)
    assert len(set(pids)) == 4 and pids == sorted(pids)
    assert [home.proc_log(p).read_text() for p in pids] == [
        "boot 0 run 0\n", "boot 0 run 1\n", "boot 1 run 0\n", "boot 1 run 1\n"]


def test_the_owner_waits_for_a_process_it_did_not_spawn(kernel):
    """`llmos wait PID` from a new CLI call: the spawner has exited, the owner collects."""
    home, _ = kernel
    starter = connect(home)
    pid = starter.call(Sys.SPAWN, argv=["/bin/sh", "-c", "sleep 0.2; exit 4"])["pid"]
    starter.call(Sys.EXIT, status=0)
    starter.close()
    later = connect(home)
    assert later.call(Sys.WAIT, pid=pid, timeout=T) == {"pid": pid, "exited": True, "status": 4}
    with pytest.raises(SyscallError) as e:
        later.call(Sys.WAIT, pid=pid, timeout=T)            # collected
    assert e.value.code == "ESRCH"
    later.close()


def test_sysinfo_names_the_driver_in_use_and_a_default_kernel_stays_small(tmp_path):
    import psutil
    home = Home(tmp_path / "home")
    proc = subprocess.Popen([sys.executable, "-m", "llmos.kernel", "--home", str(home.path),
                             "--driver", "auto", "--max-agents", "2"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], T)
        assert ready and "listening on" in proc.stdout.readline()
        c = connect(home)
        info = c.call(Sys.SYSINFO)
        assert info["driver"] in ("cpu", "sim") and info["driver"] != "auto"
        assert info["max_agents"] == 2                  # finding 7: live agents are capped
        for _ in range(2):
            c.call(Sys.SPAWN, argv=["sleep", "60"])
        with pytest.raises(SyscallError) as e:
            c.call(Sys.SPAWN, argv=["sleep", "60"])
        assert e.value.code == "EAGAIN" and "--max-agents" in str(e.value)
        assert c.call(Sys.GENERATE, prompt="12+47=", max_tokens=8)["text"] == "59"
        kv = c.call(Sys.MEMINFO)["kv"]
        assert kv["total"] * kv["block_size"] > 100_000     # the default pool is big...
        rss = psutil.Process(proc.pid).memory_info().rss
        assert rss < 500 << 20, f"{rss >> 20} MiB resident"              # ...but not resident
        c.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(T)
