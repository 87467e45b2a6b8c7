"""How large a message each ZeroMQ socket of the tree reads (`ZMQ_MAXMSGSIZE`), from the protocol's
own limits.

A frame larger than its socket's limit never reaches the process: ZeroMQ reads the frame's
length from its header and drops that connection without allocating it (a 256 MB frame on the
front socket took the root from 30 MB to 3.7 GB before these limits). ZeroMQ reports only that
the connection closed; `broker.sockets.Channel` counts closes without a goodbye on listening
sockets. Each limit is the largest message its socket legitimately carries, derived below, and
senders keep to them: a gateway's client refuses a request too large for the root
(`broker.client`), and a node sends one engine step as several Tokens messages when it must
(`tokens_messages`).

    root   front    FRONT      Submit (a request and what it produced), Keep (a stored response)
           tree     HEARTBEAT  top-level nodes' heartbeats
           results  RESULTS    one engine step's Tokens, registrations, acks, held rids
    node   up       DISPATCH   a Dispatch: a request and what it produced, to resume it
           down     HEARTBEAT  children's heartbeats
           results  CONTROL    the root's Welcome, Found (one registry entry), Cancel, Adopt, ...
    client          FROM_ROOT  one loop turn's Deltas, a StatusReply, a Kept response
"""

from __future__ import annotations

from broker.protocol import Tokens
from broker.request import MAX_LOGPROBS

KiB = 1 << 10
MiB = 1 << 20

# --- what messages carry --------------------------------------------------------------------------

# One request as a client sent it. Gateways accept at most this (`--max-body`, `--max-line`:
# 1 MiB by default); 4 MiB of text is about a million tokens, past every served model's context.
# A chat continued with `previous_response_id` grows by its turns, until the context is full.
REQUEST = 4 * MiB
# What a request produced, carried to resume it elsewhere (Submit's and Dispatch's `resume_ids`
# and `resume_text`) and kept with a stored response: a whole context of tokens, each an id of up
# to six digits and a comma plus its text, JSON-escaped.
CONTEXT_TOKENS = 256 * 1024
TOKEN_BYTES = 16
ANSWER = CONTEXT_TOKENS * TOKEN_BYTES  # 4 MiB
# Everything else a message holds: ids, sampling options, field names, a node's description.
ENVELOPE = 64 * KiB
# One logprobs entry or alternative: ["text", -1.2345678901234567e-05] with its brackets and a
# token text of up to 32 bytes, JSON-escaped.
LOGPROB_BYTES = 64
# A prompt whose every token comes back with logprobs (completions' echo): the engine refuses
# prompt_logprobs for a longer prompt (its logits alone are this many tokens times the
# vocabulary in floats: 1.6 GB for a 49k vocabulary at 8192 tokens).
PROMPT_LOGPROBS_TOKENS = 8192
# Rows (or logprobs entries) in one Tokens message: a larger engine step is sent as several.
STEP_ROWS = 1024

# --- the messages and sockets ---------------------------------------------------------------------

# A Submit: the request and what it produced (a resubmit after a root restart). A client refuses
# a larger one itself, so the Dispatch it becomes fits every node's `up` socket too.
SUBMIT = REQUEST + ANSWER + ENVELOPE
# A Keep holds a request's conversation and its answer twice (the response's output, and the
# conversation's last message).
KEEP = REQUEST + 2 * ANSWER + ENVELOPE
FRONT = max(SUBMIT, KEEP)
# A Dispatch is a Submit re-addressed: the request and what it produced so far.
DISPATCH = SUBMIT
# A child's heartbeat: its name, incarnation, link number and subtree Load (a few numbers).
HEARTBEAT = ENVELOPE
# A Tokens message: STEP_ROWS rows each with a token, its text and MAX_LOGPROBS alternatives, or
# one prompt's logprobs alone. Registrations, acks of a loop turn and held rids are far smaller.
_ROW = (MAX_LOGPROBS + 1) * LOGPROB_BYTES + 64
RESULTS = max(STEP_ROWS * _ROW, PROMPT_LOGPROBS_TOKENS * (MAX_LOGPROBS + 1) * LOGPROB_BYTES) \
    + ENVELOPE
# The root to a node: Welcome, Refused, Reregister, Heartbeat, Cancel, Adopt, and Found with the
# one registry entry a node asks for (a registration: its engine's description).
CONTROL = ENVELOPE
# The root to a gateway or the CLI: a Deltas gathers one loop turn's results for that gateway
# (kilobytes usually; tens of MB with logprobs under load), a StatusReply a whole tree, Kept a
# stored response (FRONT). This bounds what a process posing as the root could make a client
# hold. Were a real turn ever larger, the client reconnects and resubmits its open requests
# with what they delivered, so nothing is lost.
FROM_ROOT = 256 * MiB

ROOT_SOCKETS = {"front": FRONT, "tree": HEARTBEAT, "results": RESULTS}
NODE_SOCKETS = {"up": DISPATCH, "down": HEARTBEAT, "results": CONTROL}


def tokens_messages(items: list, done: list) -> list[Tokens]:
    """One engine step as Tokens messages the root's results socket takes: at most STEP_ROWS
    rows, or logprobs entries, each (a prompt's logprobs travel alone); `done` rides with the
    last, after every token. Almost always one message."""
    messages, batch, weight = [], [], 0
    for item in items:
        entries = len(item[3]) if len(item) > 3 and item[3] else 1
        if batch and weight + entries > STEP_ROWS:
            messages.append(Tokens(items=batch))
            batch, weight = [], 0
        batch.append(item)
        weight += entries
    messages.append(Tokens(items=batch, done=done))
    return messages


def show(size: int) -> str:
    """A size in words: "12 MiB", "64 KiB"."""
    for unit, name in ((MiB, "MiB"), (KiB, "KiB")):
        if size >= unit:
            return f"{size / unit:.3g} {name}"
    return f"{size} bytes"
