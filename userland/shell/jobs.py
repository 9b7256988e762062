"""The shell's jobs: the processes it started with `run`, numbered as a job shell numbers
them (%1, %2, ...).

The table owns each job's exit status: one waiter thread per job is the only caller of
wait() for its pid, so `fg`, `wait` and the exit notice all read the status from here and
never race each other to collect it. Whether a job runs or is stopped is the kernel's to
say (ps); the table keeps only what needs the shell's memory: the job number, the
command as typed, and whether the user put it in the background.
"""
from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field

from llmos.syscalls import KernelDead, SyscallError
from llmos.userland.cmdline import exit_code

WAIT_CHUNK = 1.0        # s per wait() call of a waiter: it notices a closing shell this often


class JobError(Exception):
    """A job spec that names no job of this shell (the message says which)."""


@dataclass
class Job:
    id: int
    pid: int
    command: str                       # as the user typed it
    background: bool                   # an exit notice is due when it ends (guarded by the table's lock)
    status: int | None = None          # exit status once exited; -N: killed by signal N
    lost: str | None = None            # why the status will never come (the kernel went away)
    shown: int = 0                     # bytes of its log shown in the foreground so far
    touched: int = 0                   # when it was last started, stopped, fg'd or bg'd
    exited: threading.Event = field(default_factory=threading.Event)

    def describe(self) -> str:
        """How the job ended, as bash's job lines say it: Done, Exit N, Killed (SIGTERM)."""
        if self.lost:
            return "Lost"
        if self.status is None:
            return "Running"
        if self.status == 0:
            return "Done"
        if self.status > 0:
            return f"Exit {self.status}"
        return f"Killed ({signal_name(-self.status)})"

    def line(self, state: str, current: bool = False) -> str:
        """`[1]+ Done  pid 7 worker.py (exit 0)`"""
        tail = ""
        if self.exited.is_set():
            tail = f" ({self.lost})" if self.lost else f" (exit {exit_code(self.status)})"
        return f"[{self.id}]{'+' if current else ' '} {state:<8} pid {self.pid} {self.command}{tail}"


def signal_name(n: int) -> str:
    import signal
    try:
        return signal.Signals(n).name
    except ValueError:
        return f"signal {n}"


class JobTable:
    """Jobs by number. Each job's end is told once: by its waiter thread, which calls
    `notify(job, current)` when a job in the background exits (current: it was the
    current job), or by whoever has it in the foreground (take_report). A job leaves the
    table when its end is told."""

    def __init__(self, k, notify):
        self.k, self.notify = k, notify          # k: where new jobs start (Shell.attach)
        self._lock = threading.Lock()
        self._jobs: dict[int, Job] = {}          # guarded by _lock
        self._clock = itertools.count(1)          # orders the jobs' touches (guarded by _lock)
        self._closed = threading.Event()

    def start(self, argv: list[str], name: str, command: str, background: bool,
              nice: int | None = None) -> Job:
        """Spawn argv as a child of the shell and watch it. Raises SyscallError."""
        k = self.k                               # the job lives and dies with this kernel
        pid = k.spawn(argv, name=name, nice=nice)
        with self._lock:
            job = Job(max(self._jobs, default=0) + 1, pid, command, background,
                      touched=next(self._clock))
            self._jobs[job.id] = job
        threading.Thread(target=self._wait, args=(job, k), daemon=True,
                         name=f"llmos-shell-job-{job.id}").start()
        return job

    def _wait(self, job: Job, k) -> None:
        while not self._closed.is_set():
            try:
                done = k.wait_status(job.pid, timeout=WAIT_CHUNK)
            except KernelDead as e:
                job.lost = f"the kernel went away: {e.msg}"
                break
            except SyscallError as e:             # ECHILD/ESRCH: collected elsewhere
                job.lost = f"{e.code}: {e.msg}"
                break
            if done.exited:
                job.status = done.status
                break
        else:
            return
        if self._closed.is_set():
            return                                # the shell is leaving: nobody to tell
        with self._lock:
            job.exited.set()
            current = job is self._by_touch()[-1]
            due = job.background and self._jobs.pop(job.id, None) is not None
        if due:
            self.notify(job, current)

    def set_background(self, job: Job, background: bool) -> bool:
        """Move a job to the background (its exit notice is due) or the foreground, making
        it the current job; False if it already exited (take_report says whether its end
        is still to be told)."""
        with self._lock:
            if job.exited.is_set():
                return False
            job.background, job.touched = background, next(self._clock)
            return True

    def take_report(self, job: Job) -> bool:
        """The caller tells an exited job's end (it leaves the table): True, unless its
        waiter or another caller told it already."""
        with self._lock:
            return self._jobs.pop(job.id, None) is not None

    def jobs(self) -> list[Job]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.id)

    def _by_touch(self) -> list[Job]:
        return sorted(self._jobs.values(), key=lambda j: j.touched)

    def current(self) -> Job | None:
        """The job `fg`/`bg` act on without an argument (bash's `%+`): the one last
        started, stopped by Ctrl-Z, or moved by fg/bg."""
        with self._lock:
            jobs = self._by_touch()
        return jobs[-1] if jobs else None

    def find(self, spec: str | None) -> Job:
        """The job of `%N`, `%+`/`%%` (current), `%-` (the one before), or a pid of one of
        the jobs; the current job when spec is None. Raises JobError."""
        with self._lock:
            jobs = self._by_touch()
        if spec is None or spec in ("%", "%%", "%+"):
            if not jobs:
                raise JobError("no current job")
            return jobs[-1]
        if spec == "%-":
            if len(jobs) < 2:
                raise JobError("no previous job")
            return jobs[-2]
        if spec.startswith("%") and spec[1:].isdigit():
            match = [j for j in jobs if j.id == int(spec[1:])]
        elif spec.isdigit():
            match = [j for j in jobs if j.pid == int(spec)]
        else:
            raise JobError(f"{spec}: not a job (%N) or a pid")
        if not match:
            raise JobError(f"{spec}: no such job")
        return match[0]

    def pid_of(self, spec: str) -> int:
        """A pid given as a number (any process) or a job spec %N. Raises JobError."""
        if spec.isdigit():
            return int(spec)
        return self.find(spec).pid

    def close(self) -> None:
        """Stop the waiter threads (within WAIT_CHUNK); the processes go on."""
        self._closed.set()
