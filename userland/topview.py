"""The live view of `llmos top`: a full-screen prompt_toolkit application over top.py's
pure parts (render, arrange), refreshed every delay seconds, with keys:

    s sort (the same column again reverses)   k kill (asks PID, then signal)
    n renice (asks PID, then nice value)      f filter by name   t tree view   q quit

A key that needs an answer asks on the bottom line (Enter confirms, Esc cancels); the
bottom line otherwise shows the key help, or the result or error of the last action.

Threads: the application runs on its own asyncio loop (the UI). Every syscall (the
refresh's snapshot, kill, nice) runs on a daemon thread of its own (off_loop), so a slow
kernel never freezes the keys, and neither quitting nor the program's exit waits for
one. TopView's state is changed on the UI loop only; text() may be read from any thread.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import threading
from dataclasses import dataclass
from typing import Callable

import psutil
from prompt_toolkit.application import Application
from prompt_toolkit.buffer import Buffer
from prompt_toolkit.filters import Condition
from prompt_toolkit.key_binding import KeyBindings
from prompt_toolkit.layout import (BufferControl, ConditionalContainer, FormattedTextControl,
                                   HSplit, Layout, Window)
from prompt_toolkit.layout.processors import BeforeInput

from llmos.syscalls import SyscallError
from llmos.userland.cmdline import error_line, signal_arg
from llmos.userland.top import Order, Rates, arrange, column, read, render

HELP = "s sort  k kill  n renice  f filter  t tree  q quit"


@dataclass(frozen=True)
class Question:
    """What the bottom line asks; answer(text) runs on the UI loop when Enter confirms,
    and may raise ValueError (its message is shown) or ask the next question."""
    prompt: str
    answer: Callable[[str], None]


class TopView:
    """The live view of kernel k. run() blocks until the user quits, or until it has
    refreshed `iterations` times (each shown for delay seconds) if that is not None."""

    def __init__(self, k, delay: float = 0.5, input=None, output=None,
                 iterations: int | None = None):
        self.k, self.delay, self.iterations = k, delay, iterations
        # UI loop only:
        self.order = Order()
        self.question: Question | None = None
        self.message = ""                # the last action's result or error; "" shows HELP
        self._rates = Rates()
        self._snap, self._snap_rates = None, {}     # the last snapshot read, its rates
        self._rows: list = []            # (depth, ProcInfo) shown now
        self._read_failed = False
        self._wake: asyncio.Event | None = None      # set: refresh now, not after delay
        # Written on the UI loop, read by text() from any thread: immutable strings.
        self._table = "llmos top - reading the kernel..."
        self._answer = Buffer(multiline=False)
        self.app = self._application(input, output)

    # ---- what is shown -----------------------------------------------------------------

    def text(self) -> str:
        """The screen as plain text: the table, then the bottom line."""
        q = self.question
        bottom = q.prompt + self._answer.text if q else self.message or HELP
        return f"{self._table}\n{bottom}"

    def _application(self, input, output) -> Application:
        asking = Condition(lambda: self.question is not None)
        self._body = Window(FormattedTextControl(lambda: self._table, focusable=True),
                            wrap_lines=False)
        prompt = BeforeInput(lambda: self.question.prompt if self.question else "")
        self._ask = Window(BufferControl(self._answer, input_processors=[prompt]), height=1)
        bottom = Window(FormattedTextControl(lambda: self.message or HELP), height=1,
                        style="reverse")
        layout = Layout(HSplit([self._body, ConditionalContainer(self._ask, asking),
                                ConditionalContainer(bottom, ~asking)]),
                        focused_element=self._body)
        return Application(layout=layout, key_bindings=self._keys(asking), full_screen=True,
                           input=input, output=output)

    def _keys(self, asking) -> KeyBindings:
        kb = KeyBindings()
        for key, act in (("s", self._sort), ("k", self._kill), ("n", self._renice),
                         ("f", self._filter), ("t", self._tree)):
            kb.add(key, filter=~asking)(functools.partial(self._key, act))
        kb.add("q", filter=~asking)(lambda e: self._quit())
        kb.add("c-c")(lambda e: self._quit())
        kb.add("<sigint>")(lambda e: self._quit())
        kb.add("enter", filter=asking)(lambda e: self._confirm())
        kb.add("escape", filter=asking, eager=True)(lambda e: self._ask_next(None))
        return kb

    def _redraw(self) -> None:
        if self._snap is not None:
            self._rows = arrange(self._snap.procs, self.order)
            self._table = render(self._snap, self._snap_rates, self.order)
        self.app.invalidate()

    # ---- running -----------------------------------------------------------------------

    def run(self) -> None:
        """Show the view until q, Ctrl-C or the last iteration. Returns at once then, even
        with a syscall in flight (its thread ends when the kernel answers)."""
        psutil.cpu_percent(None)                     # primes the host CPU figure
        self.app.run(pre_run=lambda: self.app.create_background_task(self._refresh()))

    async def _refresh(self) -> None:
        """UI loop: read a snapshot off the loop, show it; again after delay or a wake."""
        self._wake = asyncio.Event()
        shown = 0
        while self.iterations is None or shown < self.iterations:
            self._wake.clear()
            try:
                snap = await off_loop(read, self.k)
            except SyscallError as e:
                self.message, self._read_failed = error_line(e), True
            else:
                if self._read_failed:
                    self.message, self._read_failed = "", False
                self._snap, self._snap_rates = snap, self._rates.add(snap)
            shown += 1                       # a refresh that failed counts too, as in top
            self._redraw()
            await pause(self._wake, self.delay)
        self._quit()

    def _quit(self) -> None:
        """UI loop: end run(); once (q and the last iteration may come in one turn)."""
        if not self.app.is_done:
            self.app.exit()

    def _syscall(self, done: str, fn, *args) -> None:
        """UI loop: run fn(*args) off the loop; then show `done` or its error, and refresh."""
        async def call():
            try:
                await off_loop(fn, *args)
                self.message = done
            except SyscallError as e:
                self.message = error_line(e)
            self._wake.set()
            self._redraw()
        self.app.create_background_task(call())

    # ---- questions ---------------------------------------------------------------------

    def _key(self, act, event) -> None:
        self.message = ""
        act()

    def _ask_next(self, question: Question | None) -> None:
        self.question = question
        self._answer.reset()
        self.app.layout.focus(self._ask if question else self._body)
        self.app.invalidate()

    def _confirm(self) -> None:
        q, text = self.question, self._answer.text
        self._ask_next(None)
        try:
            q.answer(text)
        except ValueError as e:
            self.message = str(e)
        self._redraw()

    # ---- the keys ----------------------------------------------------------------------

    def _sort(self) -> None:
        def answer(text):
            col = column(text) if text.strip() else self.order.column
            reverse = not self.order.reverse if col == self.order.column else False
            self.order = dataclasses.replace(self.order, column=col, reverse=reverse)
        self._ask_next(Question(f"sort by column [{self.order.column}]: ", answer))

    def _filter(self) -> None:
        def answer(text):
            self.order = dataclasses.replace(self.order, name=text.strip())
        self._ask_next(Question("filter by name (empty: all): ", answer))

    def _tree(self) -> None:
        self.order = dataclasses.replace(self.order, tree=not self.order.tree)
        self._redraw()

    def _kill(self) -> None:
        def answer_sig(pid, text):
            sig = signal_arg(text or "TERM")
            self._syscall(f"sent {sig} to {pid}", self.k.kill, pid, sig)
        self._ask_pid("signal", lambda pid: Question(
            "signal [TERM]: ", functools.partial(answer_sig, pid)))

    def _renice(self) -> None:
        def answer_nice(pid, text):
            try:
                value = int(text)
            except ValueError:
                raise ValueError(f"a nice value is a number -20..19, not {text!r}") from None
            self._syscall(f"nice of {pid} set to {value}", self.k.nice, value, pid)
        self._ask_pid("renice", lambda pid: Question(
            "nice value (-20..19): ", functools.partial(answer_nice, pid)))

    def _ask_pid(self, verb: str, then: Callable[[int], Question]) -> None:
        """Ask a pid (default: the first row shown), then ask then(pid)."""
        first = self._rows[0][1].pid if self._rows else None

        def answer(text):
            text = text.strip() or ("" if first is None else str(first))
            if not text.isdigit():
                raise ValueError(f"not a pid: {text!r}" if text else "no pid given")
            self._ask_next(then(int(text)))
        default = f" [{first}]" if first is not None else ""
        self._ask_next(Question(f"PID to {verb}{default}: ", answer))


async def pause(event: asyncio.Event, seconds: float) -> None:
    """Wait until event is set or seconds pass. A cancel always cancels: asyncio.wait_for
    (Python < 3.12) returns normally when the cancel meets the event being set, so a
    refresh loop on it outlived the view's exit and `top` hung on quitting."""
    waiting = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiting}, timeout=seconds)
    finally:
        waiting.cancel()


async def off_loop(fn, *args):
    """fn(*args) on a daemon thread of its own: its result, or the exception it raised."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    threading.Thread(target=_call, args=(loop, done, fn, args), name="llmos-top",
                     daemon=True).start()
    return await done


def _call(loop, done, fn, args) -> None:
    """Thread: run fn and hand its outcome to done's loop, unless the view is gone."""
    try:
        outcome = (fn(*args), None)
    except Exception as e:
        outcome = (None, e)
    with contextlib.suppress(RuntimeError):           # the loop closed: nobody waits
        loop.call_soon_threadsafe(_settle, done, *outcome)


def _settle(done, result, error) -> None:
    if done.cancelled():
        return
    if error is not None:
        done.set_exception(error)
    else:
        done.set_result(result)
