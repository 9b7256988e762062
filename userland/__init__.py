"""Userland: the agent SDK, the `llmos` command, and example agents.

    from llmos.userland import connect

The SDK's names load on first use, so `import llmos.userland` (and the CLI) stays light;
nothing here ever imports torch or the kernel's engine.
"""
import importlib

_LAZY = {"connect": ".attach"} | {name: ".sdk" for name in (
    "Kernel", "Context", "Completion", "Delta", "Usage", "Stream", "ProcInfo",
    "ProcState", "MemInfo", "ProcMem", "ModelInfo", "SysInfo", "ContextInfo", "WaitStatus",
    "Limits", "SchedInfo", "Metrics", "ModelMetrics", "ProcMetrics", "Histogram",
    "KernelNotRunning", "SyscallError", "KernelDead", "CallTimeout")}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'llmos.userland' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value
