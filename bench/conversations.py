"""Seeded multi-turn chats for the affinity study: many users, each one conversation of T turns.

No sockets; pure data. The dataset is a script of user messages: the runner (`bench.affinity`)
sends every turn with the whole history so far, the model's real answers included, so a turn's
messages are built as the run goes (`Conversation.messages`):

    turn 1   [system?, user 1]
    turn 2   [system?, user 1, assistant 1, user 2]
    turn k   [system?, user 1, assistant 1, ..., user k-1, assistant k-1, user k]

Each user has one of a few system prompts (each shared by every user who has it; `systems` = 0:
none, the chat template's own), a start time (uniform in [0, stagger] seconds: users are
interleaved) and, before each later turn, a think time uniform in [think_min, think_max] seconds
after the previous answer ended.

A message's length in words is drawn from a log-normal resembling ShareGPT's user turns (median
`median_words`, default 25; about one in ten past 130 words: pasted text), cut to [min_words,
max_words]. Its text is a question (the first turn) or a follow-up (later turns) written for this
project, then, to reach the drawn length, real prose from bench/data/perplexity.txt from a random
sentence on, as pasted context; a message is never shorter than its question. No two users open
with the same system prompt and first message (their conversations would share keys at the
root). The first N users of a dataset are a dataset of N users: a user's script depends on the
seed, the user's number and (to stay unique) the users before it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from bench.workload import CHAT_PROMPTS

PROSE = Path(__file__).resolve().parent / "data" / "perplexity.txt"

SYSTEM_PROMPTS = [
    "You are a helpful assistant. Answer clearly and briefly, and say so when you do not know.",
    "You are a patient teacher who explains things to curious adults with no special "
    "background. Use plain words and short sentences. When an idea is hard, start from an "
    "everyday example, then give the general rule, then one more example that checks the rule. "
    "Do not use jargon unless the reader asked for it, and define every technical term the first "
    "time you use it. If the question is ambiguous, answer the most likely reading and say which "
    "reading you chose. End with one sentence that sums up the answer.",
    "You are the writing and research assistant of a small team. The team writes documentation, "
    "reports and the occasional story, and asks you to summarize texts they paste, to suggest "
    "better wording, to check facts they are unsure of and to draft short pieces. Follow these "
    "rules. Keep the author's voice: change what is unclear or wrong, not what is merely "
    "different from how you would say it. When you summarize, keep names, numbers and dates "
    "exactly as they appear. When you are asked to check a fact, say how sure you are and what "
    "would settle it. When you draft, ask at most one question first, and only when the request "
    "cannot be done without the answer. Prefer lists for steps and comparisons, prose for "
    "explanations. Never invent quotations or sources. Answers should fit on one screen unless "
    "the user asks for more.",
]

FOLLOW_UPS = [
    "Can you make that shorter?",
    "Why is that?",
    "Give me a concrete example.",
    "Thanks. What would you do differently for a beginner?",
    "Could you explain the second point in more detail?",
    "That is not quite what I meant. Let me add some context.",
    "Now write it as a list of steps.",
    "What are the most common mistakes here?",
    "How would this change in ten years?",
    "Can you compare that with the alternative?",
    "Here is some more text. Summarize it in the same style.",
    "Is there a simpler way?",
    "Please check this paragraph against what you said.",
    "OK. And what about the cost?",
    "Rewrite your answer for a ten year old.",
    "Which part of this matters most?",
]

SIGMA = 1.3  # spread of the log-normal of message lengths (ShareGPT-like: a long tail)
MAX_TRIES = 1000  # draws of a first message before giving up on a unique one


@dataclass(frozen=True)
class ConversationConfig:
    users: int = 16
    turns: int = 3
    systems: int = 2  # distinct system prompts in use (0: none)
    median_words: int = 25
    min_words: int = 3
    max_words: int = 400
    max_tokens: int = 64  # each answer's max_tokens
    think_min: float = 1.0  # seconds between an answer and the next turn
    think_max: float = 5.0
    stagger: float = 5.0  # users start uniformly within this many seconds
    seed: int = 0

    def __post_init__(self):
        if self.users < 1 or self.turns < 1:
            raise ValueError("--users and --turns must be at least 1")
        if not 0 <= self.systems <= len(SYSTEM_PROMPTS):
            raise ValueError(f"--systems must be between 0 and {len(SYSTEM_PROMPTS)}")
        if not 1 <= self.min_words <= self.median_words <= self.max_words:
            raise ValueError("message lengths need 1 <= min_words <= median_words <= max_words")
        if self.max_tokens < 1:
            raise ValueError("--max-tokens must be at least 1")
        if not 0 <= self.think_min <= self.think_max:
            raise ValueError("think times need 0 <= --think-min <= --think-max")
        if self.stagger < 0:
            raise ValueError("--stagger cannot be negative")


@dataclass(frozen=True)
class Turn:
    text: str
    think: float  # seconds after the previous answer before this turn is sent (0: the first)


@dataclass(frozen=True)
class Conversation:
    user: int
    system: str | None
    start: float  # seconds after the run starts
    turns: tuple[Turn, ...]

    def messages(self, k: int, answers: list[str]) -> list[dict]:
        """Turn k's messages (k from 0): the system prompt, every earlier turn's question and
        its answer (`answers[i]`, the model's real text), then turn k's question."""
        if not 0 <= k < len(self.turns) or len(answers) < k:
            raise ValueError(f"turn {k} needs the answers of the {k} turns before it")
        out = [{"role": "system", "content": self.system}] if self.system is not None else []
        for turn, answer in zip(self.turns[:k], answers):
            out += [{"role": "user", "content": turn.text},
                    {"role": "assistant", "content": answer}]
        return out + [{"role": "user", "content": self.turns[k].text}]


@lru_cache(maxsize=1)
def prose() -> tuple[list[str], list[int]]:
    """The prose's words, and the indices of the words that start a sentence."""
    words = PROSE.read_text().split()
    starts = [0] + [i + 1 for i, w in enumerate(words[:-1]) if w.endswith((".", "?", "!"))]
    return words, starts


def message_words(cfg: ConversationConfig, rng: random.Random) -> int:
    n = round(cfg.median_words * math.exp(rng.gauss(0.0, SIGMA)))
    return min(cfg.max_words, max(cfg.min_words, n))


def message(cfg: ConversationConfig, rng: random.Random, lead: str) -> str:
    """`lead`, then prose from a random sentence on (wrapping around) up to the drawn length."""
    extra = message_words(cfg, rng) - len(lead.split())
    if extra <= 0:
        return lead
    words, starts = prose()
    i = rng.choice(starts)
    pasted = [words[(i + j) % len(words)] for j in range(extra)]
    return lead + "\n\n" + " ".join(pasted)


def conversation(cfg: ConversationConfig, user: int, taken: set) -> Conversation:
    rng = random.Random(f"conversations-{cfg.seed}-{user}")
    system = SYSTEM_PROMPTS[rng.randrange(cfg.systems)] if cfg.systems else None
    for _ in range(MAX_TRIES):
        first = message(cfg, rng, rng.choice(CHAT_PROMPTS))
        if (system, first) not in taken:
            break
    else:
        raise ValueError(f"no unique first message for user {user} in {MAX_TRIES} draws: raise "
                         "--median-words or lower --users")
    taken.add((system, first))
    turns = [Turn(first, 0.0)]
    for _ in range(cfg.turns - 1):
        think = rng.uniform(cfg.think_min, cfg.think_max)
        turns.append(Turn(message(cfg, rng, rng.choice(FOLLOW_UPS)), think))
    return Conversation(user, system, rng.uniform(0.0, cfg.stagger), tuple(turns))


def build(cfg: ConversationConfig) -> list[Conversation]:
    """Every user's conversation, the same for the same config."""
    taken: set = set()
    return [conversation(cfg, user, taken) for user in range(cfg.users)]
