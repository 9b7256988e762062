"""The llmos kernel: engine, scheduler, memory managers and models."""
from .engine import Engine
from .errors import ContextBusy, EngineError, KVOutOfMemory, NoSuchContext
from .request import Completion, Delta, Usage
from .sampling import SamplingParams

__all__ = ["Engine", "Completion", "Delta", "Usage", "SamplingParams", "EngineError",
           "NoSuchContext", "ContextBusy", "KVOutOfMemory"]
