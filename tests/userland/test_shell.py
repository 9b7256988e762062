"""`llmos shell` against a real kernel on tiny: the REPL driven through prompt_toolkit's
pipe input (keys as a terminal sends them) with its output collected, and the command
itself as a subprocess for scripts (-c, a file, a pipe)."""
from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import threading
import time

import pytest
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from llmos.syscalls.types import ProcState
from llmos.userland import connect
from llmos.userland.shell import Shell, repl, split
from llmos.userland.shell.complete import ShellCompleter
from tests.kernels import ROOT, signal_a_thread
from tests.userland.test_cli_kernel import T, llmos
from tests.userland.test_commands import eventually

CTRL_C, CTRL_Z, UP = "\x03", "\x1a", "\x1b[A"

# A program that says it started, then ticks until it is signalled.
TICKER = ("import time, sys\nprint('started', flush=True)\n"
          "for i in range(600):\n    print('tick', i, flush=True)\n    time.sleep(0.1)\n")


class Out:
    """The shell's out: everything it printed, and a way to wait for a line of it."""

    def __init__(self):
        self._text, self._cond, self.mark = "", threading.Condition(), 0

    def write(self, text):
        with self._cond:
            self._text += text
            self._cond.notify_all()

    def flush(self):
        pass

    @property
    def text(self):
        with self._cond:
            return self._text

    def expect(self, pattern: str) -> re.Match:
        """The first match of pattern printed since the last expect (within T seconds)."""
        with self._cond:
            deadline = time.monotonic() + T
            while (m := re.compile(pattern).search(self._text, self.mark)) is None:
                left = deadline - time.monotonic()
                assert left > 0, f"not printed within {T}s: {pattern!r}; printed:\n{self._text}"
                self._cond.wait(left)
            self.mark = m.end()
            return m


class Term:
    """An interactive shell on home whose keyboard is a pipe: type() sends keys."""

    def __init__(self, home, history=None, reconnect: bool = False):
        self.out = Out()
        self._pipe = create_pipe_input()
        self.input = self._pipe.__enter__()
        self.k = connect(home, timeout=T, name="shell")
        again = (lambda: connect(home, timeout=T, name="shell")) if reconnect else None
        self.sh = Shell(self.k, self.out, self.input, DummyOutput(), reconnect=again)
        self.status = None
        self.thread = threading.Thread(target=self._run, args=(history,), daemon=True)
        self.thread.start()

    def _run(self, history):
        self.status = repl(self.sh, history)

    def type(self, text: str) -> None:
        self.input.send_text(text)

    def close(self) -> None:
        if self.thread.is_alive():
            self.type("\x04")                     # Ctrl-D at an empty prompt
            self.thread.join(T)
        assert not self.thread.is_alive(), "the shell did not exit on Ctrl-D"
        self._pipe.__exit__(None, None, None)
        self.k.close()
        self.sh.k.close()                         # a connection of its own after a reconnect


@pytest.fixture
def term(kernel_home):
    t = Term(kernel_home)
    yield t
    for job in t.sh.jobs.jobs():
        try:
            t.k.kill(job.pid, "KILL")
        except Exception:
            pass
    t.close()


@pytest.fixture
def ticker(tmp_path):
    path = tmp_path / "ticker.py"
    path.write_text(TICKER)
    return path


def state(k, pid) -> ProcState | None:
    return next((p.state for p in k.ps() if p.pid == pid), None)


def test_the_shell_is_a_process_named_shell(term):
    term.type("ps\r")
    term.out.expect(rf"\n\s+{term.k.pid}\s+0\s+\w+.*\bshell\n")


