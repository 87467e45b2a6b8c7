"""Do conversations come home? Multi-turn chats on four real-model leaves, affinity on and off.

Process: `python -m bench.affinity [--users U] [--turns T] [...]`, a client. For each mode
(`affinity`, then `no-affinity`: the root's --no-affinity) it starts `treechat up --nodes 4
--fanout 4` on free ports (the root, four leaves under it, the HTTP gateway; node-N's Prometheus
metrics on BASE+N), sends one warm-up request per leaf, then drives the same seeded
conversations (`bench.conversations`) through POST /v1/chat/completions, streamed with
stream_options.include_usage (the last chunk's usage carries prompt_tokens_details.cached_tokens).
Each user sends its next turn a think time after its answer, with the history so far, the
model's real answer included; temperature 0 by default, so both modes compute the same answers.
A turn that fails ends its user's conversation (there is no answer to go on from); it is counted.

Per mode:

    cached share   cached / prompt tokens, over turns >= 2
    of ideal       cached / ideal tokens, over turns >= 2; turn k's ideal is what its node could
                   have kept of turn k-1: turn k-1's prompt + completion tokens, at most turn k's
                   prompt tokens
    misses         turns >= 2 with less than 90% of their ideal cached (at home a turn gets all
                   but the last token of it): sent away from the node of their earlier turn, or
                   that node's cache no longer held them
    TTFT p50/p99   all turns, and turns >= 2
    output tok/s   completion tokens / the drive's duration (its first request to its last answer)
    leaf load      requests and prompt + completion tokens each leaf finished during the drive
                   (its counters after the drive minus before), and the max leaf over the mean

Goal (issue 20): of ideal >= 90%; TTFT p50 with affinity at most half of without, at about the
same output tokens/s; with affinity, max leaf / mean <= 1.3. Output: the tables on stdout, and
--out FILE.json (the config, and per mode its summary, leaf loads and per-turn records).
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import time
from dataclasses import asdict, dataclass

from prometheus_client.parser import text_string_to_metric_families

from bench import report
from bench.compare import Up
from bench.conversations import Conversation, ConversationConfig, build
from bench.http_client import HTTPTarget
from bench.metrics import Record, stats_ms
from bench.workload import Item
from broker.sockets import free_port

MODES = ("affinity", "no-affinity")
COUNTERS = {"requests": "treechat:node_requests_finished_total",
            "prompt_tokens": "treechat:node_prompt_tokens_total",
            "cached_tokens": "treechat:node_cached_tokens_total",
            "completion_tokens": "treechat:node_generation_tokens_total"}
WARMUP_TOKENS = 8
MISS = 0.9  # a turn >= 2 with less than this share of its ideal cached missed its cache


@dataclass(slots=True)
class TurnItem(Item):
    user: str | None = None  # sent as OpenAI's `user` (--send-user), else not at all


@dataclass(slots=True)
class TurnRecord(Record):
    user: int = 0
    turn: int = 1  # from 1
    cached_tokens: int = 0
    ideal: int = 0  # what its node could have kept of the turn before (turns >= 2)


class ChatTarget(HTTPTarget):
    """HTTPTarget that keeps the usage's cached tokens and sends each turn's `user`."""

    def payload(self, item: TurnItem) -> dict:
        body = super().payload(item)
        if item.user is not None:
            body["user"] = item.user
        return body

    def on_event(self, event: dict, rec: TurnRecord, last: list[float]) -> None:
        super().on_event(event, rec, last)
        details = (event.get("usage") or {}).get("prompt_tokens_details") or {}
        rec.cached_tokens = details.get("cached_tokens", rec.cached_tokens) or 0


async def converse(target: ChatTarget, conv: Conversation, cfg: ConversationConfig,
                   t0: float, send_user: bool, records: list[TurnRecord]) -> None:
    """One user's conversation: each turn with the history so far, a think time between."""
    await asyncio.sleep(max(0.0, t0 + conv.start - time.perf_counter()))
    answers: list[str] = []
    for k, turn in enumerate(conv.turns):
        if k:
            await asyncio.sleep(turn.think)
        messages = conv.messages(k, answers)
        item = TurnItem(conv.user * cfg.turns + k, messages, None, cfg.max_tokens,
                        sum(len(m["content"].split()) for m in messages),
                        user=f"user-{conv.user}" if send_user else None)
        rec = TurnRecord(item.index, user=conv.user, turn=k + 1)
        records.append(rec)
        await target.send(item, rec)
        if not rec.ok:
            return
        answers.append(rec.text)


