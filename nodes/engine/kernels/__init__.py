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
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"]
P = ctypes.c_void_p
I = ctypes.c_int64


def cpu_ok() -> bool:
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return all(f" {flag}" in flags for flag in ("avx2", "fma", "f16c"))


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
    lib.attention.argtypes = [P_, I_, I_, I_, I_, I_, P_, P_, I_, P_, P_, F, P_]
    lib.dequantize.argtypes = [P_, P_, P_, I_, I_, I_, P_]
    lib.layers_forward.argtypes = [ctypes.POINTER(Stack), P_, I_, P_, P_, P_, P_, I_, I_]
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


# --- a whole stack of layers in one call (blocks.c: layers_forward) -----------------------------


class Linear(ctypes.Structure):
    _fields_ = [("w", P), ("d", P), ("m", P), ("bias", P), ("n", I), ("k", I), ("q4", I)]


class Layer(ctypes.Structure):
    _fields_ = [("attn_norm", P), ("mlp_norm", P), ("qkv", Linear), ("o", Linear),
                ("gate_up", Linear), ("down", Linear)]


class Stack(ctypes.Structure):
    _fields_ = [("layers", I), ("hidden", I), ("heads", I), ("kv_heads", I), ("head_dim", I),
                ("inter", I), ("eps", ctypes.c_float), ("scale", ctypes.c_float),
                ("layer", ctypes.POINTER(Layer)), ("cos", P), ("sin", P)]


def stack(model):
    """The C view of a LlamaModel's layers, or None when one of its linear layers is not in
    blocks the kernels read (dense float32 weights, or torch's fallback kernels). The model
    keeps the tensors alive; the view only points at them."""
    from nodes.engine.quant import Q4_1, Q8_0

    def linear(lin) -> Linear | None:
        if not isinstance(lin, (Q4_1, Q8_0)) or lin.fallback is not None:
            return None
        q4 = isinstance(lin, Q4_1)
        w = lin.qs if q4 else lin.q
        return Linear(w.data_ptr(), lin.d.data_ptr(), lin.m.data_ptr() if q4 else None,
                      None if lin.bias is None else lin.bias.data_ptr(), w.shape[0],
                      w.shape[1] * (2 if q4 else 1), int(q4))

    s = model.shape
    layers = (Layer * s.layers)()
    for i, layer in enumerate(model.layers):
        parts = [linear(getattr(layer, name)) for name in ("qkv", "o", "gate_up", "down")]
        if any(p is None for p in parts) or (parts[1].bias or parts[3].bias or parts[2].bias):
            return None
        layers[i] = Layer(layer.attn_norm.data_ptr(), layer.mlp_norm.data_ptr(), *parts)
    view = Stack(s.layers, s.hidden, s.heads, s.kv_heads, s.head_dim, s.intermediate, s.eps,
                 s.head_dim ** -0.5, layers, None, None)
    view.keep = layers  # the array must live as long as the view
    return view


def layers_forward(view: Stack, x: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor,
                   keys: torch.Tensor, values: torch.Tensor) -> None:
    """Every layer over x [T, hidden] in place (see blocks.c); keys/values: the whole cache."""
    _check(library().layers_forward(ctypes.byref(view), x.data_ptr(), x.shape[0],
                                    rows.data_ptr(), pos.data_ptr(), keys.data_ptr(),
                                    values.data_ptr(), keys.shape[1], keys.shape[3]),
           "layers_forward")


def _check(code: int, what: str) -> None:
    if code:
        raise MemoryError(f"{what}: no memory for its scratch")


def q4_1_matmul(x: torch.Tensor, qs, d, m, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] float32 @ Q4_1 blocks (qs uint8 [N, K/2], d, m float16 [N, K/32]) -> [M, N];
    with `out`, added into it."""
    y = torch.empty((x.shape[0], qs.shape[0]), dtype=torch.float32) if out is None else out
    _check(library().q4_1_matmul(x.data_ptr(), x.shape[0], x.shape[1], qs.data_ptr(),
                                 d.data_ptr(), m.data_ptr(), qs.shape[0], y.data_ptr(),
                                 out is not None), "q4_1_matmul")
    return y


def q8_0_matmul(x: torch.Tensor, q, d, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] float32 @ Q8_0 blocks (q int8 [N, K], d float16 [N, K/32]) -> [M, N]; with
    `out`, added into it."""
    y = torch.empty((x.shape[0], q.shape[0]), dtype=torch.float32) if out is None else out
    _check(library().q8_0_matmul(x.data_ptr(), x.shape[0], x.shape[1], q.data_ptr(),
                                 d.data_ptr(), q.shape[0], y.data_ptr(), out is not None),
           "q8_0_matmul")
    return y


_scratch: dict[str, torch.Tensor] = {}


def dequantize(w: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None, q4: bool,
               k: int) -> torch.Tensor:
    """The float32 matrix of blocked weights, into a buffer reused from call to call (only the
    engine thread calls it; the result is valid until the next call)."""
    n = w.shape[0]
    buf = _scratch.get("dense")
    if buf is None or buf.numel() < n * k:
        buf = _scratch["dense"] = torch.empty(n * k, dtype=torch.float32)
    out = buf[:n * k].view(n, k)
    library().dequantize(w.data_ptr(), d.data_ptr(), None if m is None else m.data_ptr(),
                         int(q4), n, k, out.data_ptr())
    return out


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


def attention(qkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int, keys: torch.Tensor,
              values: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, scale: float,
              out: torch.Tensor) -> None:
    """Every token of qkv at (cache row rows[t], position pos[t]): its key and value into the
    float16 cache, then its queries over that row's positions 0..pos[t] (see blocks.c)."""
    _check(library().attention(qkv.data_ptr(), qkv.shape[0], qkv.stride(0), heads, kv_heads,
                               head_dim, keys.data_ptr(), values.data_ptr(), keys.shape[2],
                               rows.data_ptr(), pos.data_ptr(), scale, out.data_ptr()),
           "attention")
