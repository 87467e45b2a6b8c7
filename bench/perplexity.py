"""What quantization costs: perplexity of our runner on a fixed text, per precision.

Process: `python -m bench.perplexity [--model PATH] [--modes none,int8,int4] [--window N]`.
One process; the model is loaded once per mode and scores `bench/data/perplexity.txt` (about
1,100 words of plain English prose written for this project, so the number never changes
with a download) in windows of `--window` tokens, each prefilled the way the engine prefills
(chunks of `--chunk` tokens through the KV cache), every position's next token scored.

    perplexity = exp(mean negative log-likelihood of every token after the first of a window)

Prints one line per mode and the ratio to `none` (float32): the quantized paths must stay
within 2% of it (docs/benchmarks.md). With `--ask`, also the greedy answer to "What is the
capital of France?" per mode.

A GGUF file (`--model FILE.gguf`, any block types) is scored in two modes: `blocks`, our
kernels over the file's own blocks (what a node serves), and `float32`, the same weights
dequantized once to float32 and run by torch's operators with a float32 KV cache: the
reference our kernels must not add error to (within 1%, docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from nodes.engine import models  # noqa: E402
from nodes.engine.blocks import kernels  # noqa: E402
from nodes.engine.kvcache import RowCache  # noqa: E402
from nodes.engine.llama import Batch, Chunk  # noqa: E402

TEXT = Path(__file__).resolve().parent / "data" / "perplexity.txt"


def score(model, ids: list[int], window: int, chunk: int) -> tuple[float, int]:
    """(total negative log-likelihood, tokens scored) of `ids`, window by window."""
    s = model.shape
    nll, count = 0.0, 0
    for w0 in range(0, len(ids) - 1, window):
        part = ids[w0:w0 + window + 1]
        cache = RowCache(s.layers, s.kv_heads, s.head_dim, model.cache_dtype, model.device,
                         len(part), len(part), 1)
        cache.reshape(1, len(part), len(part), 0)
        for c0 in range(0, len(part) - 1, chunk):
            n = min(chunk, len(part) - 1 - c0)
            batch = Batch(ids=torch.tensor(part[c0:c0 + n]), pos=torch.arange(c0, c0 + n),
                          decode=0, chunks=[Chunk(0, c0, n)])
            logits = model.forward(model.prepare(batch), cache)
            targets = torch.tensor(part[c0 + 1:c0 + n + 1])
            nll -= torch.log_softmax(logits, -1).gather(1, targets[:, None]).sum().item()
            count += n
    return nll, count


def answer(loaded, question: str, tokens: int = 24) -> str:
    model, tok = loaded.model, loaded.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok.encode(text, add_special_tokens=False)
    s = model.shape
    cache = RowCache(s.layers, s.kv_heads, s.head_dim, model.cache_dtype, model.device, 4096, 4096, 1)
    cache.reshape(1, len(ids) + tokens, len(ids) + tokens, 0)
    batch = Batch(ids=torch.tensor(ids), pos=torch.arange(len(ids)), decode=0,
                  chunks=[Chunk(0, 0, len(ids))], logits_at=torch.tensor([len(ids) - 1]))
    out = []
    for _ in range(tokens):
        nxt = int(model.forward(model.prepare(batch), cache)[0].argmax())
        if nxt in loaded.eos_ids:
            break
        out.append(nxt)
        p = len(ids) + len(out) - 1
        batch = Batch(ids=torch.tensor([nxt]), pos=torch.tensor([p]), decode=1)
    return tok.decode(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct (its GGUF)")
    ap.add_argument("--modes", default=None,
                    help="none,int8,int4 (a float model's default); float32,blocks (a GGUF's)")
    ap.add_argument("--window", type=int, default=512, help="tokens of context per window")
    ap.add_argument("--chunk", type=int, default=256, help="prefill chunk, as the engine cuts")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ask", action="store_true", help="also greedy-answer the France question")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    gguf = a.model is None or a.model.endswith(".gguf")
    modes = a.modes or ("float32,blocks" if gguf else "none,int8,int4")
    results = {}
    with torch.inference_mode():
        for mode in modes.split(","):
            t = time.perf_counter()
            library = kernels.library
            if mode == "float32":  # the file's weights dequantized: torch's float32 path
                kernels.library = lambda: None
            try:
                loaded = models.load(a.model, device="cpu", dtype="auto", load_format="auto",
                                     model_config=None,
                                     quantization=mode if mode in ("none", "int8", "int4")
                                     else "auto")
            finally:
                kernels.library = library
            ids = loaded.tokenizer.encode(TEXT.read_text())
            nll, n = score(loaded.model, ids, a.window, a.chunk)
            ppl = math.exp(nll / n)
            results[mode] = {"perplexity": round(ppl, 4), "tokens": n,
                             "seconds": round(time.perf_counter() - t, 1)}
            if a.ask:
                results[mode]["france"] = answer(loaded, "What is the capital of France?")
            base = (results.get("none") or results.get("float32") or {}).get("perplexity")
            ratio = f"  {ppl / base:.4f}x float32" if base else ""
            print(f"{mode:5s} perplexity {ppl:8.4f} over {n} tokens{ratio}"
                  + (f"  France: {results[mode]['france']!r}" if a.ask else ""), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
