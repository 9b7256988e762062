"""`llmos top`'s live view (userland/topview.py) driven by keys on a pipe, against a real
kernel on the tiny model, and the pure parts of userland/top.py that arrange its table."""
from __future__ import annotations

import asyncio
import contextlib
import sys
import threading

import pytest
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from llmos.syscalls.types import ProcInfo
from llmos.userland import connect
from llmos.userland.sdk import SyscallError
from llmos.userland.top import SORT_KEYS, TOP_HEADER, Order, arrange, column, table
from llmos.userland.topview import HELP, TopView, pause
from tests.userland.test_cli_kernel import T, llmos
from tests.userland.test_commands import eventually

SLEEP = [sys.executable, "-c", "import time; time.sleep(60)"]


@pytest.fixture
def k(kernel_home):
    """A connection of the test's own (an attached process), closed after the test."""
    with connect(kernel_home, timeout=T) as k:
        yield k


@contextlib.contextmanager
def sleeper(k, name: str = "sleeper"):
    """The pid of a child of k that sleeps a minute; killed and reaped on leaving."""
    pid = k.spawn(SLEEP, name=name)
    try:
        yield pid
    finally:
        with contextlib.suppress(SyscallError):
            k.kill(pid, "KILL")
        with contextlib.suppress(SyscallError):
            k.wait_status(pid, timeout=T)


@contextlib.contextmanager
def live(kernel, delay: float = 0.2):
    """(view, keys): a TopView of kernel in a thread, its keys a pipe; once it shows a
    table. On leaving, Ctrl-C quits it (even mid-question) and its thread must end."""
    with create_pipe_input() as keys:
        view = TopView(kernel, delay, input=keys, output=DummyOutput())
        thread = threading.Thread(target=view.run, name="top-view", daemon=True)
        thread.start()
        try:
            eventually(lambda: rows(view), "the first table")
            yield view, keys
        finally:
            keys.send_text("\x03")
            thread.join(T)
        assert not thread.is_alive(), "the view did not quit on Ctrl-C"


def rows(view) -> list[dict]:
    """The table the view shows, a dict per row keyed by the header (marks removed)."""
    lines = view.text().splitlines()[:-1]
    at = next((i for i, line in enumerate(lines) if line.split()[:1] in (["PID"], ["PID↑"],
                                                                         ["PID↓"])), None)
    if at is None:
        return []
    header = [h.rstrip("↑↓") for h in lines[at].split()]
    return [dict(zip(header, line.split(None, len(header) - 1))) for line in lines[at + 1:]]


def bottom(view) -> str:
    return view.text().splitlines()[-1]


def answer(view, keys, asked: str, text: str) -> None:
    """Wait for the bottom line to ask `asked`, then type text and Enter."""
    eventually(lambda: bottom(view).startswith(asked), f"the question {asked!r}")
    keys.send_text(text + "\r")


def row(view, pid: int) -> dict | None:
    return next((r for r in rows(view) if r["PID"] == str(pid)), None)


# ---- the pure parts ----------------------------------------------------------------------

def test_tree_puts_children_after_their_parent_indented_and_orphans_at_the_root():
    procs = [ProcInfo(pid=1, ppid=0, name="init"), ProcInfo(pid=2, ppid=1, name="a"),
             ProcInfo(pid=3, ppid=2, name="b"), ProcInfo(pid=4, ppid=1, name="c"),
             ProcInfo(pid=5, ppid=99, name="orphan")]
    shown = arrange(procs, Order(column="PID", tree=True))
    assert [(depth, p.pid) for depth, p in shown] == [(0, 1), (1, 2), (2, 3), (1, 4), (0, 5)]
    lines = table(shown).splitlines()[1:]
    assert [line.split(None, 14)[-1] for line in lines] == ["init", "`- a", "`- b", "`- c",
                                                             "orphan"]
    assert lines[1].endswith("0s  `- a") and lines[2].endswith("0s    `- b")   # by depth
    # siblings (and roots) keep the sort order
    backwards = arrange(procs, Order(column="PID", reverse=True, tree=True))
    assert [p.pid for _, p in backwards] == [5, 1, 4, 2, 3]
    # a filter that hides a parent makes its child a root
    assert [(d, p.pid) for d, p in arrange(procs, Order(column="PID", name="B", tree=True))] \
        == [(0, 3)]


