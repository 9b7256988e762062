"""What the shell does while something runs in the foreground: a job whose output it
shows, or a generation it streams. The terminal stays in raw mode meanwhile, so Ctrl-C
and Ctrl-Z arrive as keys (not as signals to the shell) and act on the job:

    Ctrl-C   the job gets INT (a second Ctrl-C: KILL); a generation is cancelled
    Ctrl-Z   the job gets STOP and the shell returns to its prompt ("Stopped")

Other keys typed meanwhile are kept for the next prompt (typeahead), as a terminal
keeps them. Without a terminal (a script, a pipe) there are no keys: SIGINT then
interrupts the foreground job the same way.
"""
from __future__ import annotations

import queue
import select
import threading
from contextlib import contextmanager

from llmos.syscalls import KernelDead, SyscallError

POLL = 0.1          # s between looks at the keys, the job's log and its exit


class Keys:
    """The keys typed while something runs in the foreground: poll() returns "c-c" and
    "c-z" presses and keeps any other key for the next prompt."""

    def __init__(self, inp):
        self.input = inp                # a prompt_toolkit Input, or None (no terminal)
        self._interrupted = 0           # SIGINTs seen without a terminal

    @contextmanager
    def watching(self):
        """Raw mode while the block runs; without a terminal, SIGINT counts as Ctrl-C."""
        if self.input is not None:
            with self.input.raw_mode():
                yield self
            return
        import signal
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)

    def _on_sigint(self, signum, frame) -> None:
        self._interrupted += 1

    def poll(self, timeout: float = POLL) -> list[str]:
        """Wait up to timeout for keys; the control keys pressed, in order."""
        if self.input is None:
            threading.Event().wait(timeout)
            found, self._interrupted = ["c-c"] * self._interrupted, 0
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
            else:
                kept.append(press)
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
                        sh.signal(job.pid, "STOP")
                        sh.jobs.set_background(job, True)
                        sh.echo("\n" + job.line("Stopped", current=True))
                        return None
                    sent += 1
                    sh.echo(f"\n[llmos: sending {'INT' if sent == 1 else 'KILL'} to pid {job.pid}]")
                    sh.signal(job.pid, "INT" if sent == 1 else "KILL")
        finally:
            if f is not None:
                sh.write_bytes(f.read())
                job.shown = f.tell()
                f.close()


_END = object()


def stream(sh, start) -> tuple[object | None, bool]:
    """Echo the deltas of the Stream that start() returns, as they come; Ctrl-C cancels it.
    Returns (its Completion or None, whether the user interrupted). Raises SyscallError.

    The stream is read on a thread of its own so that the keys are watched meanwhile; a
    cancel takes effect at its next delta (a request still queued ends when it starts).
    """
    deltas: queue.Queue = queue.Queue()
    cancel = threading.Event()

    def read():
        try:
            with start() as s:
                for delta in s:
                    deltas.put(delta)
                    if cancel.is_set():
                        return                 # leaving the block cancels it in the kernel
                deltas.put((_END, s.completion))
        except (SyscallError, KernelDead) as e:
            deltas.put((_END, e))

    reader = threading.Thread(target=read, daemon=True, name="llmos-shell-stream")
    reader.start()
    with sh.keys.watching() as keys:
        while True:
            try:
                item = deltas.get(timeout=POLL)
            except queue.Empty:
                item = None
            if isinstance(item, tuple) and item[0] is _END:
                if isinstance(item[1], BaseException):
                    raise item[1]
                return item[1], False
            if item is not None:
                sh.write(item.text)
            if "c-c" in keys.poll(0):
                cancel.set()
                sh.echo("^C")
                return None, True
