"""Seeded workloads and arrival times for `treechat bench`. No sockets; pure data.

Datasets (`--dataset`):

    random   prompts of random common words, input length uniform in
             [L*(1-r), L*(1+r)] with L = --random-input-len, r = --random-range-ratio, and
             max_tokens drawn the same way around --random-output-len (vLLM's definition)
    chat     the built-in chat prompts below (written for this project), in a seeded shuffle,
             max_tokens = --random-output-len
    prefix   every request shares one system message of --prefix-len words, then a random
             question of --random-input-len words (a prefix-cache workload)
    mixed    many short answers and a few long ones: a --long-fraction of the requests gets
             max_tokens = --long-output-len, the rest --random-output-len (the routing study)

Lengths are counted in words; the fake engine counts one word as one token, a real tokenizer
about 1.3. Prompt tokens in the results come from the server's usage report when it sends one.

Arrivals follow vLLM: with --request-rate R the gaps are gamma-distributed with shape
--burstiness B and mean 1/R (B = 1 is a Poisson process; B < 1 burstier, B > 1 steadier);
R = inf sends everything at once and lets --max-concurrency alone pace the run.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

WORDS = """time year people way day man thing woman life child world school state family student
group country problem hand part place case week company system program question work government
number night point home water room mother area money story fact month lot right study book eye
job word business issue side kind head house service friend father power hour game line end
member law car city community name president team minute idea kid body information back parent
face others level office door health person art war history party result change morning reason
research girl guy moment air teacher force education foot boy age policy process music market
sense nation plan college interest death experience effect use class control care field
development role effort rate heart drug show leader light voice wife police mind price report
decision son view relationship town road arm difference value building action model season
society tax director position player record paper space ground form event official matter center
couple site project activity star table need court oil situation cost industry figure street
image phone data picture practice piece land product doctor wall patient worker news test movie
north love support technology step baby computer type attention film tree source organization
hair window evidence population site garden river bridge cloud stone coffee bread""".split()

CHAT_PROMPTS = [
    "Explain in simple terms why the sky looks blue during the day and red at sunset.",
    "Write a short poem about a lighthouse keeper who waits for a ship that never comes.",
    "What are three good habits for writing maintainable Python code? Give an example of each.",
    "Summarize the plot of a heist story where the thieves discover the vault is already empty.",
    "How does a hash table handle collisions? Compare chaining and open addressing.",
    "Give me a recipe for a quick vegetarian dinner that uses chickpeas and spinach.",
    "I have a job interview tomorrow for a junior data analyst role. How should I prepare tonight?",
    "Translate this sentence into French and Spanish: the train leaves at seven in the morning.",
    "What is the difference between a process and a thread? When would you use each?",
    "Write a limerick about a cat who learned to use the computer keyboard.",
    "Explain what a binary search does and why it needs the list to be sorted.",
    "Plan a three-day walking trip through a mountain region for a beginner hiker.",
    "Why do we have leap years? Explain the rule for which years are leap years.",
    "Describe how a bicycle stays upright while it is moving.",
    "Write a polite email asking a colleague to review my pull request by Friday.",
    "What are the pros and cons of working from home for a small software team?",
    "Explain recursion to a ten year old using an everyday example.",
    "List five questions I should ask before adopting a dog from a shelter.",
    "How do vaccines train the immune system? Keep it short and clear.",
    "Write the opening paragraph of a mystery novel set in a small fishing village.",
    "Compare TCP and UDP. Which one would you use for a video call, and why?",
    "What does it mean for a function to be pure? Show a pure and an impure function.",
    "Give me a weekly workout plan that needs no equipment and takes thirty minutes a day.",
    "Explain how compound interest works with a simple numeric example.",
    "What causes the seasons on Earth? Many people think it is the distance to the Sun.",
    "Write a dialogue between a robot and a gardener who disagree about weeds.",
    "How should I structure a README file for a small open source command line tool?",
    "What is the tragedy of the commons? Give a modern example.",
    "Describe the water cycle in five steps.",
    "Suggest names for a bakery that specializes in sourdough bread and cinnamon rolls.",
    "Explain what a database index is and when adding one can make things slower.",
    "Write a haiku about the first snow of winter in a big city.",
    "How do noise cancelling headphones work?",
    "Give three tips for giving a clear technical presentation to non-technical people.",
    "What is the difference between weather and climate?",
    "Explain the idea behind continuous batching in language model serving.",
    "Write a short bedtime story about a dragon who is afraid of the dark.",
    "What are the main differences between a list and a tuple in Python?",
    "How can a small city reduce traffic without building new roads?",
    "Explain why a ZeroMQ ROUTER socket needs identities to send replies.",
]


@dataclass(slots=True)
class Item:
    """One request to send: chat `messages` (or a plain `prompt`: text, or token ids for
    /v1/completions) and its max_tokens."""

    index: int
    messages: list[dict] | None
    prompt: str | list[int] | None
    max_tokens: int
    prompt_words: int  # an estimate of prompt tokens, used when the server reports no usage

    def text(self) -> str | list[int]:
        """The request as one plain prompt (for /v1/completions)."""
        if self.prompt is not None:
            return self.prompt
        return "\n".join(m["content"] for m in self.messages)


@dataclass(frozen=True)
class WorkloadConfig:
    dataset: str = "random"
    num_requests: int = 100
    input_len: int = 32
    output_len: int = 32
    range_ratio: float = 0.0
    prefix_len: int = 256
    long_fraction: float = 0.1
    long_output_len: int = 512
    seed: int = 0

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset '{self.dataset}' (choose from {', '.join(DATASETS)})")
        if self.num_requests < 1:
            raise ValueError("--num-requests must be at least 1")
        if self.input_len < 1 or self.output_len < 1 or self.long_output_len < 1:
            raise ValueError("input and output lengths must be at least 1")
        if not 0.0 <= self.range_ratio < 1.0:
            raise ValueError("--random-range-ratio must be in [0, 1)")
        if self.prefix_len < 0:
            raise ValueError("--prefix-len cannot be negative")
        if not 0.0 <= self.long_fraction <= 1.0:
            raise ValueError("--long-fraction must be between 0 and 1")


def around(rng: random.Random, length: int, ratio: float) -> int:
    lo, hi = max(1, int(length * (1 - ratio))), max(1, int(length * (1 + ratio)))
    return rng.randint(lo, hi)


def random_text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def make_random(cfg: WorkloadConfig, rng: random.Random, i: int) -> Item:
    n = around(rng, cfg.input_len, cfg.range_ratio)
    return Item(i, user(random_text(rng, n)), None, around(rng, cfg.output_len, cfg.range_ratio), n)


def make_chat(cfg: WorkloadConfig, rng: random.Random, i: int) -> Item:
    text = CHAT_PROMPTS[rng.randrange(len(CHAT_PROMPTS))]
    return Item(i, user(text), None, cfg.output_len, len(text.split()))


def make_prefix(cfg: WorkloadConfig, rng: random.Random, i: int) -> Item:
    shared = random_text(random.Random(f"prefix-{cfg.seed}"), cfg.prefix_len)
    question = random_text(rng, cfg.input_len)
    messages = [{"role": "system", "content": shared}, {"role": "user", "content": question}]
    return Item(i, messages, None, cfg.output_len, cfg.prefix_len + cfg.input_len)


def make_mixed(cfg: WorkloadConfig, rng: random.Random, i: int) -> Item:
    item = make_random(cfg, rng, i)
    item.max_tokens = cfg.long_output_len if rng.random() < cfg.long_fraction else cfg.output_len
    return item


DATASETS = {"random": make_random, "chat": make_chat, "prefix": make_prefix, "mixed": make_mixed}


def build(cfg: WorkloadConfig, count: int | None = None, offset: int = 0) -> list[Item]:
    """`count` items (default: --num-requests), the same for the same seed and offset."""
    rng = random.Random(cfg.seed * 1_000_003 + offset)
    make = DATASETS[cfg.dataset]
    return [make(cfg, rng, i) for i in range(count if count is not None else cfg.num_requests)]


def arrival_gaps(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds to wait after sending each of `n` requests (the first goes at once), as vLLM draws
    them: gamma(shape=burstiness, scale=1/(rate*burstiness)), mean 1/rate."""
    if burstiness <= 0:
        raise ValueError("--burstiness must be positive")
    if rate <= 0:
        raise ValueError("--request-rate must be positive (or inf)")
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    theta = 1.0 / (rate * burstiness)
    return [rng.gammavariate(burstiness, theta) for _ in range(n)]