def test_run_in_the_background_then_jobs_wait_and_the_exit_notice(term, ticker):
    term.type("run -m llmos.userland.examples.worker 12+47= &\r")
    job = int(term.out.expect(r"\[1\] (\d+)\n").group(1))
    # its exit is told above the prompt, unasked
    term.out.expect(rf"\[1\]\+ Done\s+pid {job} run -m llmos.userland.examples.worker 12\+47= \(exit 0\)")
    term.type(f"run {ticker} &\r")
    pid = int(term.out.expect(r"\[1\] (\d+)\n").group(1))
    eventually(lambda: state(term.k, pid) in (ProcState.SLEEPING, ProcState.RUNNING), "ticker runs")
    term.type("jobs\r")
    term.out.expect(rf"\[1\]\+ \w+\s+pid {pid} run {re.escape(str(ticker))}\n")
    term.type("kill %1\r")
    term.out.expect(rf"\[1\]\+ Killed \(SIGTERM\)\s+pid {pid} .*\(exit 143\)")
    term.type("wait\r" "jobs\r" "logs %1\r")
    term.out.expect(r"llmos: logs: %1: no such job")      # gone from the table once told


def test_fg_follows_the_output_and_ctrl_c_interrupts_the_job_not_the_shell(term, ticker):
    term.type(f"run {ticker} &\r")
    pid = int(term.out.expect(r"\[1\] (\d+)\n").group(1))
    term.type("fg\r")
    term.out.expect(r"tick \d+\n")                 # its output, followed
    term.type(CTRL_C)
    term.out.expect(rf"\[llmos: sending INT to pid {pid}\]")
    term.out.expect(r"Killed \(SIGINT\)")
    term.type("ps\r")
    term.out.expect(r"\bshell\n")                  # the shell lives on
    assert term.thread.is_alive()


def test_ctrl_z_stops_the_foreground_job_and_bg_continues_it(term, ticker):
    term.type(f"run {ticker} &\r")
    pid = int(term.out.expect(r"\[1\] (\d+)\n").group(1))
    term.type(f"run {ticker} &\r")
    other = int(term.out.expect(r"\[2\] (\d+)\n").group(1))
    term.type("fg %1\r")
    term.out.expect(r"tick \d+\n")
    term.type(CTRL_Z)
    term.out.expect(rf"\[1\]\+ Stopped\s+pid {pid} run ")
    eventually(lambda: state(term.k, pid) is ProcState.STOPPED, "the job stopped in the kernel")
    term.type("jobs\r")
    term.out.expect(rf"\[1\]\+ stopped\s+pid {pid} .*\n\[2\]  \w+\s+pid {other}")
    term.type("bg\r")                             # the job just stopped, not the newest
    term.out.expect(r"\[1\]\+ run .*ticker.py &")
    eventually(lambda: state(term.k, pid) in (ProcState.SLEEPING, ProcState.RUNNING),
               "the job continued")
    term.type("bg %1\r")
    term.out.expect(r"bg: job 1 already in background")
    # TERM to a stopped job ends it: the shell continues it, as bash does
    term.type("kill -s STOP %1\r")
    eventually(lambda: state(term.k, pid) is ProcState.STOPPED, "stopped again")
    term.type("kill %1\r")
    term.out.expect(rf"\[1\]. Killed \(SIGTERM\)\s+pid {pid}")
    term.type("kill -KILL %2\r")
    term.out.expect(rf"\[2\]\+ Killed \(SIGKILL\)\s+pid {other}")


def test_ctrl_c_cancels_a_foreground_generation_and_the_shell_goes_on(term):
    term.type(f"limit {term.k.pid} tokens_per_s=4\r")       # slow: the key comes first
    term.out.expect(r"tokens_per_s\s+4")
    term.type("gen 12+47= --ignore-eos -n 200\r")
    eventually(lambda: any(p.pid == term.k.pid and p.tokens_out > 0 for p in term.k.ps()),
               "the generation started")
    term.type(CTRL_C)
    term.out.expect(r"\^C\n")
    eventually(lambda: next(p.calls for p in term.k.ps() if p.pid == term.k.pid) == 0,
               "the cancelled generate left the kernel")
    term.type("sched\r")
    term.out.expect(r"\* fair")


