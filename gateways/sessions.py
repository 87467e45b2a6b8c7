"""Which conversation a request continues: `Request.session`, from what each client sends.

No I/O; both gateways use it. The tree sends a request with a session where that session's
earlier turns ran, so their cached prompt prefix is reused (the routing is the root's).

    HTTP, any API             the `X-Session-Id` header (the chat page sends one per conversation)
    OpenAI chat, Responses    `prompt_cache_key`, then `user`  (legacy completions: `user`)
    Anthropic Messages        `metadata.user_id`
    Responses                 `previous_response_id`: the session of the chain's first response
    TCP                       a request line's `session` (text mode: one per connection)

The header outranks the body's fields, and a body's fields rank in the order above. A name a
client gives over HTTP is used as it is when it is 1 to MAX_SESSION printable ASCII characters;
any other (longer, or with spaces or other characters) is replaced by its SHA-256 (`named`): the
same name still names the same conversation, a client that sent a long `user` while it was
ignored keeps working, and every session can be echoed in a header and written to a log.
"""

from __future__ import annotations

import hashlib
import re

from broker.request import MAX_SESSION

HEADER = "X-Session-Id"
PLAIN = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII, no spaces


def named(*candidates) -> str | None:
    """The first candidate that is a non-blank string, as a session name (hashed unless it is
    plain ASCII of at most MAX_SESSION characters); None when none is."""
    for name in candidates:
        if isinstance(name, str) and name.strip():
            if len(name) <= MAX_SESSION and PLAIN.match(name):
                return name
            return "sha256:" + hashlib.sha256(name.encode()).hexdigest()
    return None
