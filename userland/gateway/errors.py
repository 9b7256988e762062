"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}} with the
HTTP status OpenAI's clients map to their exception classes."""
from __future__ import annotations

from llmos.syscalls import SyscallError

# The kernel's error code -> (HTTP status, OpenAI error type). A caller's mistake is 400
# with the kernel's own message; a limit or a full queue is 429 (clients retry it).
STATUS = {
    "EINVAL": (400, "invalid_request_error"),
    "E2BIG": (400, "invalid_request_error"),
    "ENOENT": (404, "invalid_request_error"),
    "EAGAIN": (429, "rate_limit_error"),
    "ENOMEM": (429, "rate_limit_error"),
    "EPERM": (403, "permission_error"),
    "EACCES": (403, "permission_error"),
    "EBUSY": (409, "conflict_error"),
    "EDEAD": (503, "service_unavailable"),
    "ECANCELED": (499, "cancelled"),       # nginx's "client closed request": nobody reads it
}
TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         405: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}


class ApiError(Exception):
    """An answer other than 200: status, message, and the parameter at fault."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or TYPES.get(status, "server_error" if status >= 500 else
                                      "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}

    @classmethod
    def of(cls, e: SyscallError) -> "ApiError":
        """The API's answer to a kernel error: its message, and the status of its code.
        ENOMEM for a request that can never fit the pool is the caller's 400 (a retry
        cannot help); other ENOMEMs (a kv_blocks limit, the pool full now) are 429."""
        status, kind = STATUS.get(e.code, (500, "server_error"))
        if e.code == "ENOMEM" and "but the pool holds" in e.msg:
            status, kind = 400, "invalid_request_error"
        param = e.msg.split(":", 1)[0] if status == 400 and ":" in e.msg else None
        code = "model_not_found" if e.code == "ENOENT" else e.code
        return cls(status, f"{e.code}: {e.msg}" if e.msg else e.code,
                   param if param and " " not in param else None, code, kind)