def test_completion_offers_commands_options_jobs_pids_models_and_paths(term, ticker):
    term.type(f"run {ticker} &\r")
    pid = int(term.out.expect(r"\[1\] (\d+)\n").group(1))
    eventually(lambda: term.sh.status_line.pids and pid in term.sh.status_line.pids,
               "the status line saw the job")
    complete = ShellCompleter(term.sh)

    def offered(text):
        return [c.text for c in complete.get_completions(Document(text), CompleteEvent())]
    assert offered("ki") == ["kill"] and "models" in offered("")
    assert {"-s", "--signal", "--help"} <= set(offered("kill -"))
    assert "%1" in offered("kill %") and str(pid) in offered(f"fg {str(pid)[0]}")
    assert offered("models ") == ["load", "unload"] and "tiny" in offered("models load ")
    assert "tiny" in offered("gen --model t")
    assert offered(f"run {ticker.parent}/tick") == ["er.py"]
    assert offered("ps; ki") == ["kill"]


def test_history_is_kept_in_the_home_across_two_shells(kernel_home, tmp_path):
    history = str(tmp_path / "shell_history")
    first = Term(kernel_home, history)
    first.type("sysinfo\r")
    first.out.expect(r"policy")
    first.close()
    assert "sysinfo" in open(history).read()
    second = Term(kernel_home, history)
    try:
        second.type(UP + "\r")                      # the last line of the first shell
        second.out.expect(r"policy")
        second.type("sched\r")
        second.out.expect(r"\* fair")
        second.type("\x12sysi\r\r")               # Ctrl-R: search back for "sysi"
        second.out.expect(r"policy")
    finally:
        second.close()


@pytest.mark.parametrize("reconnect", [False, True], ids=["alone", "reconnecting"])
def test_a_dead_kernel_is_told_and_the_shell_goes_on_with_the_next(own_kernel, reconnect):
    """A kernel that goes away is told above the prompt. The shell had to be left and
    started again after a restart: now (`llmos shell` reconnects) it connects to the new
    kernel by itself, says so, and its commands and jobs go there."""
    from tests.kernels import start_kernel, stop_kernel
    home, proc = own_kernel
    t = Term(home, reconnect=reconnect)
    again = None
    try:
        eventually(lambda: t.sh.status_line and "| fair |" in t.sh.status_line.text,
                   "the status line")
        stop_kernel(proc)
        t.out.expect(r"\[llmos: the kernel went away")
        if not reconnect:
            assert t.sh.status_line.text == " kernel gone"
            t.type("ps\r")
            t.out.expect(r"llmos: ps: the kernel is gone")
            return
        assert t.sh.status_line.text == " kernel gone: waiting for `llmos up`"
        again = start_kernel(home)
        told = t.out.expect(r"\[llmos: connected to the new kernel \(pid (\d+)\); "
                            r"this shell is pid (\d+)")
        assert (int(told[1]), int(told[2])) == (again.pid, t.sh.k.pid)
        eventually(lambda: "| fair |" in t.sh.status_line.text, "the status line again")
        t.type("run -m llmos.userland.examples.worker 12+47= &\r")
        t.out.expect(r"\[1\] (\d+)")
        t.type("wait\r")
        t.out.expect(r"Done +pid \d+ .*\(exit 0\)")
        t.type("sched\r")
        t.out.expect(r"\* fair")                  # the prompt is back (Ctrl-D is for it)
        with connect(home, timeout=T) as k:
            shell = [p for p in k.ps() if p.name == "shell"]
        assert [p.pid for p in shell] == [t.sh.k.pid], shell
    finally:
        t.close()
        if again is not None:
            stop_kernel(again)


# ---- scripts ------------------------------------------------------------------------------

def test_split_reads_lines_as_sh_does():
    assert split("run -m w 12+47= & jobs; wait") == [
        (["run", "-m", "w", "12+47="], True), (["jobs"], False), (["wait"], False)]
    assert split('gen "a; b"') == [(["gen", "a; b"], False)]
    assert split('gen ";" a#b \'\' "x; y"z') == [(["gen", ";", "a#b", "", "x; yz"], False)]
    for bad in ("; ps", "ps && jobs", "gen 'open", "run x & ; y"):
        with pytest.raises(ValueError):
            split(bad)


