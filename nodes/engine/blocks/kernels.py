"""kernels.c, compiled once on first use for this CPU's widest vector path, called through ctypes.

Three builds of one source: `avx512vnni` (-mavx512bw -mavx512vnni) on a CPU with AVX-512BW/VL
and VNNI, `avx512` on one without VNNI, else `avx2` (needs AVX2, FMA, F16C).
TREECHAT_KERNELS=avx2 (or avx512) forces a narrower one (the tests run each the CPU has);
TREECHAT_NO_KERNELS=1, or a CPU
without AVX2, or no C compiler, means no library: the runner then dequantizes the weights to
float once at load and runs torch's own operators (slower, and the weights' memory in float).

The shared object is cached under `$TREECHAT_CACHE/kernels/`, named by a hash of the source and
the flags, so an edited kernel is rebuilt and nothing is rebuilt twice; nodes starting together
take a file lock and build it once. The library links libgomp by soname: imported after torch
(always: this module imports torch), it shares torch's OpenMP thread pool rather than bringing a
second one to fight it for cores. Products of many rows call the BLAS `sgemm_` that torch's own
library carries (MKL on x86 wheels); without it they stay on the integer kernels.
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

from nodes.engine.paths import cache_root

log = logging.getLogger("treechat.engine")

SOURCE = Path(__file__).with_name("kernels.c")
BASE_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"]
PATHS = ("avx2", "avx512", "avx512vnni")
P, I, F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def paths_here() -> list[str]:
    """The vector paths this CPU runs, narrowest first."""
    flags = cpu_flags()
    if platform.machine() not in ("x86_64", "AMD64") or not {"avx2", "fma", "f16c"} <= flags:
        return []
    if not {"avx512f", "avx512bw", "avx512vl"} <= flags:
        return ["avx2"]
    return ["avx2", "avx512"] + (["avx512vnni"] if "avx512_vnni" in flags else [])


def vector_path() -> str | None:
    """The widest path this CPU runs (or the one TREECHAT_KERNELS asks for), None if none."""
    has = paths_here()
    if not has:
        return None
    asked = os.environ.get("TREECHAT_KERNELS")
    if asked:
        if asked not in PATHS:
            raise ValueError(f"TREECHAT_KERNELS={asked}: use one of {', '.join(PATHS)}")
        if asked not in has:
            raise ValueError(f"TREECHAT_KERNELS={asked}: this CPU has only {', '.join(has)}")
        return asked
    return has[-1]


def build_flags(path: str) -> list[str]:
    """avx512 is AVX-512's base (Skylake-X); avx512vnni adds VNNI and, where the CPU has it,
    AVX512_BF16 (one instruction rounds floats to bfloat16; the others do it in integers)."""
    wide = ["-mavx512f", "-mavx512bw", "-mavx512vl"]
    vnni = wide + ["-mavx512vnni"] + (["-mavx512bf16"] if "avx512_bf16" in cpu_flags() else [])
    return BASE_FLAGS + {"avx2": [], "avx512": wide, "avx512vnni": vnni}[path]


class Linear(ctypes.Structure):
    _fields_ = [("type", I), ("w", P), ("n", I), ("k", I), ("row_bytes", I), ("bias", P)]


class Layer(ctypes.Structure):
    _fields_ = [("attn_norm", P), ("mlp_norm", P), ("q_norm", P), ("k_norm", P),
                ("post_attn_norm", P), ("post_mlp_norm", P), ("qkv", Linear * 3), ("o", Linear),
                ("gate_up", Linear * 2), ("down", Linear), ("qkv_parts", I),
                ("gate_up_parts", I), ("cos", P), ("sin", P), ("window", I)]


class Stack(ctypes.Structure):
    _fields_ = [("layers", I), ("hidden", I), ("heads", I), ("kv_heads", I), ("head_dim", I),
                ("inter", I), ("eps", F), ("scale", F), ("softcap", F), ("act", I), ("neox", I),
                ("rot", I), ("layer", ctypes.POINTER(Layer))]


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def buildable() -> bool:
    """Whether this machine should have the library: a CPU with AVX2 and a C compiler (where
    it is, a failed build is a bug: the tests fail rather than skip)."""
    return vector_path() is not None and compiler() is not None


@cache
def library() -> ctypes.CDLL | None:
    if os.environ.get("TREECHAT_NO_KERNELS"):
        return None
    path = vector_path()
    if path is None:
        log.info("this CPU has no AVX2/FMA: the runner uses torch's own operators")
        return None
    compiler_ = compiler()
    if compiler_ is None:
        log.info("no C compiler here: the runner uses torch's own operators")
        return None
    flags = build_flags(path)
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:16]
    target = cache_root() / "kernels" / f"kernels-{path}-{digest}.so"
    try:
        if not target.exists():
            build(compiler_, flags, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as e:
        log.warning("could not build the CPU kernels (%s); using torch's own operators", e)
        return None
    P_, I_ = P, I
    lib.matmul.argtypes = [ctypes.POINTER(Linear), P_, I_, P_, ctypes.c_int, ctypes.c_int]
    lib.dequantize_rows.argtypes = [ctypes.c_int, P_, I_, I_, P_, I_, I_, P_]
    lib.repack_panels.argtypes = [ctypes.c_int, P_, I_, I_, P_]
    lib.dequantize_rows_bf16.argtypes = [ctypes.c_int, P_, I_, I_, P_, I_, I_, P_]
    lib.rms_norm.argtypes = [P_, P_, I_, I_, F, P_]
    lib.rope.argtypes = [P_, I_, I_, I_, I_, I_, P_, P_, P_, I_]
    lib.glu.argtypes = [P_, I_, I_, I_, P_]
    lib.attention.argtypes = [P_, I_, I_, I_, I_, I_, P_, P_, I_, P_, P_, F, I_, F, P_]
    lib.layers_forward.argtypes = [ctypes.POINTER(Stack), P_, I_, I_, P_, P_, P_, P_, I_, I_]
    lib.set_sgemm.argtypes = [P_]
    lib.set_gemm16.argtypes = [P_]
    sgemm = torch_sgemm()
    if sgemm is not None:
        lib.set_sgemm(sgemm)
    use_bf16(lib, bf16_in_hardware())
    log.info("CPU kernels: the %s path (%d-bit vectors%s)", path, lib.vector_bits() & ~1,
             ", VNNI" if lib.vector_bits() & 1 else "")
    return lib


def _tensor_at(address: int, shape: tuple[int, int], dtype: torch.dtype,
               stride: int | None = None) -> torch.Tensor:
    """The memory at `address` as a tensor (no copy): rows `stride` elements apart."""
    rows, cols = shape
    stride = stride or cols
    size = ((rows - 1) * stride + cols) * dtype.itemsize
    flat = torch.frombuffer((ctypes.c_char * size).from_address(address), dtype=dtype)
    return flat.as_strided(shape, (stride, 1))


def _bf16_gemm(x: int, m: int, k: int, w: int, n: int, y: int, ldy: int, acc: int) -> int:
    """kernels.c's gemm16: y[m, n] (+)= x[m, k] . w[n, k]^T, x and w bfloat16, y float32; torch
    runs it (oneDNN's bfloat16 GEMM where the CPU has AVX512_BF16). Its output is bfloat16,
    widened into y."""
    try:
        out = torch.mm(_tensor_at(x, (m, k), torch.bfloat16),
                       _tensor_at(w, (n, k), torch.bfloat16).t())
        target = _tensor_at(y, (m, n), torch.float32, ldy)
        target.add_(out) if acc else target.copy_(out)
        return 0
    except Exception:  # an exception must not cross into C
        log.exception("the bfloat16 GEMM failed")
        return 1


# Prompt rows (the runner marks them: runner.py) go through torch's bfloat16 GEMM where the CPU
# multiplies bfloat16 in hardware.
BF16_GEMM = ctypes.CFUNCTYPE(ctypes.c_int, P, I, I, P, I, P, I, ctypes.c_int)(_bf16_gemm)


def bf16_in_hardware() -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def use_bf16(lib: ctypes.CDLL, on: bool) -> None:
    """Prompt rows through torch's bfloat16 GEMM (on), or not (then products of 128 rows or
    more through float32 sgemm, fewer on the 8-bit kernels)."""
    lib.set_gemm16(ctypes.cast(BF16_GEMM, P).value if on else None)


def torch_sgemm() -> int | None:
    """The address of the BLAS sgemm_ inside torch's CPU library, or None."""
    lib = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        return ctypes.cast(ctypes.CDLL(str(lib)).sgemm_, P).value
    except (OSError, AttributeError):
        return None


def build(compiler: str, flags: list[str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run([compiler, *flags, "-o", str(tmp), str(SOURCE)], check=True,
                       capture_output=True)
        tmp.rename(target)
        log.info("built the CPU kernels into %s", target)


def check(code: int, what: str) -> None:
    if code == -2:
        raise ValueError(f"{what}: a tensor type the kernels do not read")
    if code == -3:
        raise RuntimeError(f"{what}: the bfloat16 GEMM failed (the log says why)")
    if code:
        raise MemoryError(f"{what}: no memory for its scratch")