def set_ideals(records: list[TurnRecord]) -> None:
    by_turn = {(r.user, r.turn): r for r in records}
    for r in records:
        before = by_turn.get((r.user, r.turn - 1))
        if before is not None and before.ok:
            r.ideal = min(before.prompt_tokens + before.output_tokens, r.prompt_tokens)


async def warm(target: ChatTarget, convs: list[Conversation], n: int) -> int:
    """`n` short requests at once (least-loaded spreads them, one per leaf), with the dataset's
    system prompts; returns how many failed."""
    systems = sorted({c.system for c in convs}, key=str)
    items = []
    for i in range(n):
        system = systems[i % len(systems)]
        messages = ([{"role": "system", "content": system}] if system is not None else []) \
            + [{"role": "user", "content": f"Warm-up {i}: say hello."}]
        items.append(TurnItem(-1 - i, messages, None, WARMUP_TOKENS, 8))
    done = await asyncio.gather(*(target.send(it, TurnRecord(it.index)) for it in items))
    return sum(1 for r in done if not r.ok)


async def scrape(port: int) -> dict[str, float]:
    """A node's counters of COUNTERS (summed over their labels)."""
    t = HTTPTarget(f"http://127.0.0.1:{port}")
    try:
        status, body = await asyncio.wait_for(t.get("/metrics"), 10)
    finally:
        await t.close()
    if status != 200:
        raise RuntimeError(f"metrics on port {port} answered HTTP {status}")
    totals = dict.fromkeys(COUNTERS, 0.0)
    names = {v: k for k, v in COUNTERS.items()}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name in names:
                totals[names[sample.name]] += sample.value
    return totals


def up_argv(args, mode: str, metrics_base: int) -> list[str]:
    argv = ["--nodes", str(args.nodes), "--fanout", str(args.fanout), "--engine", args.engine,
            "--metrics-port", str(metrics_base), "--grace", "2",
            "--tcp-port", "0"]  # after Up's own --tcp-port, so it wins: no TCP gateway
    if args.model:
        argv += ["--model", args.model]
    if mode == "no-affinity":
        argv.append("--no-affinity")
    return argv + shlex.split(args.up_args)


async def run_mode(mode: str, convs: list[Conversation], cfg: ConversationConfig, args) -> dict:
    base = free_port(args.nodes + 1)
    argv = up_argv(args, mode, base)
    print(f"--- {mode}: treechat up {' '.join(argv)}", file=sys.stderr, flush=True)
    ports = {f"node-{i}": base + i for i in range(1, args.nodes + 1)}
    async with Up(argv, via="http") as up:
        extra = {} if args.temperature is None else {"temperature": args.temperature}
        target = ChatTarget(up.base_url, timeout=args.request_timeout, extra=extra)
        await target.start()  # the model: the first of /v1/models
        try:
            warm_failed = await warm(target, convs, args.nodes) if args.warmup else 0
            before = {name: await scrape(port) for name, port in ports.items()}
            records: list[TurnRecord] = []
            t0 = time.perf_counter()
            await asyncio.gather(*(converse(target, c, cfg, t0, args.send_user, records)
                                   for c in convs))
            after = {name: await scrape(port) for name, port in ports.items()}
        finally:
            await target.close()
    records.sort(key=lambda r: r.index)
    set_ideals(records)
    leaves = {name: {k: after[name][k] - before[name][k] for k in COUNTERS} for name in ports}
    end = max((r.end for r in records if r.end is not None), default=t0)
    start = min((r.start for r in records), default=t0)
    return {"mode": mode, "up_args": argv, "warmup_failed": warm_failed,
            "summary": summarize(records, end - start, cfg), "leaves": leaves,
            "imbalance": imbalance(leaves), "records": records, "t0": start}


