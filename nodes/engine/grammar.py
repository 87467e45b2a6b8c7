"""Grammar-constrained decoding for the hf engine: JSON answers and forced tool calls.

Runs inside a node, on the engine thread (masks, accepts) and the node's loop (compiling, in
`submit`). Built on llguidance (the Rust library behind vLLM's `guidance` backend): it computes,
for one sequence at a time, which tokens may come next, as a bitmask of int32 words
[batch, ceil(vocab / 32)] with the allowed tokens' bits set; the sampler sets every other logit
to -inf before it chooses. What constrains a request:

    response_format json_object           any JSON object
    response_format json_schema           that schema
    tool_choice {"function": {"name": F}}  F's arguments: an object matching F's parameters
    tool_choice "required"                 [{"name": F, "arguments": {...}}, ...] over the tools
                                           (one call only when parallel_tool_calls is false)

The gateway (gateways/tools.py) reads the last two back into OpenAI's `tool_calls`. JSON is
compact (no free whitespace), so a small model cannot wander off into blank lines.

The interface the engine calls:

    compile_for(request, tokenizer, vocab_size) -> Matcher | None   # None: no constraint
    Matcher.fill_bitmask(bitmask, row); Matcher.accept(token) -> bool; Matcher.is_terminated()
    apply_bitmask(logits, bitmask, rows)

A schema compiles once per tokenizer (an LRU of pristine matchers, each request gets a copy): a
node sees the same schema many times. A schema llguidance cannot use is
`EngineError(BAD_REQUEST)`, raised by `submit` before any work. llguidance's view of the
tokenizer itself is built at the node's first constrained request (`_compiler`).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import OrderedDict

import orjson
import torch

from broker.protocol import ErrorCode, Request
from nodes.engine.base import EngineError

log = logging.getLogger("treechat.engine")

CACHED_SCHEMAS = 256  # pristine matchers kept per tokenizer
JSON_OPTIONS = {"whitespace_flexible": False}
# llguidance's "slices": token sets it precomputes, each with its own copy of the token trie,
# so that where a grammar allows any token of one (inside a JSON string) it skips walking the
# trie. Its defaults are four (whitespace runs, string bytes 1-10, 1-30, any): 105 MB for Gemma
# 3's 262k tokens. The last alone masks as fast inside strings without a maxLength (0.016 ms a
# token, against 0.18 with none) for 57 MB; whitespace runs never help here (JSON_OPTIONS).
SLICES = [r'[^"\\\x00-\x1F\x7F]+']


def constraint_of(request: Request) -> tuple[str, dict] | None:
    """(what, JSON schema) the answer must match, or None for free text."""
    forced = request.forced_tools()
    if forced:
        if isinstance(request.tool_choice, dict):
            return "tool_choice", forced[0].get("parameters") or {"type": "object"}
        call = {"anyOf": [{"type": "object", "additionalProperties": False,
                           "required": ["name", "arguments"],
                           "properties": {"name": {"const": f["name"]},
                                          "arguments": f.get("parameters") or {"type": "object"}}}
                          for f in forced]}
        calls = {"type": "array", "items": call, "minItems": 1}
        if request.parallel_tool_calls is False:
            calls["maxItems"] = 1
        return "tools", calls
    schema = request.json_schema()
    return ("response_format", schema) if schema is not None else None


class Matcher:
    """One sequence's place in its grammar."""

    __slots__ = ("_m",)

    def __init__(self, matcher):
        self._m = matcher

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Set the bits of the tokens allowed next in `bitmask[row]` (int32, on the CPU)."""
        words = bitmask[row]
        self._m.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * words.element_size())

    def accept(self, token: int) -> bool:
        """Advance past `token`; False when the grammar did not allow it."""
        return self._m.consume_token(token)

    def is_terminated(self) -> bool:
        """The structure is complete: nothing but end-of-sequence may follow."""
        return self._m.is_stopped()

    def error(self) -> str:
        return self._m.get_error()


def _byte_level_chars() -> dict[str, int]:
    """GPT-2's byte-level BPE writes each byte as a printable character: these, back to bytes."""
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    moved = [b for b in range(256) if b not in kept]
    return {chr(b): b for b in kept} | {chr(256 + i): b for i, b in enumerate(moved)}


