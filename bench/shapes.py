"""GGUF files of real model shapes with random weights: models ten times the default's size
without downloading one.

Process: `python -m bench.shapes --out DIR [--shape NAME ...] [--type Q4_K_M --type Q6_K ...]
[--keep-f16] [--seed N]`. For each shape it writes an F16 GGUF with the `gguf` package's writer
(`write_gguf`, importable), then makes each asked type from it with llama.cpp's own quantizer
(`../shared/peers/llama-server/quantize IN OUT TYPE`, or --quantize PATH), into DIR as
`SHAPE-TYPE.gguf` (`llama-3.2-1b-Q4_K_M.gguf`). A file that exists is skipped; the F16 file
this run made is deleted at the end unless --keep-f16 (or `--type F16`) asks for it. Prints
every file's size.

What a file holds:
    weights     seeded normal * 0.02 (one generator per tensor, seeded by (seed, tensor index));
                norm weights ones. llama.cpp's converter adds Gemma's +1 to its (1 + w) norm
                weights, so ones are Gemma's w = 0, as for the other families
    metadata    the keys llama.cpp reads for the architecture (llama, qwen3, gemma3): context,
                embedding, block count, feed-forward, heads, kv heads, key/value length, RMS
                epsilon, rope base, sliding window; Llama 3's rope scaling as the rope_freqs
                tensor, as llama.cpp's converter writes it. Gemma 3's 5 local : 1 global layer
                pattern, its local rope base (10,000) and query scale (1/sqrt(256)) are not
                keys: llama.cpp takes them from the architecture
    tokenizer   every tokenizer.* key of the default model's file (SmolLM2-135M-Instruct, GPT-2
                style BPE, 49,152 tokens, its ChatML template), the token list padded to the
                shape's vocabulary with NORMAL tokens `<pad_N>`: llama.cpp needs one token per
                embedding row, and a random model emits padding ids often, so they must print as
                text (an unused or control token prints nothing, and a stream of nothing has no
                time to first token)

Llama's q/k rows are not permuted as llama.cpp's converter does (random weights: no difference).
Shapes are the published config.json values of the Hugging Face models (`SHAPES`); `tiny-*`
shapes are for tests.
"""

from __future__ import annotations

import argparse
import math
import mmap
import os
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
QUANTIZE = REPO.parent / "shared" / "peers" / "llama-server" / "quantize"
TYPES = ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0", "Q4_1", "F16")


@dataclass(frozen=True)
class Shape:
    source: str  # the Hugging Face model whose config.json this is
    arch: str  # llama.cpp's architecture name
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rope_theta: float
    context: int
    rms_eps: float
    tied: bool = True
    llama3_rope: tuple | None = None  # (factor, low and high frequency factors, original context)
    sliding_window: int = 0  # Gemma 3: local layers' window
    swa_pattern: int = 0  # Gemma 3: every 6th layer global (llama.cpp hard-codes it)
    local_rope_theta: float = 0.0  # Gemma 3's local layers (llama.cpp hard-codes 10,000)
    query_pre_attn_scalar: float = 0.0  # Gemma 3: scores scaled by 1/sqrt(this)

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(llama.cpp tensor name, numpy shape: rows, columns) of every tensor, in file order."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        out = [("rope_freqs.weight", (self.head_dim // 2,))] if self.llama3_rope else []
        out.append(("token_embd.weight", (self.vocab, h)))
        for i in range(self.layers):
            b = f"blk.{i}."
            out += [(b + "attn_norm.weight", (h,)), (b + "attn_q.weight", (q, h)),
                    (b + "attn_k.weight", (kv, h)), (b + "attn_v.weight", (kv, h)),
                    (b + "attn_output.weight", (h, q))]
            if self.arch in ("qwen3", "gemma3"):
                out += [(b + "attn_q_norm.weight", (self.head_dim,)),
                        (b + "attn_k_norm.weight", (self.head_dim,))]
            if self.arch == "gemma3":
                out.append((b + "post_attention_norm.weight", (h,)))
            out += [(b + "ffn_norm.weight", (h,)), (b + "ffn_gate.weight", (self.intermediate, h)),
                    (b + "ffn_up.weight", (self.intermediate, h)),
                    (b + "ffn_down.weight", (h, self.intermediate))]
            if self.arch == "gemma3":
                out.append((b + "post_ffw_norm.weight", (h,)))
        out.append(("output_norm.weight", (h,)))
        if not self.tied:
            out.append(("output.weight", (self.vocab, h)))
        return out

    def parameters(self) -> int:
        return sum(math.prod(s) for name, s in self.tensors() if not name.startswith("rope_freqs"))