def test_c_runs_a_script_and_exits_with_the_last_status(kernel_home):
    run = llmos(kernel_home, "shell", "-c",
                "run -m llmos.userland.examples.worker 12+47= & wait ; exit 7")
    assert run.returncode == 7, run.stderr
    assert "RESULT 59" not in run.stdout              # a background job's output is its log
    assert re.search(r"\[1\] \d+\n", run.stdout) and "(exit 0)" in run.stdout
    fg = llmos(kernel_home, "shell", "-c", "run -m llmos.userland.examples.worker 12+47=")
    assert fg.returncode == 0 and "RESULT 59" in fg.stdout
    assert llmos(kernel_home, "shell", "-c", "nosuch").returncode == 127
    assert llmos(kernel_home, "shell", "-c", "kill 99999").returncode == 1
    assert llmos(kernel_home, "shell", "-c", "kill").returncode == 2
    host = llmos(kernel_home, "shell", "-c", "!echo out; echo err >&2; exit 3")
    assert host.returncode == 3 and host.stdout == "out\nerr\n"
    # a host command killed by a signal is 128+N, as for a job (it was -15 -> 241)
    assert llmos(kernel_home, "shell", "-c", "!kill -TERM $$").returncode == 143


def test_commands_on_a_pipe_run_without_a_prompt_and_chat_reads_its_turns(kernel_home):
    script = ("# a comment\nchat -s 'You are tiny.'\nadd 12 47\n/fork\nreverse c a t\n/back\n"
              "/exit\nmem\n")
    run = subprocess.run([sys.executable, "-m", "llmos.userland.cli", "shell", "--home",
                          str(kernel_home)], input=script, cwd=ROOT, capture_output=True,
                         text=True, timeout=T)
    assert run.returncode == 0, run.stderr
    assert "llmos>" not in run.stdout and "you>" not in run.stdout
    assert run.stdout.startswith("59\n"), run.stdout        # no banner, no speaker
    assert re.search(r"\[context \d+, a fork of \d+; /back returns\]\nt a c\n", run.stdout)
    with connect(kernel_home, timeout=T) as k:      # the chat's contexts were freed
        assert all(p.contexts == 0 for p in k.ps())


def test_help_lists_every_command_and_explains_one(term):
    from llmos.userland.shell.builtins import BUILTINS
    term.type("help\r")
    listing = term.out.expect(r"(?s)  bg .*?Ctrl-R searches the history")
    assert all(f"  {name} " in listing.group(0) for name in BUILTINS.commands)
    term.type("help kill\r")
    term.out.expect(r"Usage: kill \[OPTIONS\] TARGETS\.\.\.")


def test_a_failed_chat_turn_is_told_and_the_chat_goes_on(kernel_home):
    """Every turn here is refused (600 tokens do not fit the context of 512): each says so,
    the chat goes on, and its lines never run as commands (a `!` line was run on the
    host when a failed turn ended the chat)."""
    script = "chat -n 600\nhello\n!echo HOST COMMAND RAN\n/exit\nsched\n"
    run = subprocess.run([sys.executable, "-m", "llmos.userland.cli", "shell", "--home",
                          str(kernel_home)], input=script, cwd=ROOT, capture_output=True,
                         text=True, timeout=T)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("llmos: chat: EINVAL") == 2 and "HOST COMMAND RAN" not in run.stdout
    assert "* fair" in run.stdout                      # the line after /exit ran


def test_ctrl_c_during_a_chat_answer_cancels_it_in_the_kernel_at_once(term):
    # The answer is "5", "9", end: one token now, the next ones 5 s apart, so the
    # Ctrl-C typed after the first comes well before the end (at 2 tokens/s the bucket
    # let "59" out at once, and a slow machine could type Ctrl-C after the answer).
    term.type(f"limit {term.k.pid} tokens_per_s=0.2\r")
    term.out.expect(r"tokens_per_s\s+0.2")
    term.type("chat\r")
    term.out.expect(r"chat with tiny on context \d+")
    term.type("add 12 47\r")
    term.out.expect(r"tiny> 5")
    assert any(p.pid == term.k.pid and p.calls for p in term.k.ps()), "the turn runs"
    term.type(CTRL_C)
    term.out.expect(r"\^C\n")
    term.k.setrlimit(term.k.pid, tokens_per_s=None)
    term.type("reverse c a t\r")               # no EBUSY: the first answer is gone
    term.out.expect(r"tiny> t a c\n")
    term.type("/exit\r" "sched\r")
    term.out.expect(r"\* fair")


