"""Per-process limits (kernel/limits.py) and the scheduling policy switch: the rules on a
process table in-process, then one real kernel on tiny (shared by the module) through the
SDK, with agents that are real spawned processes reporting JSON on stdout.

Each limit test shows the refusal names the limit and that another process goes on.
Every wait is bounded by T.
"""
from __future__ import annotations

import json
import signal
import sys
import textwrap

import pytest

from llmos.kernel import limits
from llmos.kernel.proc import ProcTable
from llmos.syscalls.errors import EAGAIN, EPERM, SyscallError
from llmos.syscalls.home import Home
from llmos.syscalls.types import Limits
from llmos.userland import connect
from tests.kernels import running_kernel

T = 60                  # seconds: the bound on every wait here
LONG = dict(max_tokens=400, ignore_eos=True)    # a generate that runs for a while


pytestmark = pytest.mark.usefixtures("no_agent_env")


# ---- the rules, in-process -------------------------------------------------------------

def test_a_change_lowers_for_anyone_and_raises_for_the_owner_only():
    old = Limits(calls=8, contexts=4, tokens_per_s=None)
    assert limits.change(old, {"calls": 2, "tokens_per_s": 5.0}, False, "x") == \
        Limits(calls=2, contexts=4, tokens_per_s=5.0)
    for wanted, name in (({"calls": 9}, "calls"), ({"contexts": None}, "contexts")):
        with pytest.raises(SyscallError) as e:
            limits.change(old, wanted, False, "setrlimit")
        assert e.value.code == EPERM and e.value.msg.startswith(f"setrlimit: {name} ")
        assert "only the owner may raise a limit" in e.value.msg
        assert limits.change(old, wanted, True, "setrlimit") == Limits(**{**vars(old), **wanted})
    assert limits.asked({"calls": 3, "contexts": "unlimited", "children": None}) == \
        {"calls": 3, "contexts": None}


def test_defaults_are_a_share_of_the_pool_and_overridable():
    d = limits.defaults(1000)
    assert (d.calls, d.kv_blocks, d.contexts, d.children, d.tokens_per_s) == (512, 750, 256, 64, None)
    assert limits.defaults(1000, {"calls": 7, "kv_blocks": None}) == Limits(
        calls=7, kv_blocks=None, contexts=256, children=64, tokens_per_s=None)


def test_a_child_inherits_its_parents_limits_lowered_by_spawns_ask():
    table = ProcTable(default_limits=Limits(calls=10, contexts=5, children=2))
    top = table.attach("shell")                       # no parent: the defaults
    assert top.acct.limits == Limits(calls=10, contexts=5, children=2)
    child = table.alloc("child", ["child"], parent=top.pid, asked={"calls": 4})
    grandchild = table.alloc("grandchild", ["g"], parent=child.pid, asked={"contexts": 1})
    assert child.acct.limits == Limits(calls=4, contexts=5, children=2)
    assert grandchild.acct.limits == Limits(calls=4, contexts=1, children=2)
    with pytest.raises(SyscallError) as e:              # an agent cannot ask for more...
        table.alloc("greedy", ["g"], parent=child.pid, asked={"calls": 5})
    assert e.value.code == EPERM and "spawn: calls 5 is above" in e.value.msg
    roomy = table.alloc("roomy", ["r"], parent=child.pid, asked={"calls": None}, by_owner=True)
    assert roomy.acct.limits.calls is None              # ...the owner can
    with pytest.raises(SyscallError) as e:              # child has 2 live children: its limit
        table.alloc("third", ["t"], parent=child.pid)
    assert e.value.code == EAGAIN and e.value.msg.startswith("children limit (2) reached")


def test_setrlimit_on_self_and_descendants_raising_by_the_owner_only():
    table = ProcTable(default_limits=Limits(calls=10))
    top = table.attach("shell")
    a = table.alloc("a", ["a"], parent=top.pid)
    a_child = table.alloc("a1", ["a1"], parent=a.pid)
    b = table.alloc("b", ["b"], parent=top.pid)
    assert table.setrlimit(a_child.pid, {"calls": 3}, a.pid, False).calls == 3
    assert table.getrlimit(a_child.pid, a.pid, False).calls == 3
    assert a.acct.limits.calls == 10                    # a parent keeps its own
    for act in (lambda: table.setrlimit(b.pid, {"calls": 1}, a.pid, False),
                lambda: table.getrlimit(b.pid, a.pid, False),
                lambda: table.getrlimit(top.pid, a.pid, False),
                lambda: table.setrlimit(a_child.pid, {"calls": 4}, a.pid, False)):
        with pytest.raises(SyscallError) as e:
            act()
        assert e.value.code == EPERM
    assert table.setrlimit(a_child.pid, {"calls": 40}, top.pid, True).calls == 40


