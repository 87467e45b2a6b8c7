"""The `ldap` registry backend: the root writes every registration through to an LDAP directory.

Process: inside `treechat root --registry ldap`. One LDAP connection (ldap3, plain LDAP over TCP to
`--ldap-url`), bound as the registrar account `--ldap-bind-dn` with the password read from
`--ldap-password-file`. Each node is one entry, as in the original system's Apache DS registry:

    dn: cn=<node>,ou=Nodes,<base>
    objectClass: applicationProcess, labeledURIObject      (core.schema: no extra schema needed)
    cn: <node>
    labeledURI: <the node's endpoint, tcp://HOST:PORT>
    description: {"parent": ..., "slots": ..., "model": ..., "engine": ..., "instance": ...}  (JSON)

`publish` (a node registered) adds the entry, or replaces the attributes of one already there (left
by a crashed root, or the node restarted); `withdraw` (the node left or died) deletes it. The root's
memory stays the source of truth for liveness: the directory is a mirror that other tools can read.

ldap3 calls block, so they run in one worker thread, in order, off the root's event loop. A write
that fails later (the directory went away) is logged once, never raised; the store retries every
few seconds and, once it is back, puts the whole mirror back, so the directory converges on the
root's view: the root serves on through the outage.
Entries that a crashed root left behind and that no node claims again are swept `sweep_after`
seconds after start; a clean shutdown withdraws everything it published.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson

try:
    from ldap3 import BASE, LEVEL, MODIFY_REPLACE, Connection, Server
    from ldap3.core.exceptions import LDAPException
    from ldap3.utils.dn import escape_rdn
except ImportError:  # said clearly by `open`, not as a traceback
    Connection = None

from broker.registry import Entry
from broker.errors import Fatal

log = logging.getLogger("treechat.ldap")

NODE_CLASSES = ["applicationProcess", "labeledURIObject"]
# Seconds for connecting and for each operation, so a hung directory fails a write instead of
# stalling every later one. An int: ldap3 packs it into SO_RCVTIMEO.
TIMEOUT = 10


class DirectoryError(Exception):
    """An LDAP operation failed; the message is ready to show."""


class LdapStore:
    def __init__(self, url: str, base: str, bind_dn: str, password: str, sweep_after: float,
                 retry: float):
        self.url = url
        self.nodes_dn = f"ou=Nodes,{base}"
        self.bind_dn = bind_dn
        self.server = Server(url, connect_timeout=TIMEOUT, get_info="NO_INFO")
        self.conn = Connection(self.server, user=bind_dn, password=password, auto_bind="NONE",
                               raise_exceptions=False, receive_timeout=TIMEOUT,
                               auto_referrals=False)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ldap")
        self.sweep_after = sweep_after
        self.retry = retry
        self.sweeper: asyncio.TimerHandle | None = None
        self.mender: asyncio.Task | None = None
        # Worker-thread state only (every job runs there, in submission order):
        self.want: dict[str, dict] = {}  # name -> attributes: what the directory should hold
        self.stale: set[str] = set()  # entries found at start that no node has claimed yet
        self.broken = False  # a write failed: reconnect and resync before the next one

    # --- the root's side (event loop) -----------------------------------------------------------

    @classmethod
    async def open(cls, cfg) -> "LdapStore":
        """Connect and bind (raises Fatal with a readable reason), make sure ou=Nodes exists."""
        if Connection is None:
            raise Fatal("--registry ldap needs the ldap3 client: pip install 'treechat[ldap]'")
        try:
            password = Path(cfg.ldap_password_file).read_text().rstrip("\r\n")
        except OSError as e:
            raise Fatal(f"cannot read the LDAP password file {cfg.ldap_password_file}: "
                        f"{e.strerror}") from None
        store = cls(cfg.ldap_url, cfg.ldap_base, cfg.ldap_bind_dn, password,
                    sweep_after=cfg.dead_after * 3, retry=max(cfg.dead_after, 1.0))
        try:
            await store.call(store.start)
        except DirectoryError as e:
            store.worker.shutdown(wait=False)
            raise Fatal(str(e)) from None
        log.info("registry: writing nodes to %s under %s as %s (%d left from before)",
                 store.url, store.nodes_dn, store.bind_dn, len(store.stale))
        store.mender = asyncio.get_running_loop().create_task(store.mend())
        if store.stale:
            store.sweeper = asyncio.get_running_loop().call_later(store.sweep_after, store.submit,
                                                                  store.sweep)
        return store

    def publish(self, entry: Entry) -> None:
        # Snapshot now: the Entry object keeps changing on the loop while the job waits.
        attrs = {"cn": entry.name, "labeledURI": entry.endpoint,
                 "description": orjson.dumps({
                     "parent": entry.parent, "slots": entry.slots, "model": entry.model,
                     "engine": entry.engine, "instance": entry.instance}).decode()}
        self.submit(self.change, entry.name, attrs)

    def withdraw(self, name: str) -> None:
        self.submit(self.change, name, None)

    async def close(self) -> None:
        """Withdraw what this root published (it no longer vouches for it), then unbind."""
        for pending in (self.sweeper, self.mender):
            if pending is not None:
                pending.cancel()
        try:
            await asyncio.wait_for(self.call(self.finish), TIMEOUT * 2)
        except (asyncio.TimeoutError, DirectoryError, LDAPException, OSError) as e:
            log.warning("registry: could not withdraw the nodes from %s at shutdown: %s",
                        self.url, e or "timed out")
        self.worker.shutdown(wait=False)

    async def mend(self) -> None:
        """While the directory is unreachable, try again every few seconds even when no node
        comes or goes, so it catches up soon after it returns."""
        while True:
            await asyncio.sleep(self.retry)
            if self.broken:  # read across threads: a stale value only delays the retry a turn
                self.submit(self.change, None, None)

    def submit(self, fn, *args) -> None:
        self.worker.submit(self.guard, fn, *args)

    async def call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    def guard(self, fn, *args) -> None:
        """Run a job in the worker; a failure is logged and marks the connection for a resync."""
        try:
            fn(*args)
        except (DirectoryError, LDAPException, OSError) as e:
            # Said once per outage; the mender retries quietly until the directory is back.
            log.log(logging.DEBUG if self.broken else logging.WARNING,
                    "registry: LDAP write failed (%s); retrying every %.0fs", e, self.retry)
            self.broken = True

    # --- the worker thread ----------------------------------------------------------------------

    def start(self) -> None:
        self.connect()
        if not self.exists(self.nodes_dn):
            # A fresh directory: create the container (the registrar's ACL must allow it).
            self.check(self.conn.add(self.nodes_dn, ["organizationalUnit"], {"ou": "Nodes"}),
                       f"creating {self.nodes_dn}")
        self.stale = set(self.names())

    def connect(self) -> None:
        try:
            self.conn.open()
        except (LDAPException, OSError) as e:
            raise DirectoryError(f"the LDAP directory at {self.url} is unreachable: {e}") from None
        try:
            bound = self.conn.bind()
        except LDAPException as e:
            raise DirectoryError(f"LDAP bind as {self.bind_dn} at {self.url} failed: {e}") from None
        if not bound:
            raise DirectoryError(f"LDAP bind as {self.bind_dn} failed: {self.reason()}")

    def reconnect(self) -> None:
        try:
            self.conn.unbind()
        except LDAPException:
            pass
        self.connect()
        log.info("registry: reconnected to %s; putting back %d nodes", self.url, len(self.want))
        for name in set(self.names()) - set(self.want) - self.stale:
            self.delete(name)
        for name, attrs in list(self.want.items()):
            self.write(name, attrs)
        self.broken = False

    def change(self, name: str | None, attrs: dict | None) -> None:
        """Note that `name` now has `attrs` (None: is gone), then make it so in the directory.
        The note comes first, so a change made while the directory is down is not lost: the
        reconnect puts back the whole mirror. `name` None: only retry a broken connection."""
        if name is not None:
            if attrs is None:
                self.want.pop(name, None)
            else:
                self.want[name] = attrs
            self.stale.discard(name)
        if self.broken:
            self.reconnect()
        elif attrs is not None:
            self.write(name, attrs)
        elif name is not None:
            self.delete(name)

    def write(self, name: str, attrs: dict) -> None:
        dn = self.dn(name)
        if self.exists(dn):  # a stale entry, or a node that registered again: replace in place
            changes = {k: [(MODIFY_REPLACE, [v])] for k, v in attrs.items() if k != "cn"}
            if self.conn.modify(dn, changes):
                return
            # Refused (say, an entry of another object class that some tool left): replace it.
            log.info("registry: replacing %s (%s)", dn, self.reason())
            self.delete(name)
            self.check(self.conn.add(dn, NODE_CLASSES, attrs), f"replacing {dn}")
        else:
            self.check(self.conn.add(dn, NODE_CLASSES, attrs), f"adding {dn}")

    def delete(self, name: str) -> None:
        ok = self.conn.delete(self.dn(name))
        if not ok and self.conn.result.get("result") != 32:  # noSuchObject: already gone
            self.check(ok, f"deleting {self.dn(name)}")

    def sweep(self) -> None:
        """Delete entries left from before this root that no node re-registered."""
        gone, self.stale = self.stale, set()
        if self.broken:
            return self.reconnect()  # its resync deletes every entry nobody claims
        for name in sorted(gone):
            log.info("registry: removing %s: left by an earlier root, never re-registered", name)
            self.delete(name)

    def finish(self) -> None:
        if self.broken:
            self.reconnect()
        for name in list(self.want):
            self.delete(name)
        self.conn.unbind()

    # --- helpers --------------------------------------------------------------------------------

    def dn(self, name: str) -> str:
        return f"cn={escape_rdn(name)},{self.nodes_dn}"

    def exists(self, dn: str) -> bool:
        if self.conn.search(dn, "(objectClass=*)", BASE, attributes=["1.1"]):
            return True
        if self.conn.result.get("result") == 32:  # noSuchObject
            return False
        raise DirectoryError(f"LDAP search for {dn} failed: {self.reason()}")

    def names(self) -> list[str]:
        ok = self.conn.search(self.nodes_dn, "(objectClass=applicationProcess)", LEVEL,
                              attributes=["cn"])
        if not ok and self.conn.result.get("result") != 0:
            raise DirectoryError(f"LDAP search under {self.nodes_dn} failed: {self.reason()}")
        return [str(e.cn.value) for e in self.conn.entries]

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            raise DirectoryError(f"LDAP {what} as {self.bind_dn} failed: {self.reason()}")

    def reason(self) -> str:
        r = self.conn.result or {}
        text = r.get("description") or "no answer"
        text = {"invalidCredentials": "invalid credentials"}.get(text, text)
        return f"{text} ({r['message']})" if r.get("message") else text
