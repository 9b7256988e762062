"""Syscall numbers: the one numbering of every call an agent can make (xv6 `syscall.h`).

Append-only: never renumber, never reuse a number, only append at the end. A number is
what travels on the wire; names are for people and logs.
"""
from enum import IntEnum


class Sys(IntEnum):
    # Never renumber, only append.
    PING = 0
    HELLO = 1
    SYSCALLS = 2
    SYSINFO = 3
    SPAWN = 4
    EXIT = 5
    WAIT = 6
    KILL = 7
    PS = 8
    GETPID = 9
    NICE = 10
    GENERATE = 11
    CANCEL = 12
    CONTEXT_CREATE = 13
    CONTEXT_FORK = 14
    CONTEXT_FREE = 15
    CONTEXT_INFO = 16
    TOKENIZE = 17
    DETOKENIZE = 18
    MEMINFO = 19
    MODELS = 20
    SCHED = 21
    SETRLIMIT = 22
    GETRLIMIT = 23
    MODEL_LOAD = 24
    MODEL_UNLOAD = 25
    MODEL_ADD = 26
    MODEL_RM = 27
    METRICS = 28


def sys_name(nr: int) -> str:
    """The lower-case name of syscall `nr` ("generate"), or "sys_<nr>" for an unknown one."""
    try:
        return Sys(nr).name.lower()
    except ValueError:
        return f"sys_{nr}"
