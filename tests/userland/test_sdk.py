"""The SDK (userland/sdk.py) against a real kernel on the embedded `tiny` model.

One kernel serves the module (`kernel_home`); the test that kills a kernel boots its own.
`tiny` answers "12+47=" with "59", "reverse c a t =" with " t a c", and the chat
message "add 12 47" with "59". Agents are real processes the kernel spawns; they connect
with LLMOS_SOCKET and their own secret (connect()) and report what they saw on stdout.
Every wait is bounded by T; the bounds are safety nets, not timing assertions.
"""
from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from llmos.syscalls import Connection, Sys, secret
from llmos.syscalls.home import Home, HomeError
from llmos.userland import (CallTimeout, Completion, Context, ContextInfo, Delta, KernelDead,
                            KernelNotRunning, MemInfo, ModelInfo, ProcInfo, ProcState,
                            SyscallError, SysInfo, Usage, WaitStatus, connect)
from llmos.userland import attach
from llmos.userland.llm import _OPTIONS, _generate_args
from tests.kernels import ROOT, until

T = 60                  # seconds: the bound on every wait here
LONG = dict(max_tokens=400, ignore_eos=True)    # a generate that runs for a while (7 + 400 < 512)
CHAT = [{"role": "user", "content": "add 12 47"}]

pytestmark = pytest.mark.usefixtures("no_agent_env")


@pytest.fixture
def k(kernel_home):
    with connect(kernel_home, timeout=T) as kernel:
        yield kernel


# ---- helpers -------------------------------------------------------------------------------



def row(k, pid: int) -> ProcInfo | None:
    """pid's row in ps, or None."""
    return next((p for p in k.ps() if p.pid == pid), None)


def settled(k, pid: int) -> ProcInfo | None:
    """pid's row once it has no LLM call in flight and no KV blocks (else None)."""
    r = row(k, pid)
    return r if r.calls == 0 and r.kv_blocks == 0 and k.meminfo().procs.get(pid, 0) == 0 else None


def tokens_out_stable(k, pid: int, gap: float = 0.5) -> int:
    """pid's tokens_out once two readings gap seconds apart agree."""
    def same():
        before = row(k, pid).tokens_out
        time.sleep(gap)
        after = row(k, pid).tokens_out
        return (after,) if after == before else None
    return until(same, f"pid {pid}'s tokens_out to stop growing")[0]


def agent(k, code: str, *args, **spawn) -> int:
    """Spawn `python -c code args...` (code dedented) as k's child; its pid."""
    return k.spawn([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], **spawn)


def output(k, pid: int) -> str:
    return k.log_path(pid).read_text()


def report(k, pid: int) -> dict:
    """The JSON line an agent printed last (after it exited)."""
    lines = [ln for ln in output(k, pid).splitlines() if ln.startswith("{")]
    assert lines, output(k, pid)
    return json.loads(lines[-1])


def light_imports(code: str) -> set:
    """Run code in a fresh interpreter; the heavy modules it left in sys.modules."""
    probe = code + "\nimport sys\nprint(sorted(m for m in sys.modules if m == 'torch' or " \
                   "m.startswith('torch.') or m == 'llmos.kernel.engine'))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=T, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return set(eval(out.stdout.strip().splitlines()[-1]))


# ---- connecting ----------------------------------------------------------------------------

NO_KERNEL = "\nassert not any(m.startswith('llmos.kernel') for m in sys.modules)"


def test_importing_userland_loads_neither_torch_nor_the_kernel():
    assert light_imports("import llmos.userland, sys" + NO_KERNEL) == set()
    assert light_imports("from llmos.userland import connect, SyscallError, KernelDead\n"
                         "import sys" + NO_KERNEL) == set()


def test_connecting_and_generating_loads_no_torch(kernel_home):
    assert light_imports(f"from llmos.userland import connect\n"
                         f"with connect({kernel_home!r}) as k:\n"
                         f"    assert k.generate('12+47=', max_tokens=4).text == '59'") == set()


def test_connect_attaches_as_a_process_of_the_owner(kernel_home):
    with connect(kernel_home, timeout=T) as k:
        assert k.pid > 0 and k.ppid == 0 and k.version == 1 and k.owner is True
        assert k.kernel_pid == Home(kernel_home).running_pid()
        assert k.getpid() == k.pid
        assert repr(k) == f"<Kernel pid={k.pid} at {Home(kernel_home).socket_url}>"
        assert k.home == Path(kernel_home) and k.log_path(7) == Path(kernel_home) / "log" / "7.log"
        me = row(k, k.pid)
        assert (me.ppid, me.name, me.state, me.os_pid) == (0, "attached", ProcState.SLEEPING, None)
        assert k.ping() is None
    with pytest.raises(KernelDead):
        k.ping()                                  # closed: every later call says so at once


def test_no_kernel_says_how_to_start_one(tmp_path):
    with pytest.raises(KernelNotRunning) as e:
        connect(tmp_path)
    assert f"llmos up --home {tmp_path}" in str(e.value) and isinstance(e.value, KernelDead)


