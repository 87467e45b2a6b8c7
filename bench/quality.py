"""Answer quality with the server's defaults: do ordinary questions end, or loop to the limit?

Process: `python -m bench.quality [--base-url URL | --up-args "..."] [--max-tokens 300] [--seeds K]
[--extra-body JSON]`, a client. Without --base-url it starts its own `treechat up` (defaults, plus
--up-args) on free ports. It asks each of QUESTIONS once through /v1/chat/completions with no
sampling settings at all (the server's defaults apply, as for a person using the chat page or an
SDK with no options; `--extra-body JSON` adds fields, to try other settings), `max_tokens` as
given, and reports per answer and in total:

    stop      the answer ended by itself (finish_reason "stop")
    length    it ran to max_tokens
    loop      it degenerated: some run of LOOP_WORDS words occurs LOOP_TIMES times or more
              (the "la femme au roi, la femme au roi, ..." failure), or it holds a run of
              SYMBOL_RUN emoji or other non-ASCII symbols with no letter, digit or space between
              ("Hola! 😊🌍🌍🌍…", or an emoji salad that repeats with small changes; no
              natural answer has one)
    words     its length in words (the table gives the median)

and whether the France question names Paris. `--seeds K` asks every question K times with seeds
0..K-1 (the defaults sample), so one lucky draw does not decide. docs/benchmarks.md has the
before/after figures of the server's repetition guard.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
from collections import Counter

import orjson

from bench.compare import Up
from bench.http_client import HTTPTarget

LOOP_WORDS, LOOP_TIMES = 4, 4
SYMBOL_RUN = 16
SYMBOLS = re.compile(rf"[^\w\s\x00-\x7f]{{{SYMBOL_RUN},}}")

QUESTIONS = [
    # facts
    "What is the capital of France?",
    "Who wrote Romeo and Juliet?",
    "How many continents are there on Earth?",
    "What is the largest planet in our solar system?",
    "What gas do plants take in from the air?",
    "In which year did the Second World War end?",
    "What is the boiling point of water in degrees Celsius?",
    "Who painted the Mona Lisa?",
    "What is the chemical symbol for gold?",
    "Which ocean is the largest?",
    # arithmetic
    "What is 2+2?",
    "What is 12 times 7?",
    "What is 100 divided by 4?",
    "If I have 3 apples and buy 5 more, how many do I have?",
    "What is 15% of 200?",
    "Is 17 a prime number?",
    # short code
    "Write a short Python function that reverses a string.",
    "Write a Python function that returns the largest number in a list.",
    "How do I print 'hello' in JavaScript?",
    "Write a SQL query that selects all rows from a table named users.",
    "What does the Python expression len('abc') return?",
    # translation
    "Say hello in Spanish.",
    "How do you say 'thank you' in French?",
    "Translate 'good morning' into German.",
    "What is 'cat' in Italian?",
    # writing
    "Write a haiku about autumn.",
    "Write a two-line poem about the sea.",
    "Give me a title for a story about a lost dog.",
    # everyday
    "Give me three tips for sleeping better.",
    "What should I pack for a day at the beach?",
    "Explain what a rainbow is to a child.",
    "What is a good name for a black cat?",
    "How many minutes are in two hours?",
    "Suggest a healthy breakfast.",
]


def loops(text: str) -> bool:
    words = text.lower().split()
    grams = Counter(tuple(words[i:i + LOOP_WORDS]) for i in range(len(words) - LOOP_WORDS + 1))
    return bool(grams) and max(grams.values()) >= LOOP_TIMES or SYMBOLS.search(text) is not None


async def ask(target: HTTPTarget, question: str, max_tokens: int, seed: int | None,
              extra: dict) -> dict:
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            **extra}
    if seed is not None:
        body["seed"] = seed
    status, raw = await target.post("/v1/chat/completions", body)
    if status != 200:
        return {"question": question, "error": f"HTTP {status}: {raw[:200]!r}"}
    choice = orjson.loads(raw)["choices"][0]
    text = choice["message"]["content"] or ""
    return {"question": question, "seed": seed, "finish": choice["finish_reason"], "text": text,
            "loop": loops(text), "words": len(text.split())}


async def study(a) -> list[dict]:
    async def with_target(url: str) -> list[dict]:
        target = HTTPTarget(url, timeout=a.request_timeout)
        await target.start()
        try:
            out = []
            for q in QUESTIONS:
                for seed in (range(a.seeds) if a.seeds else [None]):
                    out.append(await ask(target, q, a.max_tokens, seed, a.extra_body))
                    print(f"    {q[:50]:50s} {out[-1].get('finish', out[-1].get('error'))}",
                          file=sys.stderr, flush=True)
            return out
        finally:
            await target.close()

    if a.base_url:
        return await with_target(a.base_url)
    async with Up(["--nodes", "1", *a.up_args.split()], via="http") as up:
        return await with_target(up.base_url)


def summary(answers: list[dict]) -> dict:
    ok = [x for x in answers if "error" not in x]
    france = [x for x in ok if x["question"] == QUESTIONS[0]]
    return {"answers": len(answers), "errors": len(answers) - len(ok),
            "stop": sum(x["finish"] == "stop" for x in ok),
            "length": sum(x["finish"] == "length" for x in ok),
            "loops": sum(x["loop"] for x in ok),
            "loops_to_the_limit": sum(x["loop"] and x["finish"] == "length" for x in ok),
            "median_words": statistics.median([x["words"] for x in ok]) if ok else 0,
            "france_names_paris": sum("paris" in x["text"].lower() for x in france),
            "france_asked": len(france)}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default=None, help="an OpenAI server (default: start treechat up)")
    p.add_argument("--up-args", default="", help="`treechat up` flags when it starts one, quoted")
    p.add_argument("--max-tokens", type=int, default=300)
    p.add_argument("--seeds", type=int, default=0,
                   help="ask each question with seeds 0..K-1 (default: once, no seed)")
    p.add_argument("--extra-body", type=orjson.loads, default={}, metavar="JSON",
                   help="request fields to send with every question, e.g. other sampling "
                        "settings than the server's defaults: '{\"temperature\": 0.8}'")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--json", default=None, metavar="FILE", help="every answer and the summary")
    a = p.parse_args(argv)
    answers = asyncio.run(study(a))
    s = summary(answers)
    for x in answers:
        if "error" in x:
            print(f"ERROR {x['question']}: {x['error']}")
        elif x["loop"] or x["finish"] == "length":
            print(f"{x['finish']:6s} {'loop ' if x['loop'] else '     '}{x['question']}: "
                  f"{x['text'][:100]!r}")
    print(f"{s['answers']} answers: {s['stop']} stop, {s['length']} length, {s['loops']} with a "
          f"loop ({s['loops_to_the_limit']} looping to the limit), median {s['median_words']:.0f} "
          f"words, France -> Paris in {s['france_names_paris']}/{s['france_asked']}, "
          f"{s['errors']} errors")
    if a.json:
        with open(a.json, "wb") as f:
            f.write(orjson.dumps({"summary": s, "answers": answers}, option=orjson.OPT_INDENT_2))
    return 0 if not s["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