def test_every_column_sorts_and_a_prefix_names_a_column():
    assert set(SORT_KEYS) == set(TOP_HEADER)
    assert column("pid") == "PID" and column("kv") == "KV" and column("tok/s_o") == "TOK/S_OUT"
    assert column("cpu") == "CPU%" and column(" name ") == "NAME"
    with pytest.raises(ValueError, match="could be TOK/S_IN TOK/S_OUT TOK_IN TOK_OUT"):
        column("tok")
    with pytest.raises(ValueError, match="no column 'ZZZ'"):
        column("zzz")
    procs = [ProcInfo(pid=p, tokens_out=t, rss=r, name=n)
             for p, t, r, n in ((1, 5, None, "b"), (2, 9, 10, "a"), (3, 5, 30, "c"))]
    pids = lambda order: [p.pid for _, p in arrange(procs, order)]   # noqa: E731
    assert pids(Order(column="TOK_OUT")) == [2, 1, 3]            # biggest first, ties by pid
    assert pids(Order(column="TOK_OUT", reverse=True)) == [1, 3, 2]
    assert pids(Order(column="RSS")) == [3, 2, 1]                # unknown (None) is least
    assert pids(Order(column="NAME")) == [2, 1, 3]


def test_the_live_view_needs_a_terminal(kernel_home):
    run = llmos(kernel_home, "top")
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "needs a terminal: use -b" in run.stderr and "--json" in run.stderr


# ---- the live view, on keys --------------------------------------------------------------

def test_the_refresh_pause_ends_on_a_cancel_that_meets_its_wake():
    """CI hung in quitting top: the refresh loop paused in asyncio.wait_for, which on
    Python < 3.12 returns normally when the cancel (the view's exit) comes in the loop
    turns between the wake being set and the pause resuming, so the loop went on and
    app.run never returned. Cancel at every turn after a set wake: each must cancel."""
    async def cancel_after(turns: int) -> bool:
        wake = asyncio.Event()
        wake.set()
        paused = asyncio.ensure_future(pause(wake, 60))
        for _ in range(turns):
            await asyncio.sleep(0)
        if paused.done():
            return True                   # the pause ended before the cancel: no race
        paused.cancel()
        try:
            await paused
        except asyncio.CancelledError:
            return True
        return False

    swallowed = [n for n in range(8) if not asyncio.run(cancel_after(n))]
    assert swallowed == [], f"a cancel {swallowed} loop turns after the wake was lost"


def test_q_quits_and_the_view_shows_top_with_the_key_help(k):
    with create_pipe_input() as keys:
        view = TopView(k, 0.2, input=keys, output=DummyOutput())
        thread = threading.Thread(target=view.run, daemon=True)
        thread.start()
        try:
            eventually(lambda: row(view, k.pid), "this process in the table")
            text = view.text()
            assert text.startswith("llmos top - ") and "TOK/S_OUT↓" in text   # the default sort
            assert bottom(view) == HELP
        finally:
            keys.send_text("q")
            thread.join(T)
    assert not thread.is_alive()


def test_n_iterations_end_the_live_view_by_itself(k):
    """-n N ends the live view after N snapshots, as top's -n does (it was ignored)."""
    with create_pipe_input() as keys:
        view = TopView(k, 0.1, input=keys, output=DummyOutput(), iterations=2)
        thread = threading.Thread(target=view.run, daemon=True)
        thread.start()
        thread.join(T)
        alive = thread.is_alive()
        if alive:
            keys.send_text("q")
            thread.join(T)
    assert not alive, "the view did not end after its 2 snapshots"
    assert row(view, k.pid), "the view showed no table"


def test_n_iterations_count_refreshes_that_failed(own_kernel):
    """-n counted only snapshots read: on a kernel gone, top -n 2 never ended."""
    from tests.kernels import stop_kernel
    home, proc = own_kernel
    with connect(home, timeout=T) as gone:
        stop_kernel(proc)
        with create_pipe_input() as keys:
            view = TopView(gone, 0.1, input=keys, output=DummyOutput(), iterations=2)
            thread = threading.Thread(target=view.run, daemon=True)
            thread.start()
            thread.join(3 * T)
            alive = thread.is_alive()
            if alive:
                keys.send_text("q")
                thread.join(T)
    assert not alive, "the view did not end after 2 failed refreshes"
    assert "kernel" in bottom(view), bottom(view)              # the error was shown


def test_k_sends_the_signal_asked_to_the_pid_asked(k):
    with sleeper(k) as pid, live(k) as (view, keys):
        eventually(lambda: row(view, pid), "the sleeper in the table")
        keys.send_text("k")
        answer(view, keys, "PID to signal [", str(pid))
        answer(view, keys, "signal [TERM]: ", "sigkill")
        done = k.wait_status(pid, timeout=T)
        assert done.exited and done.status == -9
        eventually(lambda: bottom(view) == f"sent KILL to {pid}", "the kill's result")


def test_n_renices_the_pid_asked(k):
    with sleeper(k) as pid, live(k) as (view, keys):
        keys.send_text("n")
        answer(view, keys, "PID to renice", str(pid))
        answer(view, keys, "nice value (-20..19): ", "7")
        eventually(lambda: (row(view, pid) or {}).get("NI") == "7", "NI 7 in the table")
        assert next(p for p in k.ps() if p.pid == pid).nice == 7
        assert bottom(view) == f"nice of {pid} set to 7"