def test_leaving_with_a_stopped_job_warns_once_then_ends_it(kernel_home, ticker):
    t = Term(kernel_home)
    try:
        t.type(f"run {ticker} &\r")
        pid = int(t.out.expect(r"\[1\] (\d+)\n").group(1))
        t.type("kill -STOP %1\r")
        eventually(lambda: state(t.k, pid) is ProcState.STOPPED, "stopped")
        t.type("\x04")
        t.out.expect(r"there are stopped jobs")
        assert t.thread.is_alive()
        t.type("exit\r")
        t.thread.join(T)
        assert not t.thread.is_alive()
        with connect(kernel_home, timeout=T) as k:    # TERM, and CONT to act on it
            eventually(lambda: all(p.pid != pid or p.state is ProcState.ZOMBIE for p in k.ps()),
                       "the stopped job ended")
    finally:
        t.close()


def test_ctrl_d_typed_while_a_job_runs_does_not_end_the_shell(term, ticker):
    term.type(f"run {ticker}\r")
    term.out.expect(r"tick \d+\n")
    term.type("\x04")                            # dropped, not kept for the prompt
    term.type(CTRL_C)
    term.out.expect(r"Killed \(SIGINT\)")
    term.type("sched\r")
    term.out.expect(r"\* fair")
    assert term.thread.is_alive()


def test_nice_takes_a_negative_value_and_wait_returns_on_a_stopped_job(term, ticker):
    term.type(f"run {ticker} &\r")
    pid = int(term.out.expect(r"\[1\] (\d+)\n").group(1))
    term.type("nice -5 %1\r")
    eventually(lambda: next(p.nice for p in term.k.ps() if p.pid == pid) == -5, "reniced")
    term.type("kill -STOP %1\r" "wait %1\r" "sched\r")
    term.out.expect(r"\* fair")                    # wait came back
    eventually(lambda: term.sh.status == 0, "sched's status")   # set once it returns
    assert state(term.k, pid) is ProcState.STOPPED
    term.type("kill -KILL %1\r")
    term.out.expect(r"Killed \(SIGKILL\)")


@pytest.mark.parametrize("main", [True, False], ids=["to-the-process", "to-another-thread"])
def test_sigint_ends_a_script_and_the_host_command_it_ran(kernel_home, main):
    """CI saw a SIGINT lost: the kernel gave it to one of the shell's other threads, and
    the main thread, blocked until the host command ended, noticed it only then."""
    import os
    import signal

    import psutil
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMOS_")}
    shell = subprocess.Popen([sys.executable, "-m", "llmos.userland.cli", "shell", "--home",
                              str(kernel_home), "-c", "!sleep 300\nsched"], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, text=True)
    try:
        eventually(lambda: any("sleep" in " ".join(c.cmdline())
                               for c in psutil.Process(shell.pid).children(recursive=True)),
                   "the host command runs")
        if main:
            shell.send_signal(signal.SIGINT)
        else:
            signal_a_thread(shell.pid, signal.SIGINT)
        out, _ = shell.communicate(timeout=T)
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(shell.pid).children(recursive=True):
                child.kill()
        shell.kill()
        shell.wait(T)
    assert shell.returncode == 130 and "fair" not in out       # the script stopped there


def test_a_script_leaving_a_job_running_says_so_and_nothing_else(kernel_home, ticker):
    run = llmos(kernel_home, "shell", "-c", f"run {ticker} &")
    assert run.returncode == 0, run.stderr
    assert "job(s) left running" in run.stdout and "Lost" not in run.stdout
    pid = int(re.search(r"\[1\] (\d+)", run.stdout).group(1))
    with connect(kernel_home, timeout=T) as k:
        k.kill(pid, "KILL")
        assert k.wait(pid, timeout=T) == -9
