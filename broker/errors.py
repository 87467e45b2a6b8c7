"""The one error type every treechat process shares: a condition it cannot serve through.

Raised anywhere (a refused name, a port in use, an unreadable key folder); `treechat.process.serve`
prints its message and exits non-zero. It lives here, at the bottom, so `broker/` imports nothing
from `nodes/` or `treechat/`.
"""


class Fatal(Exception):
    """A condition the process cannot serve through (a refused name, a port in use)."""
