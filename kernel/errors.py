"""Errors the engine answers a caller's mistake with; each carries its syscall error code.

These are the caller tier of STYLE.md's two error tiers: a bad argument or an impossible
request. They subclass the ABI's SyscallError, so a syscall function lets them through
as they are. A broken invariant inside the engine is an assert or an exception of its own.
"""
from llmos.syscalls.errors import E2BIG, EBUSY, EINVAL, ENOMEM, ESRCH, SyscallError


class EngineError(SyscallError, ValueError):
    code = EINVAL

    def __init__(self, msg: str):
        super().__init__(type(self).code, msg)

    def __str__(self) -> str:
        return self.msg


class NoSuchContext(EngineError):
    code = ESRCH


class ContextBusy(EngineError):
    code = EBUSY


class KVOutOfMemory(EngineError):
    code = ENOMEM


class PromptTooLong(EngineError):
    code = E2BIG