def summarize(records: list[TurnRecord], duration: float, cfg: ConversationConfig) -> dict:
    done = [r for r in records if r.ok]
    later = [r for r in done if r.turn > 1]
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            errors[r.error] = errors.get(r.error, 0) + 1
    prompt, cached, ideal = (sum(getattr(r, k) for r in later)
                             for k in ("prompt_tokens", "cached_tokens", "ideal"))
    output = sum(r.output_tokens for r in done)
    return {"turns_planned": cfg.users * cfg.turns, "completed": len(done),
            "failed": len(records) - len(done), "not_sent": cfg.users * cfg.turns - len(records),
            "errors": errors, "duration_s": duration,
            "later_turns": len(later), "later_prompt_tokens": prompt,
            "later_cached_tokens": cached, "later_ideal_tokens": ideal,
            "cached_share": cached / prompt if prompt else 0.0,
            "ideal_share": ideal / prompt if prompt else 0.0,
            "of_ideal": cached / ideal if ideal else 0.0,
            "misses": sum(1 for r in later if r.cached_tokens < MISS * r.ideal),
            "output_tokens": output, "output_throughput": output / duration if duration else 0.0,
            "ttft_ms": stats_ms([r.ttft for r in done if r.ttft is not None]),
            "ttft_later_ms": stats_ms([r.ttft for r in later if r.ttft is not None])}


def imbalance(leaves: dict[str, dict]) -> dict:
    """max leaf / mean, of requests and of prompt + completion tokens."""
    out = {}
    for key, pick in (("requests", lambda v: v["requests"]),
                      ("tokens", lambda v: v["prompt_tokens"] + v["completion_tokens"])):
        loads = [pick(v) for v in leaves.values()]
        mean = sum(loads) / len(loads) if loads else 0.0
        out[key] = max(loads) / mean if mean else 0.0
    return out


def tables(runs: list[dict]) -> str:
    rows = []
    for run in runs:
        s, b = run["summary"], run["imbalance"]
        rows.append([run["mode"], f"{s['completed']}/{s['turns_planned']}",
                     f"{s['duration_s']:.0f}",
                     f"{100 * s['cached_share']:.1f}%", f"{100 * s['ideal_share']:.1f}%",
                     f"{100 * s['of_ideal']:.1f}%", f"{s['misses']}/{s['later_turns']}",
                     f"{s['ttft_ms']['p50']:.0f} / {s['ttft_ms']['p99']:.0f}",
                     f"{s['ttft_later_ms']['p50']:.0f} / {s['ttft_later_ms']['p99']:.0f}",
                     f"{s['output_throughput']:.1f}", f"{b['requests']:.2f} / {b['tokens']:.2f}"])
    main = report.markdown_table(
        ["mode", "turns ok", "drive s", "cached share (t>=2)", "ideal share", "of ideal", "misses",
         "TTFT p50 / p99 ms", "TTFT t>=2 p50 / p99 ms", "output tok/s",
         "max leaf / mean (req / tok)"], "lrrrrrrrrrr", rows)
    names = list(runs[0]["leaves"]) if runs else []
    leaf = report.markdown_table(
        ["leaf"] + [f"{run['mode']}: requests / tokens / cached" for run in runs],
        "l" + "r" * len(runs),
        [[name] + [f"{v['requests']:.0f} / {v['prompt_tokens'] + v['completion_tokens']:.0f} / "
                   f"{v['cached_tokens']:.0f}" for run in runs for v in [run["leaves"][name]]]
         for name in names])
    return main + "\n\n" + leaf


def verdict(runs: list[dict]) -> dict:
    """Issue 20's goals, where both modes ran."""
    by = {run["mode"]: run for run in runs}
    if set(MODES) - set(by):
        return {}
    on, off = by["affinity"]["summary"], by["no-affinity"]["summary"]
    p50_on, p50_off = on["ttft_ms"]["p50"], off["ttft_ms"]["p50"]
    return {"of_ideal": on["of_ideal"], "of_ideal_ok": on["of_ideal"] >= 0.9,
            "ttft_p50_speedup": p50_off / p50_on if p50_on else 0.0,
            "ttft_p50_ok": p50_on > 0 and p50_off >= 2 * p50_on,
            "throughput_ratio": on["output_throughput"] / off["output_throughput"]
            if off["output_throughput"] else 0.0,
            "max_leaf_over_mean": max(by["affinity"]["imbalance"].values()),
            "balance_ok": max(by["affinity"]["imbalance"].values()) <= 1.3}