def test_a_wrong_token_is_eacces(kernel_home):
    with pytest.raises(SyscallError) as e:
        Connection(Home(kernel_home).socket_url, "not-the-token", timeout=T)
    assert e.value.code == "EACCES"


@pytest.fixture
def fresh_secret(monkeypatch):
    """This process as if just spawned: no secret taken yet, and taking one leaves it
    dumpable (the pytest process must stay observable)."""
    monkeypatch.setattr(secret, "_secret", None)
    monkeypatch.setattr(secret, "_failure", None)
    monkeypatch.setattr(secret, "_undumpable", lambda: None)


def test_the_agent_environment_is_used(kernel_home, monkeypatch, fresh_secret):
    monkeypatch.setenv("LLMOS_SOCKET", Home(kernel_home).socket_url)
    monkeypatch.setenv("LLMOS_TOKEN_FD", str(secret.hand_over("not-the-token")))
    with pytest.raises(SyscallError) as e:
        connect()
    assert e.value.code == "EACCES" and "wrong token" in e.value.msg
    assert "LLMOS_TOKEN_FD" not in os.environ           # read once, and the fd closed
    assert secret.own_token() == "not-the-token"        # kept in memory
    monkeypatch.setenv("LLMOS_SOCKET", "ipc:///nonexistent/run/kernel.sock")
    with pytest.raises(KernelNotRunning, match="llmos up"):
        connect()


def test_a_program_below_an_agent_attaches_to_its_kernel_or_is_told_to_spawn(
        kernel_home, monkeypatch, fresh_secret):
    """LLMOS_SOCKET without a secret (a program an agent started itself): connect() tries
    the owner token of that socket's home, not of the default home. Where the token is
    unreadable (agents under another uid) the error says what to do."""
    monkeypatch.setenv("LLMOS_SOCKET", Home(kernel_home).socket_url)
    with connect(timeout=T) as k:                  # not below a kernel: the owner
        assert k.owner and str(k.home) == str(Home(kernel_home).path)

    def unreadable(h):
        raise HomeError(f"{h.token_path}: permission denied")
    monkeypatch.setattr(attach, "read_token", unreadable)
    with pytest.raises(SyscallError) as e:
        connect()
    assert e.value.code == "EACCES" and "start it with spawn() or `llmos run`" in e.value.msg


def test_a_secret_fd_that_is_empty_or_no_pipe_is_eacces(monkeypatch, fresh_secret, tmp_path):
    r, w = os.pipe()
    os.close(w)                                           # read to the end by someone else
    monkeypatch.setenv("LLMOS_TOKEN_FD", str(r))
    for _ in range(2):                                    # and said again, not read again
        with pytest.raises(SyscallError, match="already taken") as e:
            secret.own_token()
        assert e.value.code == "EACCES"
    monkeypatch.setattr(secret, "_failure", None)
    with open(tmp_path / "f", "w") as f:                  # inherited the variable, not the fd
        monkeypatch.setenv("LLMOS_TOKEN_FD", str(f.fileno()))
        with pytest.raises(SyscallError, match="not spawned by the kernel"):
            secret.own_token()
        assert not f.closed and os.fstat(f.fileno())     # not ours: left open


def test_exit_of_an_attached_program_leaves_ps(kernel_home, k):
    other = connect(kernel_home, timeout=T)
    assert row(k, other.pid).state is ProcState.SLEEPING
    other.exit()
    with pytest.raises(KernelDead):
        other.ping()                              # exit() closed the connection
    until(lambda: row(k, other.pid) is None, f"pid {other.pid} to leave ps", timeout=10)


def test_closing_an_attached_program_leaves_ps(kernel_home, k):
    other = connect(kernel_home, timeout=T)
    other.close()
    until(lambda: row(k, other.pid) is None, f"pid {other.pid} to leave ps", timeout=10)


# ---- generate ------------------------------------------------------------------------------

def test_generate_returns_a_completion(k):
    done = k.generate("12+47=", max_tokens=8)
    prompt = k.tokenize("12+47=")
    assert isinstance(done, Completion) and isinstance(done.usage, Usage)
    assert (done.text, done.finish_reason) == ("59", "stop")
    assert done.token_ids[:2] == k.tokenize("59")[1:] and k.detokenize(done.token_ids) == "59"
    assert done.usage == Usage(prompt_tokens=len(prompt), cached_tokens=0,
                               completion_tokens=len(done.token_ids))
    assert done.usage.computed_tokens == len(prompt)
    assert k.generate("reverse c a t =", max_tokens=8).text == " t a c"


def test_max_tokens_ends_with_length(k):
    cut = k.generate("reverse c a t =", max_tokens=2)
    assert (cut.text, cut.finish_reason, cut.usage.completion_tokens) == (" t a", "length", 2)
    none = k.generate("reverse c a t =", max_tokens=0)
    assert (none.text, none.token_ids, none.finish_reason) == ("", [], "length")


