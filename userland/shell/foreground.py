"""What the shell does while something runs in the foreground: a job whose output it
shows, a generation it streams, or a host command (`!CMD`). The terminal stays in raw mode meanwhile, so Ctrl-C
and Ctrl-Z arrive as keys (not as signals to the shell) and act on the job:

    Ctrl-C   the job gets INT (a second Ctrl-C: KILL); a generation is cancelled
    Ctrl-Z   the job gets STOP and the shell returns to its prompt ("Stopped")

Printable keys typed meanwhile are kept for the next prompt (typeahead), as a terminal
keeps them; other control keys (Ctrl-D above all) are dropped. Without a terminal (a
script, a pipe) there are no keys: SIGINT then interrupts the foreground job the same
way, and the script stops after it (Keys.interrupted).
"""
from __future__ import annotations

import os
import queue
import select
import signal
import subprocess
import threading
from contextlib import contextmanager, suppress

from llmos.syscalls import ECANCELED, SyscallError
from llmos.userland.cmdline import INTERRUPTED, exit_code

POLL = 0.1          # s between looks at the keys, the job's log and its exit
STOPPED = 148       # status of a command whose job Ctrl-Z stopped (128 + SIGTSTP, as bash)


class Keys:
    """The keys typed while something runs in the foreground: poll() returns "c-c" and
    "c-z" presses and keeps printable keys for the next prompt."""

    def __init__(self, inp):
        self.input = inp                # a prompt_toolkit Input, or None (no terminal)
        self._sigints = 0               # SIGINTs not yet polled (no terminal)
        self.interrupted = False        # a SIGINT came (no terminal): a script stops

    @contextmanager
    def watching(self):
        """Raw mode while the block runs; without a terminal, SIGINT counts as Ctrl-C."""
        self._sigints = 0
        if self.input is not None:
            with self.input.raw_mode():
                yield self
            return
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)

    def _on_sigint(self, signum, frame) -> None:
        self._sigints += 1
        self.interrupted = True

    def poll(self, timeout: float = POLL) -> list[str]:
        """Wait up to timeout for keys; the control keys pressed, in order."""
        if self.input is None:
            threading.Event().wait(timeout)
            found, self._sigints = ["c-c"] * self._sigints, 0
            return found
        ready, _, _ = select.select([self.input.fileno()], [], [], timeout)
        if not ready:
            return []
        from prompt_toolkit.input.typeahead import get_typeahead, store_typeahead
        from prompt_toolkit.keys import Keys as K
        found, kept = [], get_typeahead(self.input)
        presses = self.input.read_keys() + self.input.flush_keys()
        if not presses:                 # end of input, or half an escape sequence
            threading.Event().wait(timeout)
        for press in presses:
            if press.key in (K.ControlC, K.ControlZ):
                found.append("c-c" if press.key == K.ControlC else "c-z")
            elif press.key in (K.ControlM, K.ControlJ, K.ControlI) or len(press.key) == 1:
                kept.append(press)      # text and Enter: the next command, typed ahead
        store_typeahead(self.input, kept)
        return found


def follow(sh, job) -> int | None:
    """Show job's output (from where it was last shown) until it exits (its exit code) or
    the user stops it with Ctrl-Z (None: the job is stopped and stays in the table).
    Ctrl-C sends INT, then KILL."""
    path = sh.k.log_path(job.pid)
    f, sent = None, 0
    with sh.keys.watching() as keys:
        try:
            while True:
                if f is None and path is not None and path.exists():
                    f = open(path, "rb")
                    f.seek(job.shown)              # what it printed since it was last shown
                if f is not None:
                    sh.write_bytes(f.read())
                    job.shown = f.tell()
                if job.exited.is_set():
                    return sh.report_end(job)
                for key in keys.poll():
                    if key == "c-z":
                        sh.signal(job.pid, "STOP", quiet=True)
                        if not sh.jobs.set_background(job, True):    # it exited meanwhile
                            return sh.report_end(job)
                        sh.echo("\n" + job.line("Stopped", current=True))
                        return None
                    sent += 1
                    sh.echo(f"\n[llmos: sending {'INT' if sent == 1 else 'KILL'} to pid {job.pid}]")
                    sh.signal(job.pid, "INT" if sent == 1 else "KILL", quiet=True)
        finally:
            if f is not None:
                sh.write_bytes(f.read())
                job.shown = f.tell()
                f.close()


_END = "end"


def _read(s, deltas: queue.Queue) -> None:
    """The reader thread of stream(): each Delta of Stream s, then (_END, the Completion
    or the exception that ended it)."""
    try:
        for delta in s:
            deltas.put(delta)
        deltas.put((_END, s.completion))
    except BaseException as e:          # noqa: BLE001 (handed to the shell's thread)
        deltas.put((_END, e))


def stream(sh, s) -> tuple[object | None, bool]:
    """Echo the deltas of Stream s (not yet started) as they come; Ctrl-C cancels it in
    the kernel at once. Returns (its Completion or None, whether the user interrupted).
    Raises what ended the stream (SyscallError, KernelDead).

    The stream is read on a thread of its own so that the keys are watched meanwhile."""
    deltas: queue.Queue = queue.Queue()
    reader = threading.Thread(target=_read, args=(s, deltas), daemon=True,
                              name="llmos-shell-stream")
    reader.start()
    interrupted = False
    with sh.keys.watching() as keys:
        while True:
            try:
                item = deltas.get(timeout=POLL)
            except queue.Empty:
                item = None
            if isinstance(item, tuple) and item[0] == _END:
                break
            if item is not None:
                sh.write(item.text)
            if not interrupted and "c-c" in keys.poll(0):
                interrupted = True
                s.cancel()                  # the reader wakes with ECANCELED
                sh.echo("^C")
    end = item[1]
    if isinstance(end, SyscallError) and end.code == ECANCELED and interrupted:
        return None, True
    if isinstance(end, BaseException):
        raise end
    return end, interrupted


def host(sh, command: str) -> int:
    """`!CMD`: the host's shell runs CMD; its exit code. On a terminal CMD owns it meanwhile."""
    if not command.strip():
        return 0
    if sh.tty:              # Ctrl-C reaches the command too: the terminal's group
        try:
            return exit_code(subprocess.run(command, shell=True).returncode)
        except KeyboardInterrupt:       # subprocess.run has killed and reaped it
            sh.keys.interrupted = True
            sh.echo("^C")
            return INTERRUPTED
    # No terminal: SIGINT (Keys) sends INT to the command's process group, a second one
    # KILL, as to a job. Polled, not awaited: the kernel may deliver the signal to any
    # of the shell's threads, and a main thread blocked in a wait for the command
    # would only notice it once the command ended by itself.
    sent, out = 0, None
    with sh.keys.watching() as keys:
        proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while out is None:
                try:
                    out, _ = proc.communicate(timeout=POLL)
                except subprocess.TimeoutExpired:
                    for _ in keys.poll(0):
                        sent += 1
                        with suppress(ProcessLookupError):
                            os.killpg(proc.pid, signal.SIGINT if sent == 1 else signal.SIGKILL)
        finally:
            if out is None:     # an exception: the command must not run on unwatched
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.stdout.close()
                proc.wait()
    sh.write_bytes(out)
    if sent:
        sh.echo("^C")
        return INTERRUPTED
    return exit_code(proc.returncode)
