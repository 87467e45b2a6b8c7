"""The CPU kernels of blocks.c, compiled once on first use and called through ctypes.

Every wrapper takes contiguous float32 CPU tensors (the llama runner's CPU path guarantees it)
and passes their data pointers; outputs are new tensors or the `out` given.

`library()` returns the loaded library, or None where it cannot run (not x86-64, no AVX2/FMA,
no C compiler): the llama runner then uses torch's own int4/int8 kernels, slower but the same
numbers up to rounding. The shared object is cached under `$TREECHAT_CACHE/kernels/`, named by
a hash of the source and the flags, so an edited kernel is rebuilt and nothing is rebuilt twice;
nodes starting together take a file lock and build it once.

The library links libgomp by soname: imported after torch (always: this module imports torch),
it shares torch's OpenMP thread pool rather than bringing a second one to fight it for cores.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger("treechat.engine")

SOURCE = Path(__file__).with_name("blocks.c")
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]
P = ctypes.c_void_p
I = ctypes.c_int64


def cpu_ok() -> bool:
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


@cache
def library() -> ctypes.CDLL | None:
    if os.environ.get("TREECHAT_NO_KERNELS") or not cpu_ok():
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.info("no C compiler here: the llama runner uses torch's own CPU kernels")
        return None
    from nodes.engine.models import cache_root
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
    target = cache_root() / "kernels" / f"blocks-{digest}.so"
    try:
        if not target.exists():
            build(compiler, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as e:
        log.warning("could not build the CPU kernels (%s); using torch's own", e)
        return None
    F, P_, I_ = ctypes.c_float, P, I
    lib.q4_1_matmul.argtypes = [P_, I_, I_, P_, P_, P_, I_, P_, ctypes.c_int]
    lib.q8_0_matmul.argtypes = [P_, I_, I_, P_, P_, I_, P_, ctypes.c_int]
    lib.rms_norm.argtypes = [P_, P_, I_, I_, F, P_]
    lib.rope.argtypes = [P_, I_, I_, I_, I_, P_, P_, P_]
    lib.silu_mul.argtypes = [P_, I_, I_, P_]
    lib.decode_attention.argtypes = [P_, I_, I_, I_, I_, I_, P_, P_, I_, P_, F, P_]
    return lib


def build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run([compiler, *FLAGS, "-o", str(tmp), str(SOURCE)], check=True,
                       capture_output=True)
        tmp.rename(target)
        log.info("built the CPU kernels into %s", target)


def _check(code: int, what: str) -> None:
    if code:
        raise MemoryError(f"{what}: no memory for its scratch")


def q4_1_matmul(x: torch.Tensor, qs, d, m, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] float32 @ Q4_1 blocks (qs uint8 [N, K/2], d, m float32 [N, K/32]) -> [M, N];
    with `out`, added into it."""
    y = torch.empty((x.shape[0], qs.shape[0]), dtype=torch.float32) if out is None else out
    _check(library().q4_1_matmul(x.data_ptr(), x.shape[0], x.shape[1], qs.data_ptr(),
                                 d.data_ptr(), m.data_ptr(), qs.shape[0], y.data_ptr(),
                                 out is not None), "q4_1_matmul")
    return y


def q8_0_matmul(x: torch.Tensor, q, d, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] float32 @ Q8_0 blocks (q int8 [N, K], d float32 [N, K/32]) -> [M, N]; with
    `out`, added into it."""
    y = torch.empty((x.shape[0], q.shape[0]), dtype=torch.float32) if out is None else out
    _check(library().q8_0_matmul(x.data_ptr(), x.shape[0], x.shape[1], q.data_ptr(),
                                 d.data_ptr(), q.shape[0], y.data_ptr(), out is not None),
           "q8_0_matmul")
    return y


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, out: torch.Tensor) -> torch.Tensor:
    library().rms_norm(x.data_ptr(), w.data_ptr(), x.shape[0], x.shape[1], eps, out.data_ptr())
    return out


def rope(qkv: torch.Tensor, heads: int, head_dim: int, pos: torch.Tensor, cos: torch.Tensor,
         sin: torch.Tensor) -> None:
    """In place on the first `heads` heads (queries, then keys) of each row of qkv."""
    library().rope(qkv.data_ptr(), qkv.shape[0], qkv.stride(0), heads, head_dim, pos.data_ptr(),
                   cos.data_ptr(), sin.data_ptr())


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    inter = gate_up.shape[1] // 2
    out = torch.empty((gate_up.shape[0], inter), dtype=torch.float32)
    library().silu_mul(gate_up.data_ptr(), gate_up.shape[0], inter, out.data_ptr())
    return out


def decode_attention(qkv: torch.Tensor, rows: int, heads: int, kv_heads: int, head_dim: int,
                     keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor, scale: float,
                     out: torch.Tensor) -> None:
    """Rows 0..rows-1 of qkv are cache rows 0..rows-1's new tokens (see blocks.c)."""
    _check(library().decode_attention(qkv.data_ptr(), rows, qkv.stride(0), heads, kv_heads,
                                      head_dim, keys.data_ptr(), values.data_ptr(),
                                      keys.shape[2], pos.data_ptr(), scale, out.data_ptr()),
           "decode_attention")
