"""Paged attention on the CPU in C: the KV blocks read in place through the block table.

The cpu driver's torch path gathers each sequence's whole padded KV per layer; the C
kernel (csrc/paged_attention.c) walks the block table instead, with an online softmax
per (sequence, KV head), the query heads of a KV head together, OpenMP over the tiles.

The C file is compiled on first use with the system compiler ($CC, else cc or gcc) into
the user's cache ($XDG_CACHE_HOME or ~/.cache, then llmos/), under a name hashed from
the source, the flags and this CPU's feature flags, so a rebuilt source or a different
CPU gets its own library. The build writes a temporary file and renames it, so processes
building at once never load a half-written library. ctypes.CDLL releases the GIL during
a call. Where no compiler is found or the build fails, available() is False and
unavailable_reason() says why; the driver then keeps its torch path.
LLMOS_CPU_ATTENTION=torch forces that (to compare the two).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).parent / "csrc" / "paged_attention.c"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
LIBS = ("-lm",)
ENV_VAR = "LLMOS_CPU_ATTENTION"       # "torch": never use the C kernel
COMPILE_TIMEOUT = 120                 # s: a loaded 2-core box can be slow
DTYPES = {torch.float32: 0, torch.bfloat16: 1}

# The C entry point's error codes (enum in the C file), as messages for ValueError.
_ERRORS = {
    1: "bad shapes (H must be a multiple of Hkv; block size and D positive)",
    2: "query_start_loc must start at 0, never decrease and end at the number of tokens",
    3: "seq_lens[{s}] is shorter than its new tokens or longer than its block table",
    4: "block_tables[{s}] names a block outside the cache within the sequence's length",
    5: "out of memory for the attention's working buffers",
}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_reason: str | None = None            # why _lib is None once a load was tried


def available() -> bool:
    """True when the C kernel is built (or could be built now) and loaded."""
    return unavailable_reason() is None


def unavailable_reason() -> str | None:
    """Why the C kernel cannot be used, in words; None when it can. Builds it on first call."""
    if os.environ.get(ENV_VAR, "").strip().lower() == "torch":
        return f"{ENV_VAR}=torch"
    _load()
    return _reason


def library_path() -> Path:
    """Where the library for this source, these flags and this CPU is (or will be) cached."""
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(FLAGS + LIBS).encode(), _cpu_flags_line()):
        h.update(part)
        h.update(b"\0")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llmos" / f"paged_attention-{h.hexdigest()[:16]}.so"


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                    seq_lens: Tensor, query_start_loc: Tensor, scale: float,
                    num_threads: int | None = None) -> Tensor:
    """The Driver's paged_attention (drivers/base.py), o [T, H, D] in q's dtype.

    q, k_cache and v_cache: float32 or bfloat16, one dtype, on the CPU; the caches
    contiguous (they are read in place). The metadata is used as int32 (copied only if
    it is not already). num_threads: OpenMP threads, torch.get_num_threads() by default.
    Raises ValueError on shapes, dtypes or metadata that break the contract, and
    RuntimeError when the kernel is not available (check available() first).
    """
    lib = _library()
    q = q.contiguous()
    T, H, D = _check_tensors(q, k_cache, v_cache)
    num_blocks, block_size, Hkv, _ = k_cache.shape
    tables = _int32(block_tables, "block_tables", 2)
    lens = _int32(seq_lens, "seq_lens", 1)
    starts = _int32(query_start_loc, "query_start_loc", 1)
    S = lens.shape[0]
    if tables.shape[0] != S or starts.shape[0] != S + 1:
        raise ValueError(f"block_tables {tuple(tables.shape)}, seq_lens {tuple(lens.shape)} and "
                         f"query_start_loc {tuple(starts.shape)} disagree on the sequences")
    out = torch.empty_like(q)
    bad = ctypes.c_int32(-1)
    rc = lib.llmos_paged_attention(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(),
        tables.data_ptr(), lens.data_ptr(), starts.data_ptr(), T, S, tables.shape[1],
        num_blocks, block_size, H, Hkv, D, DTYPES[q.dtype], scale,
        num_threads or torch.get_num_threads(), ctypes.byref(bad))
    if rc:
        message = _ERRORS.get(rc, f"error {rc}").format(s=bad.value)
        if rc == 5:
            raise MemoryError(message)
        raise ValueError(f"paged_attention: {message}")
    return out


def _check_tensors(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> tuple[int, int, int]:
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"paged_attention: q must be [T, H, D] and both caches "
                         f"[num_blocks, block_size, Hkv, D], got q {tuple(q.shape)}, "
                         f"k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    T, H, D = q.shape
    Hkv = k_cache.shape[2]
    if k_cache.shape[3] != D or Hkv == 0 or H % Hkv:
        raise ValueError(f"paged_attention: q {tuple(q.shape)} does not fit caches "
                         f"{tuple(k_cache.shape)} (same D; H a multiple of Hkv)")
    if q.dtype not in DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"paged_attention: q, k_cache and v_cache must share one dtype of "
                         f"float32, bfloat16; got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.device.type != "cpu":
            raise ValueError(f"paged_attention: {name} is on {t.device}, not the CPU")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("paged_attention: k_cache and v_cache must be contiguous")
    return T, H, D


def _int32(t: Tensor, name: str, dim: int) -> Tensor:
    """t as a contiguous int32 CPU tensor: t itself when it already is one."""
    if not isinstance(t, Tensor):
        t = torch.as_tensor(t)
    if t.dim() != dim or t.dtype.is_floating_point or t.dtype.is_complex:
        raise ValueError(f"paged_attention: {name} must be a {dim}-D integer tensor, "
                         f"got {t.dtype} {tuple(t.shape)}")
    if t.dtype != torch.int32 or t.device.type != "cpu":
        t = t.to("cpu", torch.int32)
    return t if t.is_contiguous() else t.contiguous()


def _library() -> ctypes.CDLL:
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"the C paged attention is not available: {reason}")
    return _lib


def _load() -> None:
    """Build (if not cached) and load the library, once per process; sets _lib or _reason."""
    global _lib, _reason
    if _lib is not None or _reason is not None:
        return
    with _lock:
        if _lib is not None or _reason is not None:
            return
        if not SOURCE.exists():
            _reason = f"the C source {SOURCE} is missing (installed without its package data?)"
            return
        try:
            path = library_path()
            if not path.exists():
                _build(path)
            lib = ctypes.CDLL(str(path))
            _declare(lib)
            _lib = lib
        except _BuildFailed as e:
            _reason = str(e)
        except (OSError, AttributeError) as e:    # AttributeError: no entry point in it
            _reason = f"cannot load the built library: {e}"


class _BuildFailed(Exception):
    pass


def _build(path: Path) -> None:
    """Compile SOURCE to path through a temporary file in the same folder, then rename."""
    cc = _compiler()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".so", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise _BuildFailed(f"cannot write the cache folder {path.parent}: {e}") from None
    try:
        cmd = [*cc, *FLAGS, str(SOURCE), "-o", tmp, *LIBS]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise _BuildFailed(f"cannot run the C compiler {cc[0]}: {e}") from None
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip()[-800:]
            raise _BuildFailed(f"the C compiler failed ({shlex.join(cmd)}): {tail}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _compiler() -> list[str]:
    cc = os.environ.get("CC", "").strip()
    if cc:
        return shlex.split(cc)
    found = shutil.which("cc") or shutil.which("gcc")
    if found is None:
        raise _BuildFailed("no C compiler: set CC, or install gcc")
    return [found]


def _cpu_flags_line() -> bytes:
    """The first CPU's feature line: -march=native builds for exactly these features."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            for line in f:
                if line.startswith((b"flags", b"Features")):
                    return line.strip()
    except OSError:
        pass
    return platform.machine().encode()


def _declare(lib: ctypes.CDLL) -> None:
    i32, ptr = ctypes.c_int32, ctypes.c_void_p
    fn = lib.llmos_paged_attention
    fn.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, i32, i32, i32, i32, i32, i32, i32, i32,
                   i32, ctypes.c_float, i32, ctypes.POINTER(i32)]
    fn.restype = i32
