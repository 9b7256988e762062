"""The SDK against a stub kernel: the real syscall Server and socket, stub handlers."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from llmos.userland import (CallTimeout, Completion, Delta, KernelDead, KernelNotRunning,
                            SyscallError, Usage, connect)
from llmos.userland.sdk import _generate_args
from tests.userland.conftest import ROOT, short_home, start_stub, stop_stub

TIMEOUT = 30

pytestmark = pytest.mark.usefixtures("no_agent_env")


@pytest.fixture
def k(stub_home):
    with connect(stub_home, timeout=TIMEOUT) as kernel:
        yield kernel


def light_imports(code: str) -> set:
    """Run code in a fresh interpreter; the heavy modules it left in sys.modules."""
    probe = code + "\nimport sys\nprint(sorted(m for m in sys.modules if m == 'torch' or " \
                   "m.startswith('torch.') or m == 'llmos.kernel.engine'))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=TIMEOUT, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return set(eval(out.stdout.strip().splitlines()[-1]))


def test_importing_userland_loads_neither_torch_nor_the_kernel():
    assert light_imports("import llmos.userland, sys\n"
                         "assert not any(m.startswith('llmos.kernel') for m in sys.modules)") == set()
    assert light_imports("from llmos.userland import connect, SyscallError, KernelDead\n"
                         "import sys\n"
                         "assert not any(m.startswith('llmos.kernel') for m in sys.modules)") == set()


def test_connecting_loads_no_torch(stub_home):
    assert light_imports(f"from llmos.userland import connect\nconnect({stub_home!r}).ping()") == set()


def test_hello_gives_the_pid(k):
    assert isinstance(k.pid, int) and k.pid > 0 and k.version == 1
    assert k.getpid() == k.pid
    assert str(k.home) and k.log_path(7).name == "7.log"


def test_generate_returns_a_completion(k):
    done = k.generate("12+47=", max_tokens=8, stop="\n")
    assert done == Completion(text="59", token_ids=[ord("5"), ord("9")], finish_reason="stop",
                              usage=Usage(prompt_tokens=6, cached_tokens=0, completion_tokens=2))
    assert k.generate("reverse c a t =", max_tokens=2).finish_reason == "length"
    chat = k.generate(messages=[{"role": "user", "content": "add 12 47"}])
    assert chat.text == "59"
    assert k.generate(token_ids=[1, 2, 3]).text == "ok"


def test_unset_options_are_left_to_the_kernel():
    assert _generate_args("x", None, None, {"max_tokens": 4, "temperature": None, "stop": "\n",
                                            "seed": 0}) == {
        "prompt": "x", "max_tokens": 4, "stop": ["\n"], "seed": 0}
    assert _generate_args(None, None, (1, 2), {}) == {"token_ids": [1, 2]}
    with pytest.raises(TypeError, match="max_token"):
        _generate_args("x", None, None, {"max_token": 4})


def test_streaming_yields_deltas_then_sets_the_completion(k):
    stream = k.generate("reverse l l m o s =", stream=True)
    assert stream.completion is None
    deltas = list(stream)
    assert deltas and all(isinstance(d, Delta) for d in deltas)
    assert "".join(d.text for d in deltas) == stream.completion.text == " s o m l l"
    assert sum((d.token_ids for d in deltas), []) == stream.completion.token_ids
    assert k.generate("12+47=", stream=True).result().text == "59"


def test_abandoning_a_stream_cancels_it(k):
    with k.generate("hang", stream=True) as stream:
        assert next(stream).text
    assert stream.completion is None
    k.ping()                                      # the connection is still good
    assert k.generate("12+47=").text == "59"


def test_a_call_past_its_deadline_times_out(stub_home):
    with connect(stub_home, timeout=0.5) as k:
        start = time.monotonic()
        with pytest.raises(CallTimeout) as e:
            k.generate("hang")
        assert e.value.code == "ETIMEDOUT" and time.monotonic() - start < 5
        k.ping()


@pytest.mark.parametrize("call, code", [
    (lambda k: k.generate("nomem"), "ENOMEM"),
    (lambda k: k.generate("x", top_p=0), "EINVAL"),
    (lambda k: k.generate("x", messages=[]), "EINVAL"),
    (lambda k: k.kill(99999), "ESRCH"),
    (lambda k: k.kill(1, "HUP"), "EINVAL"),
    (lambda k: k.wait(99999), "ESRCH"),
])
def test_errors_carry_their_code(k, call, code):
    with pytest.raises(SyscallError) as e:
        call(k)
    assert e.value.code == code


def test_a_context_keeps_its_tokens(k):
    with k.context(system="You are tiny.") as ctx:
        first = ctx.generate(messages=[{"role": "user", "content": "add 12 47"}])
        second = ctx.generate(messages=[{"role": "user", "content": "add 38 57"}])
        assert (first.text, second.text) == ("59", "95")
        assert second.usage.cached_tokens == first.usage.prompt_tokens + first.usage.completion_tokens
        assert second.usage.computed_tokens == second.usage.prompt_tokens - second.usage.cached_tokens
        before = ctx.info()["tokens"]
        appended = ctx.append("more")
        assert appended.text == "" and ctx.info()["tokens"] == before + 4
        with ctx.fork() as child:
            assert child.id != ctx.id and child.info()["tokens"] == ctx.info()["tokens"]
            assert child.generate("12+47=").usage.cached_tokens == ctx.info()["tokens"]
        with pytest.raises(SyscallError) as e:
            child.info()
        assert e.value.code == "ESRCH"
        streamed = ctx.generate("reverse c a t =", stream=True)
        assert "".join(d.text for d in streamed) == " t a c"
    ctx.close()                                   # idempotent
    with pytest.raises(SyscallError):
        ctx.info()


def test_tokenize_round_trips(k):
    ids = k.tokenize("hello")
    assert k.detokenize(ids) == "hello"


def test_system_calls_return_their_shapes(k):
    assert {"total", "free", "block_size"} <= set(k.meminfo()["kv"])
    assert k.models()[0]["name"] == "tiny"
    assert "uptime" in k.sysinfo()
    assert k.ping() is None
    assert any(p["pid"] == k.pid for p in k.ps())


def test_spawned_agent_connects_with_its_own_token_and_exits(k):
    pid = k.spawn([sys.executable, "-m", "llmos.userland.examples.hello", "38+57="], name="hello")
    assert any(p["pid"] == pid and p["name"] == "hello" for p in k.ps())
    assert k.wait(pid, timeout=TIMEOUT) == 0
    assert "38+57=95" in k.log_path(pid).read_text()


def test_kill_and_wait(k):
    pid = k.spawn(["sleep", "60"])
    assert k.wait(pid, timeout=0.2) is None
    k.kill(pid, "KILL")
    assert k.wait(pid, timeout=TIMEOUT) == -signal.SIGKILL


def test_one_kernel_is_shared_by_threads(k):
    errors, answers = [], []

    def work(i):
        try:
            for _ in range(20):
                a, b = 10 + i, 20 + i
                if i % 2:
                    answers.append(k.generate(f"{a}+{b}=").text == str(a + b))
                else:
                    answers.append(k.generate(f"{a}+{b}=", stream=True).result().text == str(a + b))
        except Exception as e:
            errors.append(e)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not any(t.is_alive() for t in threads)
    assert not errors and len(answers) == 160 and all(answers)


def test_a_killed_kernel_becomes_kernel_dead():
    home = short_home()
    proc = start_stub(home)
    try:
        k = connect(home)
        failed = []
        t = threading.Thread(target=lambda: failed.append(_raises(lambda: k.generate("hang"))))
        t.start()
        time.sleep(0.3)
        proc.send_signal(signal.SIGKILL)
        start = time.monotonic()
        t.join(TIMEOUT)
        assert not t.is_alive() and isinstance(failed[0], KernelDead)
        assert time.monotonic() - start < 10
        with pytest.raises(KernelDead):
            k.ping()                              # later calls fail at once
        k.close()
        with pytest.raises(KernelNotRunning):     # the pid lock died with it
            connect(home)
    finally:
        stop_stub(proc)
        shutil.rmtree(home, ignore_errors=True)


def _raises(fn):
    try:
        fn()
    except Exception as e:
        return e
    return None


def test_no_kernel_says_how_to_start_one(tmp_path):
    with pytest.raises(KernelNotRunning) as e:
        connect(tmp_path)
    assert "llmos up" in str(e.value) and isinstance(e.value, KernelDead)


def test_agent_environment_is_used(stub_home, monkeypatch):
    from llmos.kernel.home import Home
    monkeypatch.setenv("LLMOS_SOCKET", Home(stub_home).socket_url)
    monkeypatch.setenv("LLMOS_TOKEN", "not-the-token")
    with pytest.raises(SyscallError) as e:
        connect()
    assert e.value.code == "EACCES"
    monkeypatch.setenv("LLMOS_SOCKET", "ipc:///nonexistent/run/kernel.sock")
    with pytest.raises(KernelNotRunning, match="llmos up"):
        connect()


def test_exit_reports_the_status(k, stub_home):
    code = ("import sys\nfrom llmos.userland import connect\n"
            "k = connect()\nk.exit(3)\nsys.exit(3)")
    pid = k.spawn([sys.executable, "-c", code])
    assert k.wait(pid, timeout=TIMEOUT) == 3
    assert os.path.exists(k.log_path(pid))
