"""CurveZMQ for every treechat socket: encryption, and only holders of an authorized key may join.

The original registry only let system hosts register (authenticated LDAP contexts); treechat does
the same on the sockets themselves. A key folder (`--curve DIR`):

    DIR/server.key, server.key_secret     the tree's listening keypair (the root's three sockets,
                                          every node's `down` socket); every member knows server.key
    DIR/<member>.key, <member>.key_secret one keypair per member: node-1, http-gateway, cli, ...
    DIR/authorized/<member>.key           the public keys a listening socket lets in

`treechat keys DIR` creates a folder (the server keypair and a member `client`); `--add NAME`
makes and authorizes another member, `--revoke NAME` takes one out. A listening socket checks
`authorized/` at every handshake (ZeroMQ's ZAP, on pyzmq's authenticator thread) and reads it again
when it changes, so a revoked key cannot connect again; a connection it already holds lasts until
it drops (restart that process to cut it at once). A peer without an authorized key never
completes the handshake; its own side sees why (`broker.sockets.refusal`) and says so.

`treechat up` without `--curve` makes a fresh folder for its own tree on every start, at
`tree_folder(host, port)`, readable by this user only, with up's pid in it: `running_tree(root)`
finds it while that `up` lives, so `treechat status`, the bench and the tests' clients use it
without a flag, and nothing else on the machine can join. `--insecure` turns CurveZMQ off; a
process refuses to listen on a non-loopback address without keys unless it is given
(`require_keys`).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import threading
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

SERVER = "server"
CLIENT = "client"  # the member `treechat keys DIR` creates, used when a process names none


def valid_name(name: str) -> bool:
    """A member's (and so a node's) name: letters, digits, '-', '_' or '.'; it names key files."""
    return bool(name) and name.replace("-", "").replace("_", "").replace(".", "").isalnum()


def check_member(name: str) -> str:
    if not valid_name(name):
        raise ValueError(f"bad key name '{name}': use letters, digits, '-', '_' or '.'")
    if name == SERVER:
        raise ValueError("'server' is the tree's own listening key; choose another name")
    return name


class Authorized:
    """The public keys of `DIR/authorized/`, read again whenever the folder changes (ZAP calls
    `callback` on its own thread, once per handshake)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._lock = threading.Lock()
        self._stamp: int | None = None
        self._keys: set[bytes] = set()

    def callback(self, _domain: str, z85_key: bytes) -> bool:
        with self._lock:
            try:
                stamp = self.folder.stat().st_mtime_ns
            except OSError:
                return False
            if stamp != self._stamp:
                self._keys = set(_publics(self.folder))  # certificates hold them in Z85, as ZAP
                self._stamp = stamp
            return z85_key in self._keys


def _publics(folder: Path) -> list[bytes]:
    keys = []
    for path in sorted(folder.glob("*.key")):
        try:
            public, _ = zmq.auth.load_certificate(path)
        except (OSError, ValueError):
            continue  # a half-written or foreign file is no key
        keys.append(public)
    return keys