# ---- a real kernel ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def home():
    with running_kernel() as (path, _):
        yield path


@pytest.fixture
def k(home):
    with connect(home, timeout=T) as kernel:
        yield kernel


def refused(call, code: str) -> str:
    """Run call(); it must raise SyscallError code. Returns the message."""
    with pytest.raises(SyscallError) as e:
        call()
    assert e.value.code == code, e.value
    return e.value.msg


def test_a_process_without_a_parent_gets_the_kernel_defaults(k):
    pool = k.meminfo().kv.total
    assert k.getrlimit() == Limits(calls=512, kv_blocks=int(pool * 0.75), contexts=256,
                                   children=64, tokens_per_s=None)


def test_the_calls_limit_refuses_a_generate_but_never_kill_cancel_or_exit(k, home):
    sleeper = k.spawn(["sleep", "60"])
    assert k.setrlimit(calls=1).calls == 1              # lowering its own: anyone may
    stream = k.generate("12+47=", stream=True, **LONG)
    assert next(stream).token_ids                       # in flight: at the limit
    msg = refused(lambda: k.generate("12+47=", max_tokens=4), "EAGAIN")
    assert msg.startswith("calls limit (1) reached") and f"process {k.pid}" in msg
    with connect(home, timeout=T) as other:             # another process is not limited
        assert other.generate("12+47=", max_tokens=8).text == "59"
    k.kill(sleeper, "KILL")                             # at the limit: still accepted
    stream.close()                                      # CANCEL: still accepted
    assert stream.completion is None or stream.completion.finish_reason == "abort"
    assert k.generate("12+47=", max_tokens=8).text == "59"   # room again
    assert k.wait(sleeper, timeout=T) == -signal.SIGKILL
    k.setrlimit(calls=None)                             # the owner may lift it again
    assert k.getrlimit().calls is None


def test_the_contexts_limit_is_enomem_naming_it(k, home):
    k.setrlimit(contexts=2)
    first, second = k.context(), k.context(system="You are tiny.")
    msg = refused(lambda: k.context(), "ENOMEM")
    assert msg.startswith("contexts limit (2) reached") and "2 contexts open" in msg
    assert refused(first.fork, "ENOMEM").startswith("contexts limit (2)")
    with connect(home, timeout=T) as other:
        with other.context() as ctx:
            assert ctx.generate(messages=[{"role": "user", "content": "add 12 47"}],
                                max_tokens=8).text == "59"
    second.close()
    with first.fork():                                  # room again
        pass
    first.close()


def test_the_children_limit_is_eagain_naming_it(k, home):
    k.setrlimit(children=1)
    child = k.spawn(["sleep", "60"])
    msg = refused(lambda: k.spawn(["sleep", "60"]), "EAGAIN")
    assert msg.startswith("children limit (1) reached") and "1 live children" in msg
    with connect(home, timeout=T) as other:
        theirs = other.spawn(["sleep", "60"])
        other.kill(theirs, "KILL")
        assert other.wait(theirs, timeout=T) == -signal.SIGKILL
    k.kill(child, "KILL")
    assert k.wait(child, timeout=T) == -signal.SIGKILL
    again = k.spawn(["true"])                           # a dead child counts no more
    assert k.wait(again, timeout=T) == 0


