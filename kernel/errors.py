"""Errors the engine answers a caller's mistake with; each carries the syscall error code.

These are the caller tier of STYLE.md's two error tiers: a bad argument or an impossible
request. A broken invariant inside the engine is an assert or an exception of its own.
"""


class EngineError(ValueError):
    code = "EINVAL"


class NoSuchContext(EngineError):
    code = "ESRCH"


class ContextBusy(EngineError):
    code = "EBUSY"


class KVOutOfMemory(EngineError):
    code = "ENOMEM"
