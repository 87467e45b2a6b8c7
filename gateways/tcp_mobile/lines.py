"""Reading newline-terminated lines from a Tornado IOStream with a hard length limit.

`IOStream.read_until(b"\\n", max_bytes=...)` closes the connection when a line is too long; the
protocol promises instead an error line and a connection that stays usable. So lines are cut
from our own buffer, filled with `read_bytes(CHUNK, partial=True)`: a line that passes the limit
is reported once (`TOO_LONG`) as soon as the limit is passed, and its remaining bytes are dropped
up to and including the next newline, without ever holding more than `max_line + CHUNK` bytes.
"""

from __future__ import annotations

from tornado.iostream import IOStream

CHUNK = 64 * 1024
TOO_LONG = object()  # sentinel returned by `read_line` for an over-long line


class LineReader:
    def __init__(self, stream: IOStream, max_line: int):
        self.stream = stream
        self.max_line = max_line
        self.buf = bytearray()
        self.scanned = 0  # bytes of `buf` known to hold no newline
        self.skipping = False  # inside an over-long line already reported

    async def read_line(self) -> bytes | object:
        """The next line without its b"\\n" (and a trailing b"\\r"), or TOO_LONG.

        Raises tornado's StreamClosedError when the peer closes."""
        while True:
            i = self.buf.find(b"\n", self.scanned)
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[:i + 1]
                self.scanned = 0
                if self.skipping:
                    self.skipping = False  # the tail of a line reported before: drop it
                    continue
                if len(line) > self.max_line:
                    return TOO_LONG
                return line[:-1] if line.endswith(b"\r") else line
            if self.skipping:
                self.buf.clear()
            elif len(self.buf) > self.max_line:
                self.buf.clear()
                self.skipping = True
                self.scanned = 0
                return TOO_LONG
            self.scanned = len(self.buf)
            self.buf += await self.stream.read_bytes(CHUNK, partial=True)