LLAMA3_ROPE = (32.0, 1.0, 4.0, 8192)
SHAPES = {
    "llama-3.2-1b": Shape("meta-llama/Llama-3.2-1B", "llama", 2048, 16, 32, 8, 64, 8192, 128256,
                          500000.0, 131072, 1e-5, llama3_rope=LLAMA3_ROPE),
    "llama-3.2-3b": Shape("meta-llama/Llama-3.2-3B", "llama", 3072, 28, 24, 8, 128, 8192, 128256,
                          500000.0, 131072, 1e-5, llama3_rope=LLAMA3_ROPE),
    "qwen3-0.6b": Shape("Qwen/Qwen3-0.6B", "qwen3", 1024, 28, 16, 8, 128, 3072, 151936,
                        1000000.0, 40960, 1e-6),
    "qwen3-4b": Shape("Qwen/Qwen3-4B", "qwen3", 2560, 36, 32, 8, 128, 9728, 151936,
                      1000000.0, 40960, 1e-6),
    "gemma-3-1b": Shape("google/gemma-3-1b-it", "gemma3", 1152, 26, 4, 1, 256, 6912, 262144,
                        1000000.0, 32768, 1e-6, sliding_window=512, swa_pattern=6,
                        local_rope_theta=10000.0, query_pre_attn_scalar=256.0),
    # for tests: seconds to write; 64 tokens of padding past the tokenizer's 49,152
    "tiny-llama": Shape("a test", "llama", 64, 2, 4, 2, 16, 128, 49216, 500000.0, 2048, 1e-5,
                        tied=False, llama3_rope=LLAMA3_ROPE),
    "tiny-gemma3": Shape("a test", "gemma3", 64, 6, 2, 1, 32, 128, 49216, 1000000.0, 2048, 1e-6,
                         sliding_window=16, swa_pattern=6, local_rope_theta=10000.0,
                         query_pre_attn_scalar=32.0),
}
REAL = [name for name in SHAPES if not name.startswith("tiny-")]


# --- reading a GGUF header (the `gguf` package's reader takes ~2.5 s on the tokenizer's arrays)

SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
           11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


class Header:
    """A GGUF file's metadata and tensor table: `kv[key] = (type, value, element type)` (arrays
    as lists, numeric ones as numpy arrays) and `tensors` = [(name, ggml shape, ggml type)]."""

    def __init__(self, path: str | os.PathLike):
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            self.buf, self.pos = m, 0
            if self.read("<I") != 0x46554747:  # b"GGUF"
                raise ValueError(f"{path} is not a GGUF file")
            self.version = self.read("<I")
            n_tensors, n_kv = self.read("<Q"), self.read("<Q")
            self.kv = {}
            for _ in range(n_kv):
                key = self.string()
                vtype = self.read("<I")
                self.kv[key] = (vtype, *self.value(vtype))
            self.tensors = []
            for _ in range(n_tensors):
                name = self.string()
                dims = tuple(self.read("<Q") for _ in range(self.read("<I")))
                ttype = self.read("<I")
                self.read("<Q")  # offset in the data section
                self.tensors.append((name, dims, ttype))
            self.buf = None

    def read(self, fmt: str):
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.read("<Q")
        self.pos += n
        return bytes(self.buf[self.pos - n:self.pos]).decode("utf-8", errors="surrogateescape")

    def value(self, vtype: int):
        if vtype == STRING:
            return self.string(), None
        if vtype != ARRAY:
            return self.read(SCALARS[vtype]), None
        sub, n = self.read("<I"), self.read("<Q")
        if sub == STRING:
            return [self.string() for _ in range(n)], sub
        if sub == ARRAY:
            raise ValueError("nested GGUF arrays are not read here")
        dtype = np.dtype(SCALARS[sub])
        arr = np.frombuffer(self.buf, dtype, n, self.pos).copy()
        self.pos += n * dtype.itemsize
        return arr, sub

    def get(self, key: str, default=None):
        return self.kv[key][1] if key in self.kv else default

    def tensor_bytes(self, name: str | None = None) -> int:
        """Bytes of every tensor (or of the one named)."""
        from gguf import GGML_QUANT_SIZES
        total = 0
        for n, dims, ttype in self.tensors:
            if name is None or n == name:
                block, size = GGML_QUANT_SIZES[ttype]
                total += math.prod(dims) // block * size
        return total

    def parameters(self) -> int:
        return sum(math.prod(dims) for _, dims, _ in self.tensors)