def test_a_stop_string_ends_the_text_before_it(k):
    for stop in (" a", ("x", " a")):
        done = k.generate("reverse c a t =", max_tokens=8, stop=stop)
        assert (done.text, done.finish_reason) == (" t", "stop")


def test_stop_token_ids_end_on_that_token(k):
    first = k.generate("12+47=", max_tokens=8).token_ids[0]
    done = k.generate("12+47=", max_tokens=8, stop_token_ids=[first])
    assert (done.token_ids, done.finish_reason, done.text) == ([first], "stop", "5")


def test_ignore_eos_runs_to_max_tokens(k):
    done = k.generate("12+47=", max_tokens=6, ignore_eos=True)
    assert done.finish_reason == "length" and done.usage.completion_tokens == 6
    assert done.text.startswith("59")


def test_a_seed_makes_sampling_reproducible(k):
    runs = [k.generate("hello world", max_tokens=8, temperature=1.0, seed=seed)
            for seed in (4, 4, 0, 1, 2)]
    assert runs[0] == runs[1]
    assert len({tuple(r.token_ids) for r in runs}) > 1       # the seed is what varies them
    greedy = k.generate("hello world", max_tokens=8)
    assert k.generate("hello world", max_tokens=8, temperature=0.0, seed=4) == greedy
    assert k.generate("hello world", max_tokens=8, temperature=1.0, top_k=1,
                      seed=4).token_ids == greedy.token_ids
    assert k.generate("12+47=", max_tokens=8, temperature=1.0, top_p=0.5, min_p=0.1,
                      seed=1).text == "59"


@pytest.mark.parametrize("options, named", [
    (dict(top_p=0), "top_p"), (dict(max_tokens=-1), "max_tokens"),
    (dict(temperature=-1), "temperature"), (dict(top_k=-1), "top_k"),
    (dict(min_p=2), "min_p"), (dict(stop=[""]), "stop[0]"),
    (dict(stop_token_ids=[-1]), "stop_token_ids[0]"),
    (dict(stop_token_ids=[5000]), "stop_token_ids"), (dict(seed="x"), "seed"),
    (dict(max_tokens=600), "max_tokens"), (dict(ignore_eos="yes"), "ignore_eos"),
])
def test_a_bad_option_is_einval_naming_it(k, options, named):
    with pytest.raises(SyscallError) as e:
        k.generate("12+47=", **options)
    assert e.value.code == "EINVAL" and named in str(e.value)


@pytest.mark.parametrize("args, named", [
    (dict(), "prompt, messages, token_ids"),
    (dict(prompt="x", messages=CHAT), "'prompt' and 'messages'"),
    (dict(messages=[]), "messages"),
    (dict(messages=[{"role": "bogus", "content": "x"}]), "messages[0].role"),
    (dict(token_ids=[]), "prompt"),
    (dict(token_ids=[5000]), "token ids"),
])
def test_a_bad_prompt_is_einval_naming_it(k, args, named):
    with pytest.raises(SyscallError) as e:
        k.generate(**args, max_tokens=2)
    assert e.value.code == "EINVAL" and named in str(e.value)


def test_an_unknown_keyword_is_a_type_error_before_any_call(k):
    with pytest.raises(TypeError, match="max_token"):
        k.generate("12+47=", max_token=4)
    with k.context() as ctx, pytest.raises(TypeError, match="stream_"):
        ctx.generate("12+47=", stream_=True)


def test_unset_options_are_left_to_the_kernel():
    assert _generate_args("x", None, None, {"max_tokens": 4, "temperature": None, "stop": "\n",
                                            "seed": 0}) == {
        "prompt": "x", "max_tokens": 4, "stop": ["\n"], "seed": 0}
    assert _generate_args(None, None, (1, 2), {}) == {"token_ids": [1, 2]}


def test_token_ids_and_messages_are_prompts_too(k):
    ids = k.tokenize("12+47=")
    assert k.generate(token_ids=ids, max_tokens=8).text == "59"
    assert k.generate(token_ids=tuple(ids), max_tokens=8).text == "59"
    chat = k.generate(messages=CHAT, max_tokens=8)
    assert (chat.text, chat.finish_reason) == ("59", "stop")
    assert chat.usage.prompt_tokens > len(k.tokenize("add 12 47"))     # the template's tokens


def test_too_many_stops_are_e2big(k):
    with pytest.raises(SyscallError) as e:
        k.generate("12+47=", stop=[str(i) for i in range(17)])
    assert e.value.code == "E2BIG" and "stop" in str(e.value)


