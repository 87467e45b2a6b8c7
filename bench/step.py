"""One forward of our CPU runner, timed in one process: no server, no sampling, no tree.

Process: `python -m bench.step --model FILE [--rows 1] [--steps 100] [--prompt 0]`. Loads the file
as a node does (`models.load`), then times `--steps` decode steps of `--rows` rows (each row one
token at the next position; after 8 untimed ones), or, with `--prompt N`, `--steps` prefills of
`--rows` prompts of N random tokens each in one forward (after one untimed). Prints the mean and
the spread, and the node's memory (RSS, of it anonymous and in 2 MB pages). What it leaves out
(the tree's messages, sampling, the HTTP stream) is what `bench.peer` adds back.

    python -m bench.step --model /tmp/models/smollm2-135m-Q6_K.gguf
    python -m bench.step --model llama-3.2-1b-Q4_K_M.gguf --rows 4 --prompt 64 --steps 3
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from nodes.engine import models  # noqa: E402
from nodes.engine.kvcache import RowCache, kv_shape  # noqa: E402
from nodes.engine.llama import Batch, Chunk, CpuModel  # noqa: E402


def memory_mb() -> dict[str, int]:
    text = open("/proc/self/smaps_rollup").read()
    kb = dict(re.findall(r"^(\w+):\s+(\d+) kB", text, re.M))
    return {k: int(kb.get(k, 0)) >> 10 for k in ("Rss", "Anonymous", "AnonHugePages")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.step", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a GGUF file (or any model our runner reads)")
    p.add_argument("--rows", type=int, default=1, help="decode rows, or prompts with --prompt")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--prompt", type=int, default=0, help="time prefills of this many tokens")
    a = p.parse_args(argv)
    try:
        loaded = models.load(a.model, device="cpu", dtype="auto", load_format="auto",
                             model_config=None)
    except (ValueError, OSError) as e:
        print(f"bench.step: {e}", file=sys.stderr)
        return 2
    model = loaded.model
    if not isinstance(model, CpuModel):
        print(f"{a.model}: not on our CPU kernels (no compiler or AVX2, or another family)",
              file=sys.stderr)
        return 1
    length = a.prompt + a.steps + 8 if not a.prompt else a.prompt
    layers, kv_heads, head_dim = kv_shape(loaded.config)
    cache = RowCache(layers, kv_heads, head_dim, model.cache_dtype, torch.device("cpu"),
                     a.rows * length, length, a.rows, static=False, zeroed=False)
    cache.reshape(a.rows, length, length, 0)
    vocab = loaded.vocab_size

    def decode(position: int):
        ids = torch.randint(0, vocab, (a.rows,))
        batch = Batch(ids=ids, pos=torch.full((a.rows,), position), decode=a.rows,
                      span=position + 1)
        model.forward(model.prepare(batch), cache)

    def prefill(_: int):
        n = a.prompt
        batch = Batch(ids=torch.randint(0, vocab, (a.rows * n,)),
                      pos=torch.arange(n).repeat(a.rows), decode=0,
                      chunks=[Chunk(r, 0, n) for r in range(a.rows)],
                      logits_at=torch.tensor([(r + 1) * n - 1 for r in range(a.rows)]))
        model.forward(model.prepare(batch), cache)

    run, warm = (prefill, 1) if a.prompt else (decode, 8)
    times = []
    with torch.inference_mode():
        for i in range(warm + a.steps):
            t = time.perf_counter()
            run(i)
            if i >= warm:
                times.append(time.perf_counter() - t)
    what = f"prefill {a.rows} x {a.prompt}" if a.prompt else f"decode, {a.rows} rows"
    mean = statistics.fmean(times)
    tokens = a.rows * (a.prompt or 1)
    print(f"{os.path.basename(a.model)}: {what}: {1e3 * mean:.2f} ms a step (min "
          f"{1e3 * min(times):.2f}, max {1e3 * max(times):.2f}; {tokens / mean:.1f} tokens/s), "
          f"memory MB {memory_mb()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
