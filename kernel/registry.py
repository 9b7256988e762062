"""The home's model registry: short names for model directories and GGUF files.

`HOME/models.toml` holds one table per name (written by `llmos models add`, read at boot):

    [models.smol]
    path = "/data/SmolLM2-135M-Instruct.gguf"
    dtype = "float32"          # optional: the dtype to load in (default: auto)
    quantize = "int8"          # optional: weight-only quantization at load
    keep_alive = 300.0         # optional: seconds idle before it is unloaded

What `model=` may name, in this order: a name the kernel was booted with (`--model`), a
registered name, "tiny" (the embedded model), or (the owner only) the path of a model
directory or .gguf file. `resolve` turns it into a ModelSpec, the model table's key; `open` gives the
spec's config and tokenizer (no weights), cached, for tokenizing on the I/O side.

Thread-safe: any thread, under the registry's own lock; opening a model directory (the
slow part) happens outside it.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import tomllib
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

from llmos.syscalls.errors import EEXIST, EINVAL, EIO, ENOENT, EPERM, SyscallError

from llmos.drivers.quant import QUANTIZE

from .config import CheckpointError
from .load import DTYPES, EMBEDDED

log = logging.getLogger("llmos.registry")
FILE = "models.toml"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")   # like Ollama's: no "/" (paths have one)
OPENED_KEPT = 16        # opened model directories (config + tokenizer) kept for tokenizing


@dataclass(frozen=True)
class ModelSpec:
    """A model as the kernel loads it: the model table's key is `name`."""
    name: str
    path: str                          # a model directory or a .gguf file, absolute
    dtype: str | None = None           # None: auto (load.pick_dtype)
    quantize: str | None = None        # None or "int8"
    keep_alive: float | None = None    # seconds idle before unloading; None: the kernel's default