class Vocabulary:
    """A tokenizer as llguidance's `TokenizerWrapper` takes it: every token's bytes, the special
    ones, and a way to tokenize text. llguidance can read the tokenizer's JSON instead, but then
    parses and keeps a second tokenizer of its own: for Gemma 3's 262k tokens 130 MB more of a
    node's memory and a second more of its start. The bytes are what llguidance's own reading
    (its `toktrie_hf`) makes of the two kinds of tokenizer models use, compared token by token in
    tests/test_grammar.py: byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM) and SentencePiece's
    byte fallback (Gemma). Any other kind: None, and llguidance reads the JSON."""

    def __init__(self, tokenizer, tokens: list[bytes], special: list[int]):
        self.eos_token_id = tokenizer.eos_token_id
        self.bos_token_id = tokenizer.bos_token_id
        self.tokens, self.special_token_ids = tokens, special
        self._backend = tokenizer.backend_tokenizer

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):  # TokenizerWrapper asks once whether bytes are taken
            raise TypeError("text only")
        return self._backend.encode(text, add_special_tokens=False).ids

    @classmethod
    def of(cls, tokenizer) -> "Vocabulary | None":
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoders = _parts(backend.decoder) if backend is not None else []
        kinds = {d["type"] for d in decoders}
        if "ByteLevel" in kinds:
            chars = _byte_level_chars()

            def raw(piece: str) -> bytes | None:
                return bytes(chars[c] for c in piece) if all(c in chars for c in piece) else None
        elif "ByteFallback" in kinds and _no_added_space(backend):
            space = next((d["pattern"]["String"] for d in decoders if d["type"] == "Replace"
                          and d.get("content") == " " and len(d["pattern"].get("String", "")) == 1),
                         " ")  # SentencePiece's "\u2581" stands for a space

            def raw(piece: str) -> bytes | None:
                if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                    return bytes([int(piece[3:5], 16)])
                return piece.replace(space, " ").encode()
        else:
            return None
        added = backend.get_added_tokens_decoder()
        # llguidance's rule: added tokens that are special or look like <...> are special
        special = sorted(i for i, a in added.items()
                         if a.special or (a.content.startswith("<") and a.content.endswith(">")))
        tokens = [b""] * backend.get_vocab_size(with_added_tokens=True)
        for piece, i in backend.get_vocab(with_added_tokens=True).items():
            if i in added:
                tokens[i] = added[i].content.encode()
            else:
                tokens[i] = raw(piece) or b""
        return cls(tokenizer, tokens, special)


def _parts(component) -> list[dict]:
    """A tokenizer component's settings (its decoder, normalizer or pre-tokenizer): a
    Sequence's members in order, else the one; none for no component."""
    if component is None:
        return []
    state = orjson.loads(component.__getstate__())
    return state.get("decoders") or state.get("normalizers") or state.get("pretokenizers") \
        or [state]


def _no_added_space(backend) -> bool:
    """True when encoding a fragment adds no space of its own before it (no `Prepend`
    normalizer, no `Metaspace` pre-tokenizer); llguidance switches those off in its copy."""
    parts = _parts(backend.normalizer) + _parts(backend.pre_tokenizer)
    return not {"Prepend", "Metaspace"} & {p["type"] for p in parts}


