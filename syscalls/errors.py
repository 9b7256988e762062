"""Syscall error codes and the exceptions that carry them.

These are the caller tier of STYLE.md's two error tiers: an error reply on the wire,
`{"code": "EINVAL", "msg": "..."}`. A broken invariant inside the kernel is not a
SyscallError; the dispatcher turns it into EIO and a log line.
"""

ENOSYS = "ENOSYS"        # no such syscall number (or no handler registered for it)
EINVAL = "EINVAL"        # bad or missing argument; the message names it
E2BIG = "E2BIG"          # a message, string or list over its limit
EPROTO = "EPROTO"        # not a v1 message: undecodable, wrong version, bad header
EACCES = "EACCES"        # not authenticated: no successful hello yet, or a wrong token
# The kernel's words for a call on a connection that has not said hello: a client that
# did say hello gets them only from a kernel started anew on the same endpoint.
NOT_HELLOED = "say hello first"
EPERM = "EPERM"          # authenticated, but not allowed
ESRCH = "ESRCH"          # no such process or context
ENOENT = "ENOENT"        # no such model (or other named thing)
EEXIST = "EEXIST"        # the name is taken (models add)
ENOMEM = "ENOMEM"        # out of KV memory (or over a per-process cap)
EAGAIN = "EAGAIN"        # a queue is full; try again later
ECANCELED = "ECANCELED"  # the call was cancelled (by the caller, a signal, or shutdown)
EBUSY = "EBUSY"          # the resource is in use (a context with a generate running)
ECHILD = "ECHILD"        # wait: no such child
EINTR = "EINTR"          # a blocking call was interrupted by a signal
EIO = "EIO"              # the kernel failed internally; see its log
ETIMEDOUT = "ETIMEDOUT"  # client side: the call's own deadline passed
EDEAD = "EDEAD"          # client side: the kernel stopped answering (KernelDead)

CODES = frozenset({ENOSYS, EINVAL, E2BIG, EPROTO, EACCES, EPERM, ESRCH, ENOENT, EEXIST, ENOMEM, EAGAIN,
                   ECANCELED, EBUSY, ECHILD, EINTR, EIO, ETIMEDOUT, EDEAD})


class SyscallError(Exception):
    """A syscall failed with `code` (one of CODES, or any code a newer kernel sends).

    The one base of every caller-tier error on both sides: the kernel's own errors
    (the engine's EngineError and its kinds) subclass it, so whatever a syscall
    function raises reaches the caller as its code and message.
    """

    def __init__(self, code: str, msg: str = ""):
        super().__init__(f"{code}: {msg}" if msg else code)
        self.code = code
        self.msg = msg


class WireError(SyscallError):
    """A request that could not be decoded; `call_id` is its id if the header had one, else None."""

    def __init__(self, code: str, msg: str, call_id=None):
        super().__init__(code, msg)
        self.call_id = call_id


class CallTimeout(SyscallError):
    """Client side: a call's own deadline passed (the kernel is alive but slow)."""

    def __init__(self, msg: str):
        super().__init__(ETIMEDOUT, msg)


class KernelDead(SyscallError):
    """Client side: the kernel stopped answering; every waiting and later call raises this."""

    def __init__(self, msg: str = "kernel is not answering"):
        super().__init__(EDEAD, msg)