INHERITING = """
    import json, sys
    from llmos.userland import connect
    sibling = int(sys.argv[1])
    k = connect()
    me = k.getrlimit()
    child = k.spawn(["sleep", "60"], limits={"calls": 2})
    inherited = k.getrlimit(child)
    lowered = k.setrlimit(child, contexts=1)
    errors = {}
    for name, call in (("raise", lambda: k.setrlimit(calls=10)),
                       ("lift", lambda: k.setrlimit(contexts=None)),
                       ("spawn", lambda: k.spawn(["true"], limits={"calls": 6})),
                       ("set_sibling", lambda: k.setrlimit(sibling, calls=1)),
                       ("get_sibling", lambda: k.getrlimit(sibling)),
                       ("get_parent", lambda: k.getrlimit(k.ppid)),
                       ("sched", lambda: k.sched("fifo"))):
        try:
            call()
            errors[name] = "accepted"
        except Exception as e:
            errors[name] = [getattr(e, "code", repr(e)), getattr(e, "msg", "")]
    print(json.dumps({"me": [me.calls, me.contexts, me.children], "child": child,
                      "inherited": [inherited.calls, inherited.contexts],
                      "lowered": lowered.contexts, "sched": k.sched().policies,
                      "errors": errors}), flush=True)
"""


def test_limits_are_inherited_lowered_by_the_tree_and_raised_by_the_owner_only(k):
    sibling = k.spawn(["sleep", "60"])
    pid = k.spawn([sys.executable, "-c", textwrap.dedent(INHERITING), str(sibling)],
                  limits={"calls": 5, "contexts": 3})
    assert k.wait(pid, timeout=T) == 0, k.log_path(pid).read_text()
    out = json.loads(k.log_path(pid).read_text().splitlines()[-1])
    assert out["me"] == [5, 3, 64]                      # the owner's, lowered by its ask
    assert out["inherited"] == [2, 3] and out["lowered"] == 1
    errors = out["errors"]
    assert {name: e[0] for name, e in errors.items()} == {
        "raise": "EPERM", "lift": "EPERM", "spawn": "EPERM", "set_sibling": "EPERM",
        "get_sibling": "EPERM", "get_parent": "EPERM", "sched": "EPERM"}
    assert errors["raise"][1].startswith("setrlimit: calls 10 is above the limit in force (5)")
    assert errors["lift"][1].startswith("setrlimit: contexts unlimited is above")
    assert errors["spawn"][1].startswith("spawn: calls 6 is above")
    assert "fifo" in out["sched"]                       # an agent may look, not switch
    orphan = out["child"]                               # its parent exited: the owner's
    assert k.setrlimit(orphan, contexts=50, calls=None) == Limits(
        calls=None, kv_blocks=k.getrlimit().kv_blocks, contexts=50, children=64)
    for p in (orphan, sibling):
        k.kill(p, "KILL")
        assert k.wait(p, timeout=T) == -signal.SIGKILL


def test_sched_shows_and_switches_the_policy(k):
    before = k.sched()
    assert set(before.policies) == {"fifo", "priority", "fair", "las"}
    assert before.policy in before.policies and k.sysinfo().policy == before.policy
    msg = refused(lambda: k.sched("round-robin"), "EINVAL")
    assert "no policy 'round-robin'" in msg and all(p in msg for p in before.policies)
    other = next(p for p in before.policies if p != before.policy)
    try:
        assert k.sched(other).policy == other
        assert k.sched().policy == other and k.sysinfo().policy == other
        assert k.generate("12+47=", max_tokens=8).text == "59"   # it schedules
    finally:
        k.sched(before.policy)


def test_refusals_and_changes_are_audited(k, home):
    k.setrlimit(contexts=0, tokens_per_s=100, kv_blocks=2)
    refused(lambda: k.context(), "ENOMEM")
    assert refused(lambda: k.generate("12+47=", max_tokens=64), "ENOMEM").startswith(
        "kv_blocks limit (2) exceeded")           # refused by the engine thread
    k.sched(k.sched().policy)
    audit = [json.loads(line) for line in Home(home).audit_log.read_text().splitlines()]

    def last(event, **fields):           # written before the call was answered
        found = [r for r in audit if r["event"] == event and r["pid"] == k.pid
                 and fields.items() <= r.items()]
        assert found, f"no audit {event} record of pid {k.pid} with {fields}"
        return found[-1]
    assert last("setrlimit", target=k.pid)["limits"] == {"contexts": 0, "tokens_per_s": 100,
                                                         "kv_blocks": 2}
    assert last("limit", syscall="generate", code="ENOMEM")["reason"].startswith(
        "kv_blocks limit (2) exceeded")
    assert last("limit", syscall="context_create", code="ENOMEM")["reason"].startswith(
        "contexts limit (0) reached")
    assert last("sched")["policy"] == k.sched().policy
