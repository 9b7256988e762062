"""The llmos kernel: engine, scheduler, memory managers, models, processes.

The engine's names are loaded on first use, so that `llmos.kernel.proc` or
`llmos.kernel.home` can be imported without pulling in torch. `python -m llmos.kernel`
runs the daemon (kernel/boot.py).
"""
import importlib

_LAZY = {
    "Engine": ".engine", "EngineError": ".errors", "NoSuchContext": ".errors",
    "ContextBusy": ".errors", "KVOutOfMemory": ".errors", "RequestOutput": ".request",
    "SamplingParams": ".sampling",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'llmos.kernel' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value
