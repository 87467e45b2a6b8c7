"""Incremental detokenizing for the hf engine: token ids in, safe text deltas out.

Two rules keep every delta clean, the same ones vLLM uses:
- prefix/read offsets: a token's text is `decode(ids[prefix:])` minus `decode(ids[prefix:read])`,
  so a token whose text depends on its neighbours (merged spaces, byte pieces) comes out right;
- a decode that ends in U+FFFD is half of a multi-byte character: hold it until the rest arrives.

On top, stop strings: the text is cut before the first stop string, and a tail that could still
grow into one is held back until it is resolved. `Detokenizer.text` is the whole visible answer so
far; `sent` is how much of it the client already has (a resumed request starts with `sent` at
the length of the text the lost node had delivered).
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"
PROMPT_TAIL = 6  # prompt tokens kept as context so the first token decodes with its neighbours


class Detokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str], lock):
        self.tokenizer = tokenizer
        self.lock = lock  # the tokenizer is shared with the event loop thread (submit encodes)
        self.ids = list(prompt_ids[-PROMPT_TAIL:])
        self.prefix = 0
        self.read = len(self.ids)
        self.text = ""        # everything decoded so far (may still hold a stop string)
        self.stop = stop
        self.longest_stop = max((len(s) for s in stop), default=0)
        self.checked = 0      # text before this index holds no stop string's start that matters
        self.sent = 0         # characters of the visible answer delivered so far
        self.stopped = False

    def add(self, token: int) -> None:
        """Take one new token; its text joins `self.text` once it is whole."""
        if self.stopped:
            return  # the answer ended at a stop string: nothing after it is text
        self.ids.append(token)
        with self.lock:
            prefix_text = self.tokenizer.decode(self.ids[self.prefix:self.read],
                                                skip_special_tokens=True)
            new_text = self.tokenizer.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            self.text += new_text[len(prefix_text):]
            self.prefix, self.read = self.read, len(self.ids)
        # Keep ids bounded: everything before `prefix` is never decoded again.
        if self.prefix > 64:
            self.ids = self.ids[self.prefix:]
            self.read -= self.prefix
            self.prefix = 0

    def find_stop(self) -> bool:
        """Cut the text at the first stop string it now holds; True when one was found."""
        if not self.stop or self.stopped:
            return self.stopped
        start = max(0, self.checked - self.longest_stop + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        self.checked = len(self.text)
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True
        return self.stopped

    def take(self, final: bool = False) -> str:
        """The text that may be delivered now: all of it when `final`, else all but a tail that
        could be the start of a stop string."""
        end = len(self.text)
        if not final and not self.stopped and self.stop:
            end -= self._held_tail()
        if end <= self.sent:
            return ""
        delta = self.text[self.sent:end]
        self.sent = end
        return delta

    def _held_tail(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        text = self.text
        for n in range(min(self.longest_stop - 1, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0
