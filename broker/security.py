"""CurveZMQ for every treechat socket: encryption, and only holders of an authorized key may join.

The original registry only let system hosts register (authenticated LDAP contexts). Across
machines treechat does the same on the sockets themselves. `treechat keys DIR` writes:

    DIR/server.key, server.key_secret   one keypair for every listening socket (root, node `down`)
    DIR/client.key, client.key_secret   the keypair every connecting socket presents
    DIR/authorized/client.key           public keys allowed to connect (add more, one file each)

Copy DIR to every machine of the tree and pass `--curve DIR` to every process. A listening
socket then accepts only clients whose public key is in `authorized/` (ZeroMQ's ZAP handler,
run by pyzmq's authenticator thread); a peer without it never completes the handshake.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator


class Curve:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        try:
            self.server_public, self.server_secret = zmq.auth.load_certificate(
                self.folder / "server.key_secret")
            self.client_public, self.client_secret = zmq.auth.load_certificate(
                self.folder / "client.key_secret")
        except (OSError, ValueError) as e:
            raise ValueError(f"--curve {folder}: cannot read the keys ({e}); "
                             "create them with `treechat keys DIR`") from None
        self.authorized = self.folder / "authorized"
        self._auth: ThreadAuthenticator | None = None

    def server(self, sock: zmq.Socket) -> None:
        """Make a listening socket accept only authorized clients."""
        if self._auth is None:  # one ZAP handler per process serves every listening socket
            self._auth = ThreadAuthenticator(zmq.Context.instance())
            self._auth.start()
            self._auth.configure_curve(domain="*", location=str(self.authorized))
        sock.curve_secretkey = self.server_secret
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


def load(folder: str | None) -> Curve | None:
    return Curve(folder) if folder else None


def create_keys(folder: str | Path) -> list[Path]:
    """Write a server and a client keypair, and authorize the client. Never overwrites."""
    folder = Path(folder)
    if (folder / "server.key_secret").exists():
        raise ValueError(f"{folder} already holds keys; remove them first or choose another folder")
    (folder / "authorized").mkdir(parents=True, exist_ok=True)
    written = []
    for name in ("server", "client"):
        public, secret = zmq.auth.create_certificates(folder, name)
        Path(secret).chmod(0o600)
        written += [Path(public), Path(secret)]
    shutil.copy(folder / "client.key", folder / "authorized" / "client.key")
    return written