def test_f_shows_only_names_containing_the_filter_and_empty_clears_it(k):
    with sleeper(k, "filter-me") as pid, live(k) as (view, keys):
        keys.send_text("f")
        answer(view, keys, "filter by name", "FILTER")
        eventually(lambda: [r["PID"] for r in rows(view)] == [str(pid)], "only the sleeper")
        assert "filter 'FILTER': 1 of " in view.text()
        keys.send_text("f")
        answer(view, keys, "filter by name", "")
        eventually(lambda: row(view, k.pid) and row(view, pid), "every process again")
        assert "filter 'FILTER'" not in view.text()


def test_t_shows_each_child_after_its_parent(k):
    with sleeper(k, "child") as pid, live(k) as (view, keys):
        keys.send_text("t")

        def child_under_parent():
            shown = rows(view)
            at = next((i for i, r in enumerate(shown) if r["PID"] == str(k.pid)), None)
            return at is not None and shown[at + 1:at + 2] == [row(view, pid)] \
                and shown[at + 1]["NAME"] == "`- child" and "tree view" in view.text()
        eventually(child_under_parent, "the sleeper under this process, indented")
        keys.send_text("t")
        eventually(lambda: "tree view" not in view.text() and row(view, pid)["NAME"] == "child",
                   "the flat table again")


def test_s_sorts_by_the_column_asked_and_the_same_column_again_reverses(k):
    with sleeper(k, "a"), sleeper(k, "b"), live(k) as (view, keys):
        keys.send_text("s")
        answer(view, keys, "sort by column [TOK/S_OUT]: ", "pi")
        pids = lambda: [int(r["PID"]) for r in rows(view)]            # noqa: E731
        eventually(lambda: "PID↑" in view.text() and len(pids()) >= 3
                   and pids() == sorted(pids()), "pids ascending")
        keys.send_text("s")
        answer(view, keys, "sort by column [PID]: ", "")            # the same column
        eventually(lambda: "PID↓" in view.text() and pids() == sorted(pids(), reverse=True),
                   "pids descending")
        keys.send_text("s")
        answer(view, keys, "sort by column", "tok")                  # ambiguous: an error
        eventually(lambda: bottom(view).startswith("column 'TOK' could be"), "the error")
        assert "PID↓" in view.text()


def test_errors_show_on_the_bottom_line_and_the_view_runs_on(k):
    with live(k) as (view, keys):
        keys.send_text("k")
        answer(view, keys, "PID to signal", "999999")
        answer(view, keys, "signal [TERM]: ", "")
        eventually(lambda: bottom(view).startswith("ESRCH: "), "ESRCH on the bottom line")
        keys.send_text("n")
        answer(view, keys, "PID to renice", "nine")
        eventually(lambda: bottom(view) == "not a pid: 'nine'", "a bad pid refused")
        keys.send_text("n")
        answer(view, keys, "PID to renice", str(k.pid))
        answer(view, keys, "nice value", "40")                       # the kernel refuses
        eventually(lambda: bottom(view).startswith("EINVAL: "), "EINVAL on the bottom line")
        keys.send_text("k")
        eventually(lambda: bottom(view).startswith("PID to signal"), "a question")
        keys.send_text("\x1b")                                       # Esc cancels it
        eventually(lambda: bottom(view) == HELP, "the key help again")
        keys.send_text("t")
        eventually(lambda: "tree view" in view.text(), "the view still answers keys")


class Stalled:
    """A real connection whose ps() blocks, after the first, until `release` is set: a
    kernel that has gone slow."""

    def __init__(self, k):
        self.k, self.release, self.reads = k, threading.Event(), 0

    def __getattr__(self, name):
        return getattr(self.k, name)

    def ps(self):
        self.reads += 1
        if self.reads > 1:
            self.release.wait(T)
        return self.k.ps()


def test_a_slow_kernel_does_not_freeze_the_keys_nor_the_quit(k):
    slow = Stalled(k)
    with create_pipe_input() as keys:
        view = TopView(slow, 0.1, input=keys, output=DummyOutput())
        thread = threading.Thread(target=view.run, daemon=True)
        thread.start()
        try:
            eventually(lambda: rows(view) and slow.reads > 1, "a read that hangs")
            keys.send_text("t")
            eventually(lambda: "tree view" in view.text(), "t answered during the read")
            keys.send_text("q")
            thread.join(T)
            assert not thread.is_alive() and slow.reads == 2   # quit without the read ending
        finally:
            slow.release.set()
            keys.send_text("q")
            thread.join(T)