def tokenizer_kv(vocab: int) -> dict:
    """The default model's tokenizer.* keys, the token list padded to `vocab` tokens."""
    from nodes.engine.models import default_gguf  # the default model's file: its tokenizer
    kv = {k: v for k, v in Header(default_gguf()).kv.items() if k.startswith("tokenizer.")}
    _, tokens, sub = kv["tokenizer.ggml.tokens"]
    _, types, tsub = kv["tokenizer.ggml.token_type"]
    if vocab < len(tokens):
        raise ValueError(f"a vocabulary of {vocab} is smaller than the tokenizer's {len(tokens)}")
    pad = vocab - len(tokens)
    padding = [f"<pad_{i}>" for i in range(len(tokens), vocab)]
    kv["tokenizer.ggml.tokens"] = (ARRAY, tokens + padding, sub)
    kv["tokenizer.ggml.token_type"] = (ARRAY, np.concatenate(
        [types, np.full(pad, 1, types.dtype)]), tsub)  # 1: NORMAL, so each prints its name
    return kv


def llama3_rope_factors(shape: Shape) -> np.ndarray:
    """Llama 3's per-frequency rope scaling, computed as llama.cpp's converter does."""
    factor, low, high, old = shape.llama3_rope
    freqs = 1.0 / shape.rope_theta ** (np.arange(0, shape.head_dim, 2, dtype=np.float64)
                                       / shape.head_dim)
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


def add_metadata(w, name: str, shape: Shape) -> None:
    import gguf
    a = shape.arch
    w.add_name(f"{name} (random weights)")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_uint32(f"{a}.context_length", shape.context)
    w.add_uint32(f"{a}.embedding_length", shape.hidden)
    w.add_uint32(f"{a}.block_count", shape.layers)
    w.add_uint32(f"{a}.feed_forward_length", shape.intermediate)
    w.add_uint32(f"{a}.attention.head_count", shape.heads)
    w.add_uint32(f"{a}.attention.head_count_kv", shape.kv_heads)
    w.add_uint32(f"{a}.attention.key_length", shape.head_dim)
    w.add_uint32(f"{a}.attention.value_length", shape.head_dim)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", shape.rms_eps)
    w.add_float32(f"{a}.rope.freq_base", shape.rope_theta)
    if a == "llama":
        w.add_uint32(f"{a}.vocab_size", shape.vocab)
        w.add_uint32(f"{a}.rope.dimension_count", shape.head_dim)
    if shape.sliding_window:
        w.add_uint32(f"{a}.attention.sliding_window", shape.sliding_window)
    add_tokenizer(w, shape.vocab)


def add_tokenizer(w, vocab: int) -> None:
    """The default model's tokenizer into GGUFWriter `w`, padded to `vocab` tokens."""
    import gguf
    for key, (vtype, value, sub) in tokenizer_kv(vocab).items():
        value = value.tolist() if isinstance(value, np.ndarray) else value  # the writer wants lists
        w.add_key_value(key, value, gguf.GGUFValueType(vtype),
                        None if sub is None else gguf.GGUFValueType(sub))