def test_a_text_over_the_cap_is_e2big_before_tokenizing(k):
    cap = k.models()[0].max_len * 32                 # tunables.CHARS_PER_TOKEN
    assert cap == 16384
    for call in (lambda: k.generate("a" * (cap + 1), max_tokens=1),
                 lambda: k.generate(messages=[{"role": "user", "content": "a" * (cap // 2)},
                                              {"role": "user", "content": "a" * (cap // 2 + 1)}]),
                 lambda: k.tokenize("a" * (cap + 1))):
        with pytest.raises(SyscallError) as e:
            call()
        assert e.value.code == "E2BIG" and str(cap) in str(e.value)


def test_model_names_the_loaded_model(k):
    assert k.generate("12+47=", max_tokens=8, model="tiny").text == "59"
    with pytest.raises(SyscallError) as e:
        k.generate("12+47=", max_tokens=8, model="other")
    assert e.value.code == "ENOENT" and "'other'" in str(e.value) and "tiny" in str(e.value)


# ---- streaming -----------------------------------------------------------------------------

def test_streaming_yields_deltas_then_sets_the_completion(k):
    stream = k.generate("reverse l l m o s =", max_tokens=16, stream=True)
    assert stream.completion is None
    deltas = list(stream)
    assert deltas and all(isinstance(d, Delta) for d in deltas)
    assert "".join(d.text for d in deltas) == stream.completion.text == " s o m l l"
    assert sum((d.token_ids for d in deltas), []) == stream.completion.token_ids
    assert stream.completion == k.generate("reverse l l m o s =", max_tokens=16)
    assert k.generate("12+47=", max_tokens=8, stream=True).result().text == "59"
    with k.generate(messages=CHAT, max_tokens=8, stream=True) as chat:
        assert chat.result().text == "59"


def _abandon(k, how: str) -> None:
    """Start a long streaming generate, take one delta, then abandon it `how`."""
    if how == "close":
        stream = k.generate("12+47=", stream=True, **LONG)
        assert next(stream).token_ids
        stream.close()
    elif how == "with":
        with k.generate("12+47=", stream=True, **LONG) as stream:
            assert next(stream).token_ids
    else:                                        # dropped: the last reference goes
        stream = k.generate("12+47=", stream=True, **LONG)
        assert next(stream).token_ids
        del stream
        gc.collect()


@pytest.mark.parametrize("how", ["close", "with", "drop"])
def test_abandoning_a_stream_cancels_the_generate(k, how):
    _abandon(k, how)
    done = until(lambda: settled(k, k.pid), "the cancelled generate to release its KV")
    assert done.calls == 0 and done.kv_blocks == 0
    assert tokens_out_stable(k, k.pid) < LONG["max_tokens"]
    assert k.generate("12+47=", max_tokens=8).text == "59"      # the connection is still good


def test_a_call_past_its_deadline_times_out_and_is_cancelled(kernel_home, k):
    with connect(kernel_home, timeout=0.5) as hasty:
        with pytest.raises(CallTimeout) as e:
            hasty.generate("12+47=", **LONG)
        assert e.value.code == "ETIMEDOUT"
        until(lambda: settled(k, hasty.pid), "the timed-out generate to be cancelled")


ANSWERS = {"12+47=": "59", "38+57=": "95", "64+89=": "153", "reverse c a t =": " t a c"}


def test_one_kernel_is_shared_by_threads(k):
    errors, answers = [], []

    def work(prompt):
        try:
            answers.append((prompt, k.generate(prompt, max_tokens=8).text))
            answers.append((prompt, k.generate(prompt, max_tokens=8, stream=True).result().text))
        except Exception as e:
            errors.append(e)
    threads = [threading.Thread(target=work, args=(p,)) for p in ANSWERS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(T)
    assert not any(t.is_alive() for t in threads) and not errors
    assert sorted(answers) == sorted([(p, a) for p, a in ANSWERS.items()] * 2)


# ---- contexts ------------------------------------------------------------------------------

def test_a_context_computes_only_new_tokens(k):
    with k.context(system="You are tiny.") as ctx:
        start = ctx.info()
        assert isinstance(start, ContextInfo) and start.id == ctx.id
        assert start.tokens > 0 and not start.busy
        first = ctx.generate(messages=CHAT, max_tokens=8)
        after_first = ctx.info()
        assert first.text == "59"
        assert after_first.tokens == first.usage.prompt_tokens + first.usage.completion_tokens
        second = ctx.generate(messages=[{"role": "user", "content": "reverse c a t"}], max_tokens=8)
        assert second.text.strip() == "t a c"
        assert second.usage.cached_tokens == after_first.computed > 0
        new = second.usage.prompt_tokens - after_first.tokens
        assert 0 < second.usage.computed_tokens <= new + 1      # + the reply's last token
        assert ctx.info().tokens == second.usage.prompt_tokens + second.usage.completion_tokens
        assert row(k, k.pid).contexts == 1


def test_a_context_may_start_with_messages(k):
    system = [{"role": "system", "content": "You are tiny."}]
    with k.context(system="You are tiny.") as a, k.context(messages=system) as b:
        assert a.info().tokens == b.info().tokens > 0
        first, second = (c.generate(messages=CHAT, max_tokens=8) for c in (a, b))
        assert (first.text, first.token_ids) == (second.text, second.token_ids)
        assert second.usage.cached_tokens >= 16      # b's prompt was cached by a's call
    with k.context() as empty:
        assert empty.info().tokens == 0
        assert empty.generate("12+47=", max_tokens=8).text == "59"
    with pytest.raises(SyscallError) as e:
        k.context(system="x", messages=system)
    assert e.value.code == "EINVAL"


def test_append_adds_tokens_without_generating(k):
    with k.context(system="You are tiny.") as ctx:
        before = ctx.info().tokens
        done = ctx.append("more")
        assert (done.text, done.token_ids, done.usage.completion_tokens) == ("", [], 0)
        assert ctx.info().tokens == before + len(k.tokenize("more"))
        ctx.append(token_ids=[22, 23])
        assert ctx.info().tokens == before + len(k.tokenize("more")) + 2
        grown = ctx.info().tokens
        ctx.append(CHAT)                                     # a list is messages
        assert ctx.info().tokens > grown


def test_a_fork_continues_like_its_parent(k):
    with k.context(system="You are tiny.") as parent:
        parent.generate(messages=CHAT, max_tokens=8)
        with parent.fork() as child:
            assert child.id != parent.id
            assert child.info().tokens == parent.info().tokens
            turn = [{"role": "user", "content": "reverse c a t"}]
            theirs = child.generate(messages=turn, max_tokens=8)
            assert theirs.usage.cached_tokens > 0                # it shares the parent's KV
            assert parent.generate(messages=turn, max_tokens=8) == theirs
            assert row(k, k.pid).contexts == 2
        assert child.closed and parent.info().tokens > 0         # the parent lives on


def test_a_freed_context_is_esrch(k):
    ctx = k.context(system="You are tiny.")
    ctx.generate("12+47=", max_tokens=8)
    ctx.close()
    ctx.close()                                                  # idempotent
    for call in (ctx.info, ctx.fork, lambda: ctx.generate("12+47=", max_tokens=8)):
        with pytest.raises(SyscallError) as e:
            call()
        assert e.value.code == "ESRCH"
    with k.context() as scoped:
        scoped.generate("12+47=", max_tokens=8)
    assert scoped.closed
    with pytest.raises(SyscallError) as e:
        scoped.info()
    assert e.value.code == "ESRCH"
    assert until(lambda: settled(k, k.pid), "the freed contexts' KV").contexts == 0


def test_a_context_is_its_process_own(kernel_home, k):
    with k.context(system="You are tiny.") as ctx, connect(kernel_home, timeout=T) as other:
        theirs = Context(other, ctx.id)
        with pytest.raises(SyscallError) as e:
            theirs.info()
        assert e.value.code == "ESRCH"


def test_a_busy_context_is_ebusy(k):
    with k.context(system="You are tiny.") as ctx:
        stream = ctx.generate("12+47=", stream=True, **LONG)
        assert next(stream).token_ids and ctx.info().busy
        for call in (lambda: ctx.generate("12+47=", max_tokens=2), ctx.fork,
                     lambda: ctx.append("x")):
            with pytest.raises(SyscallError) as e:
                call()
            assert e.value.code == "EBUSY"
        stream.close()
        until(lambda: not ctx.info().busy, "the cancelled generate to leave the context")
        assert ctx.generate("12+47=", max_tokens=8).finish_reason in ("stop", "length")


def test_closing_a_busy_context_cancels_its_generate(k):
    ctx = k.context(system="You are tiny.")
    stream = ctx.generate("12+47=", stream=True, **LONG)
    assert next(stream).token_ids
    ctx.close()
    for _ in stream:                                             # what was on its way
        pass
    assert stream.completion.finish_reason == "abort"
    assert until(lambda: settled(k, k.pid), "the freed context's KV").contexts == 0


# ---- processes -----------------------------------------------------------------------------

CHILD = """
    import json, os, sys
    from llmos.userland import connect
    with connect() as k:
        print(json.dumps({"pid": k.pid, "ppid": k.ppid, "getpid": k.getpid(), "owner": k.owner,
                          "argv": sys.argv[1:], "foo": os.environ.get("FOO"),
                          "log": str(k.log_path(k.pid)),
                          "answer": k.generate("12+47=", max_tokens=8).text}), flush=True)
    sys.exit(3)
"""


def test_spawn_runs_a_child_that_connects_as_itself(k):
    pid = agent(k, CHILD, "a", "b c", name="child", nice=5, env={"FOO": "bar"})
    child = row(k, pid)
    assert (child.ppid, child.name, child.nice) == (k.pid, "child", 5) and child.os_pid > 0
    assert k.wait(pid, timeout=T) == 3
    assert report(k, pid) == {"pid": pid, "ppid": k.pid, "getpid": pid, "owner": False,
                              "argv": ["a", "b c"], "foo": "bar", "log": str(k.log_path(pid)),
                              "answer": "59"}
    assert row(k, pid) is None                                  # collected by the wait
    assert k.wait(k.spawn("true"), timeout=T) == 0              # a str is one program


@pytest.mark.parametrize("argv, code", [(["/nonexistent/program"], "ENOENT"), ([], "EINVAL")])
def test_spawn_errors(k, argv, code):
    with pytest.raises(SyscallError) as e:
        k.spawn(argv)
    assert e.value.code == code


def test_wait_with_a_timeout(k):
    pid = k.spawn(["sleep", "60"])
    assert k.wait(pid, timeout=0.1) is None
    status = k.wait_status(pid, timeout=0.1)
    assert status == WaitStatus(pid=pid, exited=False, status=None)
    k.kill(pid, "KILL")
    assert k.wait_status(pid, timeout=T) == WaitStatus(pid=pid, exited=True, status=-signal.SIGKILL)
    with pytest.raises(SyscallError) as e:
        k.wait(pid, timeout=T)                                  # collected already
    assert e.value.code == "ESRCH"


@pytest.mark.parametrize("sig, num", [("TERM", signal.SIGTERM), ("SIGINT", signal.SIGINT),
                                      (int(signal.SIGKILL), signal.SIGKILL)])
def test_kill_ends_a_child_with_its_signal(k, sig, num):
    pid = k.spawn(["sleep", "60"])
    k.kill(pid, sig)
    assert k.wait(pid, timeout=T) == -num


def test_kill_and_wait_errors(k):
    for call, code in ((lambda: k.kill(999999), "ESRCH"), (lambda: k.wait(999999), "ESRCH"),
                       (lambda: k.kill(k.pid, "BOGUS"), "EINVAL"),
                       (lambda: k.wait(k.pid), "EINVAL"), (lambda: k.nice(20), "EINVAL")):
        with pytest.raises(SyscallError) as e:
            call()
        assert e.value.code == code


GENERATING = """
    from llmos.userland import connect
    k = connect()
    while True:
        k.generate("12+47=", max_tokens=400, ignore_eos=True)
"""


def test_ps_shows_an_agent_running_while_it_generates_and_kill_cancels_its_work(k):
    pid = agent(k, GENERATING, name="busy")
    seen = until(lambda: (r := row(k, pid)) and r.state is ProcState.RUNNING and r, "running")
    assert seen.calls == 1 and seen.name == "busy" and seen.ppid == k.pid
    assert row(k, k.pid).state is ProcState.SLEEPING             # the owner has no LLM work
    k.kill(pid, "TERM")
    assert k.wait(pid, timeout=T) == -signal.SIGTERM
    until(lambda: pid not in k.meminfo().procs, "the killed agent's KV to be freed")


STREAMER = """
    import signal
    from llmos.userland import connect
    k = connect()
    stream = k.generate("12+47=", max_tokens=40, ignore_eos=True, stream=True)
    next(stream)
    # Stop ourselves while our generate runs: the owner's STOP could come too late on a
    # fast machine, when the 40 tokens are done.
    k.kill(k.pid, "STOP")
    done = stream.result()
    print("DONE", done.finish_reason, done.usage.completion_tokens, flush=True)
"""


def test_stop_pauses_a_streaming_agent_and_cont_resumes_it(k):
    pid = agent(k, STREAMER)
    until(lambda: row(k, pid).state is ProcState.STOPPED, "the agent to be stopped")
    held = tokens_out_stable(k, pid)
    assert 0 < held < 40 and row(k, pid).calls == 1
    time.sleep(0.5)
    assert (row(k, pid).state, row(k, pid).tokens_out) == (ProcState.STOPPED, held)
    k.kill(pid, "CONT")
    assert k.wait(pid, timeout=T) == 0, output(k, pid)
    assert "DONE length 40" in output(k, pid)


NICE = """
    import json, sys
    from llmos.userland import connect
    sibling = int(sys.argv[1])
    k = connect()
    k.nice(3)
    child = k.spawn(["sleep", "60"])
    k.nice(4, child)
    rows = {p.pid: p.nice for p in k.ps()}
    errors = {}
    for name, call in (("nice", lambda: k.nice(1, sibling)), ("kill", lambda: k.kill(sibling)),
                       ("wait", lambda: k.wait(sibling, timeout=1))):
        try:
            call()
        except Exception as e:
            errors[name] = getattr(e, "code", repr(e))
    k.kill(child, "KILL")
    print(json.dumps({"me": rows[k.pid], "child": rows[child], "errors": errors,
                      "status": k.wait(child, timeout=30)}), flush=True)
"""


def test_nice_on_self_and_children_but_not_a_sibling(k):
    k.nice(5)
    assert row(k, k.pid).nice == 5
    sibling = k.spawn(["sleep", "60"])
    k.nice(-3, sibling)
    assert row(k, sibling).nice == -3
    pid = agent(k, NICE, sibling)
    assert k.wait(pid, timeout=T) == 0, output(k, pid)
    assert report(k, pid) == {"me": 3, "child": 4, "status": -signal.SIGKILL,
                              "errors": {"nice": "EPERM", "kill": "EPERM", "wait": "EPERM"}}
    k.kill(sibling, "KILL")
    assert k.wait(sibling, timeout=T) == -signal.SIGKILL


ORPHANING = """
    import sys
    from llmos.userland import connect
    # The grandchild waits until it is an orphan (its ppid is 0), then exits 7.
    GRANDCHILD = '''
    import sys, time
    from llmos.userland import connect
    k = connect()
    deadline = time.monotonic() + 60
    while next(p for p in k.ps() if p.pid == k.pid).ppid != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    sys.exit(7)
    '''
    with connect() as k:
        print("CHILD", k.spawn([sys.executable, "-c", GRANDCHILD]), flush=True)
"""


def test_the_owner_may_wait_for_an_orphan(k):
    pid = agent(k, ORPHANING)
    assert k.wait(pid, timeout=T) == 0, output(k, pid)
    child = int(output(k, pid).split("CHILD")[1].split()[0])
    assert k.wait(child, timeout=T) == 7
    assert row(k, child) is None


TWO_CONNECTIONS = """
    import sys
    from llmos.userland import connect
    a, b = connect(), connect()
    assert a.pid == b.pid
    long = a.generate("12+47=", max_tokens=400, ignore_eos=True, stream=True)
    short = b.generate("12+47=", max_tokens=40, ignore_eos=True, stream=True)
    next(long), next(short)        # both in flight, each its connection's call 2
    long.close()
    done = short.result()
    print("SHORT", done.finish_reason, done.usage.completion_tokens, flush=True)
    sys.exit(0 if (done.finish_reason, done.usage.completion_tokens) == ("length", 40) else 1)
"""


def test_cancelling_on_one_connection_leaves_the_other_alone(k):
    pid = agent(k, TWO_CONNECTIONS)
    assert k.wait(pid, timeout=T) == 0, output(k, pid)
    assert "SHORT length 40" in output(k, pid)


EXIT = """
    import sys
    from llmos.userland import connect
    k = connect()
    k.exit(3)
    sys.exit(3)
"""


def test_exit_of_a_spawned_agent_reports_its_status(k):
    pid = agent(k, EXIT)
    assert k.wait(pid, timeout=T) == 3, output(k, pid)
    assert "Traceback" not in output(k, pid)


# ---- the system ----------------------------------------------------------------------------

def test_meminfo_counts_kv_blocks_per_pid(k):
    mem = k.meminfo()
    assert isinstance(mem, MemInfo) and mem.kv.block_size == 16 and mem.kv.total > 0
    assert 0 <= mem.kv.used <= mem.kv.total and mem.kv.used + mem.kv.free <= mem.kv.total
    assert mem.kv.cached <= mem.kv.free and mem.kv.swap_free <= mem.kv.swap_total
    with k.context(system="You are tiny.") as ctx:
        ctx.generate(messages=CHAT, max_tokens=8)
        held = ctx.info().blocks
        assert held > 0
        mem = until(lambda: (m := k.meminfo()).procs.get(k.pid) and m, "the context's blocks")
        assert mem.procs[k.pid].resident == held == row(k, k.pid).kv_blocks
        assert mem.kv.used >= held
    until(lambda: k.meminfo().procs.get(k.pid, 0) == 0, "the freed context's blocks")


def test_ps_shows_what_the_scheduler_accounted(k):
    done = k.generate("12+47=", max_tokens=8)
    made = done.usage.completion_tokens
    me = until(lambda: (r := row(k, k.pid)).tokens_out >= made and r, "the counters")
    assert me.service == me.tokens_in + me.tokens_out and me.tokens_in > 0
    assert me.running_s > 0 and me.queued_s >= 0
    assert (me.kv_swapped, me.kv_disk, me.preemptions, me.swaps) == (0, 0, 0, 0)


def test_sysinfo_names_the_driver_in_use(k):
    before = k.sysinfo()
    assert isinstance(before, SysInfo)
    assert (before.version, before.driver, before.device, before.model) == (1, "cpu", "cpu", "tiny")
    assert before.release and before.procs >= 1 and before.uptime > 0
    done = k.generate("12+47=", max_tokens=8)
    # The counters are the engine's last published snapshot: they catch up, maybe not at once.
    target = before.generated_tokens + done.usage.completion_tokens
    after = until(lambda: (s := k.sysinfo()).generated_tokens >= target and s, "the counters")
    assert after.steps > before.steps and after.computed_tokens > before.computed_tokens
    assert after.uptime > before.uptime


def test_models_lists_tiny(k):
    [model] = k.models()
    assert isinstance(model, ModelInfo)
    assert (model.name, model.model_type, model.max_len) == ("tiny", "llama", 512)
    assert Path(model.path).is_dir() and model.vocab > max(k.tokenize("reverse c a t ="))
    assert model.layers > 0 and model.heads % model.kv_heads == 0 and model.dtype == "float32"


def test_syscalls_cover_every_number(k):
    table = {s.nr: s for s in k.syscalls()}
    assert sorted(table) == sorted(int(n) for n in Sys)
    assert all(table[n].name == n.name.lower() and table[n].implemented for n in Sys)
    generate = table[Sys.GENERATE]
    assert set(_OPTIONS) <= set(generate.args)
    assert generate.one_of == [["prompt", "messages", "token_ids"]]
    assert table[Sys.SPAWN].args["argv"]["required"] is True


def test_tokenize_round_trips(k):
    for text in ("hello", "12+47=", "reverse c a t =", "a b\nc"):
        ids = k.tokenize(text)
        assert ids and all(isinstance(i, int) for i in ids)
        assert k.detokenize(ids) == text


def test_detokenize_refuses_ids_outside_the_vocabulary(k):
    with pytest.raises(SyscallError) as e:
        k.detokenize([k.models()[0].vocab])
    assert e.value.code == "EINVAL"


def test_a_killed_kernel_becomes_kernel_dead(own_kernel):
    home, proc = own_kernel
    k = connect(home, timeout=T)
    failed = []

    def blocked():
        try:
            k.generate("12+47=", **LONG)
        except Exception as e:
            failed.append(e)
    waiting = threading.Thread(target=blocked)
    waiting.start()
    stream = k.generate("12+47=", stream=True, **LONG)
    assert next(stream).token_ids                      # the kernel is generating now
    proc.send_signal(signal.SIGKILL)
    proc.wait(T)
    with pytest.raises(KernelDead):
        list(stream)
    waiting.join(T)
    assert not waiting.is_alive() and len(failed) == 1 and isinstance(failed[0], KernelDead)
    with pytest.raises(KernelDead):
        k.ping()                                       # later calls fail at once
    k.close()
    with pytest.raises(KernelNotRunning):              # its lock died with it
        connect(home)


# ---- example agents ------------------------------------------------------------------------

def example(k, name: str, *args) -> str:
    """Run llmos.userland.examples.<name> as a spawned agent; its output (it must exit 0)."""
    pid = k.spawn([sys.executable, "-m", f"llmos.userland.examples.{name}", *args], name=name)
    assert k.wait(pid, timeout=T) == 0, output(k, pid)
    return output(k, pid)


def test_example_hello(k):
    out = example(k, "hello")
    assert out.startswith("pid ") and ": 12+47=59  [stop," in out
    assert ": 38+57=95  [" in example(k, "hello", "38+57=")


def test_example_chat(k):
    out = example(k, "chat")
    assert "tiny: 59" in out and "tiny: t a c" in out and "tokens" in out
    second = out.split("user: reverse c a t")[1]
    assert int(second.split(" cached")[0].split(", ")[-1]) > 0


def test_example_parallel(k):
    out = example(k, "parallel", "-n", "3")
    assert "3 workers in" in out
    for task, answer in (("12+47=", "59"), ("38+57=", "95"), ("64+89=", "153")):
        assert any(task in ln and f"-> {answer} " in ln and ln.endswith("status 0")
                   for ln in out.splitlines()), out


def test_stream_cancel_from_another_thread_wakes_the_reader_and_frees_the_context(k):
    """Stream.cancel() from another thread: the thread blocked in next() gets ECANCELED at
    once, even before the first token (the request throttled here), and the context is
    free for the next turn (the shell's Ctrl-C on a chat answer)."""
    k.setrlimit(k.pid, tokens_per_s=1)
    try:
        with k.context() as ctx:
            s = ctx.generate("12+47=", stream=True, max_tokens=50, ignore_eos=True)
            got = []

            def read():
                try:
                    for _ in s:
                        pass
                except SyscallError as e:
                    got.append(e.code)
            reader = threading.Thread(target=read)
            reader.start()
            until(lambda: any(p.pid == k.pid and p.calls for p in k.ps()), "the call runs", T)
            s.cancel()
            reader.join(T)
            assert not reader.is_alive() and got == ["ECANCELED"]
            k.setrlimit(k.pid, tokens_per_s="unlimited")
            assert ctx.generate("12+47=", max_tokens=4).finish_reason in ("stop", "length")
    finally:
        k.setrlimit(k.pid, tokens_per_s="unlimited")


def test_a_call_to_a_kernel_started_anew_is_kernel_dead_not_eacces(own_kernel):
    """zmq takes an idle connection to a kernel started again on the same home; that
    kernel does not know it ("say hello first", EACCES). The SDK says what happened:
    KernelDead, so a caller knows to connect() again."""
    from tests.kernels import start_kernel, stop_kernel
    home, proc = own_kernel
    k = connect(home, timeout=T)
    try:
        k.ps()
        stop_kernel(proc)
        again = start_kernel(home)
        try:
            with pytest.raises(KernelDead):
                k.ps()
            assert not k.alive
            with connect(home, timeout=T) as fresh:
                assert fresh.ps()
        finally:
            stop_kernel(again)
    finally:
        k.close()
