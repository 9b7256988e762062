"""Signals as the kernel's kill takes them: by number or name, only those it passes on.

TERM, KILL and INT reach the process group and cancel the process's LLM work; STOP and
CONT also pause and resume it in the scheduler; HUP, USR1 and USR2 only reach the
process; 0 (NOSIG) asks whether the process exists and may be signalled.
"""
from __future__ import annotations

import signal

from llmos.syscalls.errors import EINVAL, SyscallError

NOSIG = 0                      # kill(pid, 0): check existence and permission only
_ALLOWED = {signal.SIGTERM, signal.SIGKILL, signal.SIGINT, signal.SIGHUP,
            signal.SIGUSR1, signal.SIGUSR2, signal.SIGSTOP, signal.SIGCONT}


def parse_signal(sig: int | str) -> int:
    """A signal number from 15, "TERM", "SIGTERM" or "sigterm"; 0 is kill's probe.

    Raises SyscallError EINVAL for anything not in TERM KILL INT HUP USR1 USR2 STOP CONT.
    """
    try:
        if isinstance(sig, str) and not sig.lstrip("-").isdigit():
            name = sig.upper()
            num = signal.Signals[name if name.startswith("SIG") else "SIG" + name]
        else:
            num = int(sig)
    except (KeyError, ValueError, TypeError):
        raise SyscallError(EINVAL, f"signal: unknown signal {sig!r}") from None
    if num != NOSIG and num not in _ALLOWED:
        raise SyscallError(EINVAL, f"signal: {sig!r} is not one of "
                           f"{' '.join(sorted(s.name[3:] for s in _ALLOWED))}")
    return int(num)


def signal_name(num: int) -> str:
    return signal.Signals(num).name[3:] if num else "0"
