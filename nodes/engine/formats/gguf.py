"""The tensors of a GGUF file, memory-mapped, without reading its metadata into Python objects.

(The format's reading lives here, the bottom of the engine's rooms; tests and benchmarks write
files with the `gguf` package's GGUFWriter.)

`gguf.GGUFReader` turns every metadata value into numpy views, the tokenizer's 49,152 tokens and
48,900 merges included: 4-7 s for the default model, most of a warm start. The runner needs only
the architecture's name and where each tensor lies, so this walks the header with `struct`,
skipping values by their sizes (a string array is one length read per string), and maps each
tensor as the numpy array `GGUFReader` would give: float tensors in their shape, block tensors
as uint8 rows of blocks. The format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import ctypes
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

MAGIC = b"GGUF"
# metadata value types -> their struct format; 8 is a string, 9 an array
FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
           12: "d"}
SIZES = {kind: struct.calcsize(fmt) for kind, fmt in FORMATS.items()}
STRING, ARRAY = 8, 9
FLOATS = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
          GGMLQuantizationType.BF16: np.int16}  # bfloat16 bits, for torch to view


@dataclass
class Tensor:
    name: str
    tensor_type: GGMLQuantizationType
    data: np.ndarray  # floats in their shape, or uint8 rows of blocks
    columns: int  # weights per row (GGUF's first dimension)
    offset: int  # where its bytes begin in the file


class GGUFError(ValueError):
    pass


class Header:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        values = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def string(self) -> str:
        n = self.take("Q")
        self.pos += n
        return bytes(self.buf[self.pos - n:self.pos]).decode("utf-8", "replace")

    def skip(self, kind: int) -> None:
        if kind == STRING:
            n = self.take("Q")  # the length, then the bytes (`pos += take()` would lose 8)
            self.pos += n
        elif kind == ARRAY:
            item, count = self.take("IQ")
            if item in SIZES:
                self.pos += SIZES[item] * count
            else:
                for _ in range(count):
                    self.skip(item)
        elif kind in SIZES:
            self.pos += SIZES[kind]
        else:
            raise GGUFError(f"unknown metadata type {kind} at byte {self.pos}")


def read(path: Path) -> tuple[dict, dict[str, Tensor]]:
    """(the file's scalar and string metadata, name -> Tensor). Arrays are skipped."""
    with open(path, "rb") as f:  # copy-on-write: writable arrays (torch wants them), and
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # nothing is ever written
    if bytes(buf[:4]) != MAGIC:
        raise GGUFError(f"{path} is not a GGUF file")
    try:
        return parse(buf, path)
    except (struct.error, ValueError, KeyError) as e:  # cut short, or not what it says it is
        raise GGUFError(f"{path} is damaged or cut short ({e})") from None


def give_back(data: np.ndarray) -> None:
    """A mapped tensor's pages out of this process (a copy of its bytes took its place): the
    whole pages inside it, which the file would give again if they were ever read."""
    _dont_need(data.ctypes.data, data.ctypes.data + data.nbytes)


def give_back_file(tensors: dict[str, Tensor]) -> None:
    """Every page of the mapped file out of this process, its header's (read once, at start)
    included: for when the runner has copied what it reads. A page read again (an untied
    embedding's rows) comes back from the page cache as it is read."""
    if tensors:
        first = min(tensors.values(), key=lambda t: t.offset)
        _dont_need(first.data.ctypes.data - first.offset,
                   max(t.data.ctypes.data + t.data.nbytes for t in tensors.values()))


def _dont_need(start: int, end: int) -> None:
    """madvise(MADV_DONTNEED) on the whole pages within [start, end) of a private mapping."""
    page = mmap.PAGESIZE
    lo, hi = -(-start // page) * page, end // page * page
    if hi > lo:
        ctypes.CDLL(None).madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo),
                                  mmap.MADV_DONTNEED)


def parse(buf, path: Path) -> tuple[dict, dict[str, Tensor]]:
    h = Header(buf)
    h.pos = 4
    version, n_tensors, n_kv = h.take("IQQ")
    if version < 2:
        raise GGUFError(f"{path}: GGUF version {version} is too old (2 or later)")
    meta: dict = {}
    for _ in range(n_kv):
        key, kind = h.string(), h.take("I")
        if kind == STRING:
            meta[key] = h.string()
        elif kind in FORMATS:
            meta[key] = h.take(FORMATS[kind])
        else:
            h.skip(kind)
    infos = []
    for _ in range(n_tensors):
        name, dims = h.string(), h.take("I")
        shape = [h.take("Q") for _ in range(dims)]
        infos.append((name, shape, GGMLQuantizationType(h.take("I")), h.take("Q")))
    align = int(meta.get("general.alignment", 32))
    start = -(-h.pos // align) * align
    tensors = {}
    for name, shape, kind, offset in infos:
        block, size = GGML_QUANT_SIZES[kind]
        rows = int(np.prod(shape[1:], dtype=np.int64))
        row_bytes = shape[0] // block * size
        raw = np.frombuffer(buf, np.uint8, rows * row_bytes, start + offset)
        if kind in FLOATS:
            data = raw.view(FLOATS[kind]).reshape(list(reversed(shape)))
        else:
            data = raw.reshape(rows, row_bytes)
        tensors[name] = Tensor(name, kind, data, shape[0], start + offset)
    return meta, tensors