def weight(shape: Shape, name: str, dims: tuple[int, ...], index: int, seed: int) -> np.ndarray:
    """One tensor's values: norms ones, rope factors computed, matrices seeded normal * 0.02
    (in F16, drawn in chunks of rows so a big table needs no float32 copy of itself)."""
    if name.startswith("rope_freqs"):
        return llama3_rope_factors(shape)
    if len(dims) == 1:
        return np.ones(dims, np.float32)  # llama.cpp keeps 1-D tensors in F32
    rng = np.random.default_rng([seed, index])
    out = np.empty(dims, np.float16)
    step = max(1, (1 << 24) // dims[1])
    for r in range(0, dims[0], step):
        chunk = rng.standard_normal((min(step, dims[0] - r), dims[1]), dtype=np.float32)
        chunk *= 0.02
        out[r:r + step] = chunk
    return out


def write_gguf(shape_name: str, path: str | os.PathLike, seed: int = 0) -> Path:
    """Write the F16 GGUF of SHAPES[shape_name] with random weights to `path` (through a
    temporary file beside it, so a half-written file never has the final name)."""
    import gguf
    shape = SHAPES[shape_name]
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    w = gguf.GGUFWriter(tmp, shape.arch)
    add_metadata(w, shape_name, shape)
    layout = shape.tensors()
    for name, dims in layout:
        dtype = np.float32 if len(dims) == 1 else np.float16
        w.add_tensor_info(name, dims, np.dtype(dtype), math.prod(dims) * np.dtype(dtype).itemsize)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, (name, dims) in enumerate(layout):
            w.write_tensor_data(weight(shape, name, dims, i, seed))
        w.close()
        tmp.replace(path)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return path


def quantize(src: Path, dst: Path, qtype: str, exe: Path = QUANTIZE) -> Path:
    """llama.cpp's quantizer, through a temporary name; its output is shown only on failure."""
    tmp = dst.with_name(dst.name + ".part")
    r = subprocess.run([str(exe), str(src), str(tmp), qtype], capture_output=True, text=True)
    if r.returncode != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"{exe} {src} {tmp} {qtype} failed ({r.returncode}):\n"
                           f"{(r.stdout + r.stderr)[-2000:]}")
    tmp.replace(dst)
    return dst


def size(path: Path) -> str:
    return f"{path.stat().st_size / 1e9:.2f} GB" if path.stat().st_size >= 1e8 else \
        f"{path.stat().st_size / 1e6:.1f} MB"


def make(out: Path, shapes: list[str], types: list[str], keep_f16: bool, seed: int,
         exe: Path) -> list[Path]:
    made = []
    for name in shapes:
        shape = SHAPES[name]
        f16 = out / f"{name}-F16.gguf"
        wrote_f16 = False
        for qtype in types:
            dst = out / f"{name}-{qtype}.gguf"
            if dst == f16 and wrote_f16:
                made.append(dst)
                continue
            if dst.exists():
                print(f"{dst}: exists, {size(dst)}", flush=True)
                made.append(dst)
                continue
            if not f16.exists():
                t = time.monotonic()
                print(f"{f16}: writing {shape.parameters() / 1e6:,.0f}M parameters of random "
                      f"weights in the shape of {shape.source}, seed {seed}", flush=True)
                write_gguf(name, f16, seed)
                wrote_f16 = True
                print(f"{f16}: {size(f16)} in {time.monotonic() - t:.0f}s", flush=True)
            if qtype != "F16":
                t = time.monotonic()
                quantize(f16, dst, qtype, exe)
                print(f"{dst}: {size(dst)} in {time.monotonic() - t:.0f}s", flush=True)
            made.append(dst)
        if wrote_f16 and not keep_f16 and "F16" not in types:
            f16.unlink()
            print(f"{f16}: deleted (--keep-f16 keeps it)", flush=True)
    return made


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.shapes", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="the folder for the files")
    p.add_argument("--shape", action="append", choices=list(SHAPES), default=None, metavar="NAME",
                   help=f"repeatable: {', '.join(SHAPES)}; default: every one but tiny-*")
    p.add_argument("--type", action="append", choices=TYPES, default=None, metavar="TYPE",
                   help=f"repeatable: {', '.join(TYPES)}; default Q4_K_M")
    p.add_argument("--keep-f16", action="store_true",
                   help="keep the F16 file the other types are made from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quantize", type=Path, default=QUANTIZE, help="llama.cpp's llama-quantize")
    a = p.parse_args(argv)
    types = a.type or ["Q4_K_M"]
    if any(t != "F16" for t in types) and not a.quantize.exists():
        p.error(f"no quantizer at {a.quantize} (give --quantize PATH, or --type F16)")
    a.out.mkdir(parents=True, exist_ok=True)
    made = make(a.out, a.shape or REAL, types, a.keep_f16, a.seed, a.quantize)
    print("\n".join(f"{f}  {size(f)}" for f in made))
    return 0


if __name__ == "__main__":
    sys.exit(main())