class Registry:
    def __init__(self, home_path: str | os.PathLike | None):
        """home_path None: no file (an in-process kernel in tests): names live in memory."""
        self.file = Path(home_path) / FILE if home_path is not None else None
        self._lock = threading.Lock()
        self._booted: dict[str, ModelSpec] = {}      # --model names: not written to the file
        self._opened: OrderedDict = OrderedDict()    # (path, mtime) -> ModelDir
        self._names = self._read()

    # ---- names ------------------------------------------------------------------------
    def resolve(self, name: str, paths: bool = True) -> ModelSpec:
        """The spec `name` stands for (see the module docstring); a path only if `paths`.
        Raises ENOENT naming what there is, EPERM for a path when not `paths`."""
        with self._lock:
            spec = self._booted.get(name) or self._names.get(name)
        if spec is not None:
            return spec
        if name in EMBEDDED:
            return ModelSpec(name, str(EMBEDDED[name]))
        if "/" in name or name.endswith(".gguf"):
            if not paths:              # before any look at the file system: nothing to probe
                raise SyscallError(EPERM, f"model: {name!r}: only the owner names a model by "
                                          f"its path; use a registered name ({', '.join(self.names())})")
            path = _path(name)
            if path is not None and path.exists():
                return ModelSpec(name, str(path.resolve()))
        raise SyscallError(ENOENT, f"model: no model {name!r}: not a registered name "
                                   f"(there are: {', '.join(self.names()) or 'none'}), "
                                   f"not a model directory or .gguf file")

    def names(self) -> list[str]:
        """Every name resolve() knows besides paths: booted, registered, embedded."""
        with self._lock:
            return list(dict.fromkeys([*self._booted, *self._names, *EMBEDDED]))

    def registered(self) -> list[ModelSpec]:
        with self._lock:
            return list(self._names.values())

    def boot(self, spec: ModelSpec, mdir=None) -> None:
        """A model named at boot: known by its name for this run only. mdir: its ModelDir,
        already opened (kept as open() would)."""
        with self._lock:
            self._booted[spec.name] = spec
        if mdir is not None:
            self._keep(spec, mdir)

    def add(self, name: str, path: str, dtype: str | None = None,
            quantize: str | None = None, keep_alive: float | None = None) -> ModelSpec:
        """Register name -> path (which must open: config and tokenizer; checked here, so
        call it off the I/O thread) and save the file. Raises EINVAL (a bad name, option
        or model), EEXIST (the name is taken)."""
        if not NAME.fullmatch(name) or name in EMBEDDED:
            raise SyscallError(EINVAL, f"name: {name!r} is not a model name (letters, digits "
                                       f"and ._:- up to 64, not 'tiny')")
        if dtype not in (None, "auto", *DTYPES):
            raise SyscallError(EINVAL, f"dtype: {dtype!r} is not one of auto, {', '.join(DTYPES)}")
        if quantize not in (None, *QUANTIZE):
            raise SyscallError(EINVAL, f"quantize: {quantize!r} is not one of {', '.join(QUANTIZE)}")
        where = _path(path)
        if where is None:
            raise SyscallError(EINVAL, f"path: {path!r}: no such user's home")
        spec = ModelSpec(name, str(where.resolve()), None if dtype == "auto" else dtype,
                         quantize, keep_alive)
        self.open(spec)                                   # a model that cannot open: EINVAL
        with self._lock:
            if name in self._names or name in self._booted:
                raise SyscallError(EEXIST, f"name: model {name!r} is already registered")
            self._check_writable()
            self._names[name] = spec
            try:
                self._write()
            except (OSError, UnicodeError) as e:
                del self._names[name]                    # as it was: in memory and on disk
                raise SyscallError(EIO, f"{self.file}: cannot write: {e}") from None
        return spec

    def remove(self, name: str) -> ModelSpec:
        """Forget a registered name (a loaded model stays loaded until it is unloaded or
        the name is registered anew). Raises ENOENT, EINVAL (the file does not parse), EIO."""
        with self._lock:
            self._check_writable()
            if name not in self._names:
                raise SyscallError(ENOENT, f"name: no registered model {name!r}")
            spec = self._names.pop(name)
            try:
                self._write()
            except (OSError, UnicodeError) as e:
                self._names[name] = spec
                raise SyscallError(EIO, f"{self.file}: cannot write: {e}") from None
        return spec

    # ---- config and tokenizer ---------------------------------------------------------
    def open(self, spec: ModelSpec):
        """The spec's ModelDir (config, tokenizer; kernel/loader.py), cached by path and
        modification time. Slow the first time (reads the tokenizer): off the I/O thread.
        Raises EINVAL naming the file and what is wrong with it."""
        from .load import open_model
        try:
            key = (spec.path, os.stat(spec.path).st_mtime_ns)
        except OSError as e:
            raise SyscallError(EINVAL, f"model {spec.name!r}: {spec.path}: {e.strerror}") from None
        with self._lock:
            mdir = self._opened.get(key)
            if mdir is not None:
                self._opened.move_to_end(key)
                return mdir
        try:
            mdir = open_model(spec.path)
        except CheckpointError as e:
            raise SyscallError(EINVAL, f"model {spec.name!r}: {e}") from None
        self._keep(spec, mdir)
        return mdir

    def _keep(self, spec: ModelSpec, mdir) -> None:
        try:
            key = (spec.path, os.stat(spec.path).st_mtime_ns)
        except OSError:
            return
        with self._lock:
            self._opened[key] = mdir
            while len(self._opened) > OPENED_KEPT:
                self._opened.popitem(last=False)

    def opened(self, spec: ModelSpec):
        """The cached ModelDir of spec, or None if it was not opened yet (never slow)."""
        try:
            key = (spec.path, os.stat(spec.path).st_mtime_ns)
        except OSError:
            return None
        with self._lock:
            return self._opened.get(key)

    # ---- the file ---------------------------------------------------------------------
    def _read(self) -> dict[str, ModelSpec]:
        """The file's names. A file that does not parse is logged and left as it is (the
        kernel still boots; `models add` and `rm` refuse until it is mended, so it is never
        overwritten); an entry that makes no sense is logged and skipped."""
        self._unreadable = None
        if self.file is None or not self.file.exists():
            return {}
        try:
            tables = tomllib.loads(self.file.read_text(encoding="utf-8")).get("models", {})
            assert isinstance(tables, dict)
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, AssertionError) as e:
            log.error("%s: ignored, not a model registry: %s", self.file, e)
            self._unreadable = str(e) or "not a table of models"
            return {}
        names = {}
        for name, t in tables.items():
            try:
                dtype = _choice(t, "dtype", ("auto", *DTYPES))
                names[name] = ModelSpec(name, str(t["path"]), None if dtype == "auto" else dtype,
                                        _choice(t, "quantize", QUANTIZE),
                                        _keep_alive(t.get("keep_alive")))
            except (KeyError, TypeError, ValueError) as e:
                log.error("%s: model %r ignored: %s", self.file, name, e)
        return names

    def _check_writable(self) -> None:
        """Under the lock: EINVAL if the file did not parse at boot (it is not ours to lose)."""
        if self._unreadable is not None:
            raise SyscallError(EINVAL, f"{self.file}: does not parse ({self._unreadable}); mend "
                                       f"or remove it, then restart the kernel")

    def _write(self) -> None:
        """Under the lock: the file, replaced atomically."""
        if self.file is None:
            return
        lines = []
        for spec in self._names.values():
            lines.append(f"[models.{_toml_str(spec.name)}]")
            for key, value in asdict(spec).items():
                if key != "name" and value is not None:
                    lines.append(f"{key} = {_toml_str(value) if isinstance(value, str) else value}")
            lines.append("")
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text("\n".join(lines), encoding="utf-8")
        os.replace(tmp, self.file)


def _toml_str(s: str) -> str:
    """A TOML basic string: JSON's escapes are TOML's (not its surrogate pairs, so
    non-ASCII stays as it is; and TOML also escapes DEL)."""
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def _keep_alive(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    if math.isnan(value):
        raise ValueError("keep_alive: not a number")
    return value


def _choice(table: dict, key: str, allowed) -> str | None:
    value = table.get(key)
    if value is not None and value not in allowed:
        raise ValueError(f"{key}: {value!r} is not one of {', '.join(allowed)}")
    return value


def _path(text: str) -> Path | None:
    """text as a path, ~ expanded; None for a ~user that does not exist."""
    try:
        return Path(text).expanduser()
    except RuntimeError:
        return None