def save(path: str, args, cfg: ConversationConfig, runs: list[dict], goal: dict) -> None:
    report.write_json(path, {"version": 1, "date": report.now(), "config": vars(args),
                             "dataset": asdict(cfg), "runs": report.pack_runs(runs),
                             "goal": goal})


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.affinity",
                                description=__doc__.split("\n\n")[0])
    d = p.add_argument_group("dataset (bench/conversations.py)")
    d.add_argument("--users", type=int, default=16)
    d.add_argument("--turns", type=int, default=3)
    d.add_argument("--systems", type=int, default=2, help="distinct system prompts (0: none)")
    d.add_argument("--median-words", type=int, default=25, help="median words of a user message")
    d.add_argument("--max-words", type=int, default=400, help="longest user message in words")
    d.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every answer")
    d.add_argument("--think-min", type=float, default=1.0, help="seconds between an answer and "
                   "the next turn, at least")
    d.add_argument("--think-max", type=float, default=5.0, help="... and at most")
    d.add_argument("--stagger", type=float, default=5.0, help="users start within these seconds")
    d.add_argument("--seed", type=int, default=0)
    t = p.add_argument_group("tree (treechat up)")
    t.add_argument("--modes", default=",".join(MODES), help="which runs, in order (default: both)")
    t.add_argument("--nodes", type=int, default=4)
    t.add_argument("--fanout", type=int, default=4)
    t.add_argument("--engine", choices=("hf", "fake"), default="hf")
    t.add_argument("--model", default=None, help="default: the default model (SmolLM2-135M)")
    t.add_argument("--up-args", default="", help="more `treechat up` flags, e.g. '--max-slots 4'")
    c = p.add_argument_group("client")
    c.add_argument("--temperature", type=float, default=0.0,
                   help="sent with every turn (default 0: both modes get the same answers)")
    c.add_argument("--send-user", action="store_true",
                   help="also send OpenAI's `user` (user-N): the session, where the gateway "
                        "uses it")
    c.add_argument("--no-warmup", dest="warmup", action="store_false")
    c.add_argument("--request-timeout", type=float, default=600.0)
    c.add_argument("--out", default=None, metavar="FILE.json")
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - set(MODES):
        p.error(f"--modes takes a comma-separated list of {', '.join(MODES)}")
    args.modes = modes
    if args.nodes < 1:
        p.error("--nodes must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        cfg = ConversationConfig(users=args.users, turns=args.turns, systems=args.systems,
                                 median_words=args.median_words, max_words=args.max_words,
                                 max_tokens=args.max_tokens, think_min=args.think_min,
                                 think_max=args.think_max, stagger=args.stagger, seed=args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    convs = build(cfg)
    runs = [asyncio.run(run_mode(mode, convs, cfg, args)) for mode in args.modes]
    goal = verdict(runs)
    print(f"{args.users} users x {args.turns} turns, {args.nodes} nodes (fan-out {args.fanout}), "
          f"engine {args.engine}, max_tokens {args.max_tokens}, think {args.think_min:g}-"
          f"{args.think_max:g} s, seed {args.seed}")
    print(tables(runs))
    if goal:
        yes = {True: "yes", False: "no"}
        print(f"\ngoal: of ideal {100 * goal['of_ideal']:.1f}% (>= 90%: {yes[goal['of_ideal_ok']]}"
              f"); TTFT p50 {goal['ttft_p50_speedup']:.2f}x lower with affinity (>= 2x: "
              f"{yes[goal['ttft_p50_ok']]}) at {goal['throughput_ratio']:.2f}x the output tok/s; "
              f"max leaf / mean {goal['max_leaf_over_mean']:.2f} (<= 1.3: "
              f"{yes[goal['balance_ok']]})")
    if args.out:
        save(args.out, args, cfg, runs, goal)
        print(f"results: {args.out}")
    return 0 if all(run["summary"]["completed"] for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