class Curve:
    """The keys one process uses: `member`'s keypair to connect, the server keypair to listen
    (`member` None: a process that only listens, the root)."""

    def __init__(self, folder: str | Path, member: str | None = CLIENT):
        self.folder = Path(folder)
        self.member = member
        self.client_public = self.client_secret = None
        try:
            self.server_public, _ = zmq.auth.load_certificate(self.folder / f"{SERVER}.key")
            if member is not None:
                self.client_public, self.client_secret = zmq.auth.load_certificate(
                    self.folder / f"{member}.key_secret")
        except (OSError, ValueError) as e:
            raise ValueError(f"--curve {folder}: cannot read the keys of '{member}' ({e}); create "
                             "them with `treechat keys DIR` (--add NAME for a member)") from None
        self.authorized = self.folder / "authorized"
        self._auth: ThreadAuthenticator | None = None
        self._server_secret: bytes | None = None

    def server(self, sock: zmq.Socket) -> None:
        """Make a listening socket accept only authorized clients."""
        if self._auth is None:  # one ZAP handler per process serves every listening socket
            try:
                _, self._server_secret = zmq.auth.load_certificate(
                    self.folder / f"{SERVER}.key_secret")
            except (OSError, ValueError) as e:
                raise ValueError(f"--curve {self.folder}: a listening process needs "
                                 f"server.key_secret ({e})") from None
            self._auth = ThreadAuthenticator(zmq.Context.instance())
            self._auth.start()
            self._auth.configure_curve_callback("*", Authorized(self.authorized))
        sock.curve_secretkey = self._server_secret
        sock.curve_publickey = self.server_public
        sock.curve_server = True

    def client(self, sock: zmq.Socket) -> None:
        sock.curve_secretkey = self.client_secret
        sock.curve_publickey = self.client_public
        sock.curve_serverkey = self.server_public

    def close(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None


def load(folder: str | None, member: str | None = CLIENT) -> Curve | None:
    return Curve(folder, member) if folder else None


# --- key folders ---------------------------------------------------------------------------------


def create_keys(folder: str | Path, members: tuple[str, ...] = (CLIENT,)) -> list[Path]:
    """A new folder: the server keypair and `members`, each authorized. Never overwrites."""
    folder = Path(folder)
    if (folder / f"{SERVER}.key_secret").exists():
        raise ValueError(f"{folder} already holds keys; add members with --add NAME, or choose "
                         "another folder")
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    (folder / "authorized").mkdir(exist_ok=True)
    written = _keypair(folder, SERVER)
    for name in members:
        written += add_member(folder, name)
    return written


def add_member(folder: str | Path, name: str) -> list[Path]:
    """Make `name`'s keypair and authorize it (its public key into authorized/)."""
    folder = Path(folder)
    check_member(name)
    if not (folder / f"{SERVER}.key").exists():
        raise ValueError(f"{folder} holds no tree keys; create them with `treechat keys {folder}`")
    if (folder / f"{name}.key_secret").exists():
        raise ValueError(f"{folder} already has a key named '{name}'")
    written = _keypair(folder, name)
    shutil.copy(folder / f"{name}.key", folder / "authorized" / f"{name}.key")
    return written + [folder / "authorized" / f"{name}.key"]


def revoke_member(folder: str | Path, name: str) -> list[Path]:
    """Take `name` out: no listening socket lets its key in again. Its keypair is deleted too."""
    folder = Path(folder)
    check_member(name)
    paths = [folder / "authorized" / f"{name}.key", folder / f"{name}.key",
             folder / f"{name}.key_secret"]
    if not paths[0].exists():
        raise ValueError(f"{folder} authorizes no key named '{name}'")
    for path in paths:
        path.unlink(missing_ok=True)
    return paths


def members(folder: str | Path) -> list[str]:
    """The names authorized in `folder`."""
    return sorted(p.stem for p in (Path(folder) / "authorized").glob("*.key"))


def _keypair(folder: Path, name: str) -> list[Path]:
    public, secret = zmq.auth.create_certificates(folder, name)
    Path(secret).chmod(0o600)
    return [Path(public), Path(secret)]


# --- the keys `treechat up` makes for its own tree -----------------------------------------------


def keys_base() -> Path:
    """Where `treechat up` keeps its trees' keys: $TREECHAT_KEYS, else the user's runtime folder."""
    if os.environ.get("TREECHAT_KEYS"):
        return Path(os.environ["TREECHAT_KEYS"])
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "treechat" / "keys"
    return Path.home() / ".cache" / "treechat" / "keys"


def tree_folder(host: str, port: int) -> Path:
    return keys_base() / f"{host}_{port}"


def create_tree_keys(host: str, port: int, names: list[str]) -> Path:
    """Fresh keys for the tree `treechat up` (this process) starts at host:port."""
    folder = tree_folder(host, port)
    base = folder.parent
    base.mkdir(parents=True, exist_ok=True)
    base.chmod(0o700)
    shutil.rmtree(folder, ignore_errors=True)  # an earlier up's keys: never reused
    create_keys(folder, tuple(names))
    (folder / "owner").write_text(owner_stamp(os.getpid()))
    return folder


def running_tree(root: str) -> Path | None:
    """The key folder of the `treechat up` serving `root` (HOST:PORT) on this machine, if one
    runs (its owner file names a live process), else None."""
    host, _, port = root.rpartition(":")
    folder = tree_folder(host, int(port)) if port.isdigit() else None
    try:
        owner = (folder / "owner").read_text()
    except (AttributeError, OSError):
        return None
    return folder if is_live(owner) else None


def where_keys_are(root: str) -> str:
    """Where a client finds the keys of the tree at `root` (HOST:PORT), for one that has none."""
    host, _, port = root.rpartition(":")
    return (f"the folder its root was started with; a `treechat up` keeps its own in "
            f"{tree_folder(host, int(port))}, which its user's commands use without a flag "
            "while it runs")


def is_live(stamp: str) -> bool:
    """Whether the process an `owner_stamp` names still runs (and is not a reused pid)."""
    try:
        pid = int(stamp.split()[0])
    except (ValueError, IndexError):
        return False
    return owner_stamp(pid) == stamp


def owner_stamp(pid: int) -> str:
    """`pid` and its start time (Linux), so a reused pid does not pass for a live owner."""
    try:
        start = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except OSError:
            return ""
        start = "?"
    return f"{pid} {start}"


# --- listening without keys ----------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name, or a wildcard such as '*' or '0.0.0.0': reachable from outside


def require_keys(host: str, keys: bool, insecure: bool, what: str) -> None:
    """Refuse (ValueError) to listen on a non-loopback `host` without keys, unless --insecure."""
    if not keys and not insecure and not is_loopback(host):
        raise ValueError(f"refusing to listen on {host} without {what}: anyone who reaches it "
                         "could use it. Give keys, or pass --insecure to do it anyway")
