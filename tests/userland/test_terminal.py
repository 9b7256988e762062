"""A person at a terminal: the real `llmos shell` and `llmos top` in a tmux session on a
real kernel, driven by keys (send-keys) and checked by what the screen shows
(capture-pane). Skipped where tmux is not installed (`apt install tmux`)."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from tests.kernels import ROOT
from tests.userland.test_cli_kernel import T

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None,
                                reason="tmux is not installed (apt install tmux)")

class Tmux:
    """One tmux server of our own (-L), a session running argv in a 120x32 window."""

    def __init__(self, argv: list[str], env: dict):
        self.socket = f"llmos-test-{uuid.uuid4().hex[:8]}"
        command = " ".join(f"{k}={v}" for k, v in env.items()) + " " + " ".join(argv)
        self._tmux("new-session", "-d", "-s", "t", "-x", "120", "-y", "32", command)

    def _tmux(self, *args) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True,
                              text=True, timeout=T, check=True).stdout

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "t", *keys)

    def line(self, text: str) -> None:
        self._tmux("send-keys", "-t", "t", "-l", text)
        self.keys("Enter")

    def screen(self) -> str:
        try:
            return self._tmux("capture-pane", "-p", "-t", "t")
        except subprocess.CalledProcessError:
            return ""                       # the session ended

    def shows(self, pattern: str) -> re.Match:
        """Wait (up to T s) until the screen shows pattern; the match."""
        deadline = time.monotonic() + T
        while (m := re.search(pattern, self.screen())) is None:
            assert time.monotonic() < deadline, \
                f"the screen did not show {pattern!r} within {T}s:\n{self.screen()}"
            time.sleep(0.2)
        return m

    def ended(self) -> bool:
        return subprocess.run(["tmux", "-L", self.socket, "has-session", "-t", "t"],
                              capture_output=True, timeout=T).returncode != 0

    def ends(self, what: str) -> None:
        """Wait (up to T s) until the program in the window exits."""
        deadline = time.monotonic() + T
        while not self.ended():
            assert time.monotonic() < deadline, f"{what} did not exit:\n{self.screen()}"
            time.sleep(0.2)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=T)


@pytest.fixture
def terminal(kernel_home):
    """start(*llmos args) -> Tmux running `llmos ARGS` on the module's kernel."""
    env = {"LLMOS_HOME": kernel_home, "PYTHONPATH": ROOT, "TERM": "xterm-256color"}
    started = []

    def start(*args):
        t = Tmux([sys.executable, "-m", "llmos.userland.cli", *args], env)
        started.append(t)
        return t
    yield start
    for t in started:
        t.close()


def test_a_person_runs_three_agents_watches_them_stops_one_chats_and_leaves(terminal):
    sh = terminal("shell")
    sh.shows(r"llmos>")
    for n in (1, 2, 3):
        sh.line(f"run --name agent{n} -m llmos.userland.examples.steady --every 0.2 &")
        sh.shows(rf"\[{n}\] \d+")
    sh.shows(r"\| 3 jobs")                           # the status line at the bottom
    sh.line("top")
    screen = sh.shows(r"(?s)llmos top - .*agent1.*s sort  k kill").string
    assert all(f"agent{n}" in screen for n in (1, 2, 3)) and "TOK/S_OUT" in screen
    sh.keys("q")
    sh.shows(r"llmos> top\n")
    sh.line("kill -STOP %2")
    sh.line("jobs")
    sh.shows(r"\[2\]  stopped\s+pid \d+ run --name agent2")
    sh.line("bg %2")
    sh.shows(r"\[2\]\+ run --name agent2 .*&")
    sh.line("chat")
    sh.shows(r"you>")
    sh.line("add 12 47")
    sh.shows(r"tiny> 59")
    sh.line("/exit")
    sh.line("kill %1 %2 %3")
    for n in (1, 2, 3):
        sh.shows(rf"\[{n}\].? Killed \(SIGTERM\)\s+pid \d+ run --name agent{n}")
    sh.keys("C-d")
    sh.ends("the shell, on Ctrl-D,")


def test_top_in_a_terminal_shows_the_table_and_quits_on_q(terminal):
    top = terminal("top", "-d", "0.3")
    top.shows(r"(?s)llmos top - .*PID\s+PPID\s+STATE.*NAME.*s sort  k kill  n renice")
    top.keys("f")
    top.line("top")                                  # filter: only top's own process
    top.shows(r"filter 'top'")
    top.keys("q")
    top.ends("top, on q,")