class _Compiler:
    """llguidance's view of one tokenizer, and the schemas compiled for it."""

    def __init__(self, tokenizer, vocab_size: int):
        import llguidance.hf  # only nodes that constrain something pay for the import
        self.llg = llguidance
        eos = tokenizer.eos_token_id
        vocabulary = Vocabulary.of(tokenizer)
        if vocabulary is not None:
            from llguidance._tokenizer import TokenizerWrapper
            self.tokenizer = llguidance.LLTokenizer(TokenizerWrapper(vocabulary),
                                                    n_vocab=vocab_size, eos_token=eos,
                                                    slices=SLICES)
        else:  # llguidance reads the tokenizer's JSON and keeps a second tokenizer of its own
            self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size,
                                                          eos_token=eos, slices=SLICES)
        self.cache: OrderedDict[bytes, object] = OrderedDict()
        self.lock = threading.Lock()

    def matcher(self, what: str, schema: dict) -> Matcher:
        key = orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)
        with self.lock:
            pristine = self.cache.get(key)
            if pristine is not None:
                self.cache.move_to_end(key)
                return Matcher(pristine.deep_copy())
        try:
            grammar = self.llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except ValueError as e:
            raise EngineError(ErrorCode.BAD_REQUEST, f"{what}: the JSON schema is not usable: {e}")
        pristine = self.llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if pristine.is_error():
            raise EngineError(ErrorCode.BAD_REQUEST,
                              f"{what}: the JSON schema is not usable: {pristine.get_error()}")
        with self.lock:
            self.cache[key] = pristine
            while len(self.cache) > CACHED_SCHEMAS:
                self.cache.popitem(last=False)
        return Matcher(pristine.deep_copy())


# One compiler per tokenizer, dropped with it: the engine's interface passes only the tokenizer.
_compilers: "weakref.WeakKeyDictionary[object, _Compiler]" = weakref.WeakKeyDictionary()
_compilers_lock = threading.Lock()


def compile_for(request: Request, tokenizer, vocab_size: int) -> Matcher | None:
    """The matcher constraining `request`'s answer, or None when nothing constrains it."""
    constraint = constraint_of(request)
    if constraint is None:
        return None
    try:
        compiler = _compiler(tokenizer, vocab_size)
    except ValueError as e:  # llguidance takes only fast (Rust) tokenizers
        raise EngineError(ErrorCode.BAD_REQUEST, f"{constraint[0]} cannot be enforced for this "
                                                 f"model: {e}") from None
    return compiler.matcher(*constraint)


def _compiler(tokenizer, vocab_size: int) -> _Compiler:
    """llguidance's view of `tokenizer`, built at the first constrained request a node serves:
    it holds the token trie and a slice (16 MB of the default model's node, about 60 MB of Gemma
    3's), which a node that is never asked for a grammar need not keep. The build holds the GIL
    for most of its 0.2 s (SmolLM2) to 1.2 s (Gemma 3's 262k tokens), once: the node's streams
    pause that long, well inside its heartbeats' three missed beats."""
    with _compilers_lock:  # one llguidance tokenizer per HF tokenizer
        compiler = _compilers.get(tokenizer)
        if compiler is None:
            began = time.perf_counter()
            compiler = _compilers[tokenizer] = _Compiler(tokenizer, vocab_size)
            log.info("llguidance's view of the tokenizer built for the first constrained "
                     "request in %.2f s", time.perf_counter() - began)
        return compiler


def allocate_bitmask(batch: int, vocab_size: int) -> torch.Tensor:
    """A zeroed bitmask for `batch` rows (int32 on the CPU, where llguidance writes it)."""
    return torch.zeros((batch, (vocab_size + 31) // 32), dtype=torch.int32)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int] | None = None) -> None:
    """Set the logits of tokens whose bit is clear to -inf, in place. `bitmask` has one row per
    row of `logits`; `rows` limits it to those rows (None: all)."""
    device = logits.device
    if rows is not None and not rows:
        return
    index = None if rows is None else torch.tensor(rows, device=device)
    words = bitmask.to(device, non_blocking=True)
    if index is not None:
        words = words.index_select(0, index)
    bits = torch.arange(32, device=device, dtype=torch.int32)
    allowed = ((words[:, :, None] >> bits) & 1).bool().flatten(1)  # [R, W * 32]
    vocab = logits.shape[-1]
    if allowed.shape[1] < vocab:  # tokens past the mask's width are never allowed
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
    allowed = allowed[:, :vocab]
    if index is None:
        logits.masked_fill_(~allowed, float("-inf"))
    else:
        logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
