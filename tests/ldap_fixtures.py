"""A real OpenLDAP `slapd` for the registry tests, on a free 127.0.0.1 port, in a temp dir.

    def test_x(slapd, cluster):
        root, _ = cluster.root(*slapd.root_args())
        slapd.nodes()   # {"node-1": {"labeledURI": "tcp://...", "description": {...}}, ...}

The directory: mdb database, suffix dc=treechat,dc=local, core + cosine schema, loaded offline with
`slapadd` before slapd starts (so no rootdn/rootpw exists at all). Accounts, both with a salted
SHA password made by `slappasswd`:

    cn=registrar,dc=treechat,dc=local   may write under ou=Nodes (the root binds as this one)
    cn=guest,dc=treechat,dc=local       authenticated, but may only read

ACLs: passwords are usable only to bind; the registrar writes under ou=Nodes; everyone (anonymous
included) reads everything else. Skipped, with the reason, only when slapd is not installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import free_ports

SUFFIX = "dc=treechat,dc=local"
SCHEMA = Path("/etc/ldap/schema")
MODULES = Path("/usr/lib/ldap")

CONFIG = """\
include {schema}/core.schema
include {schema}/cosine.schema
pidfile {dir}/slapd.pid
argsfile {dir}/slapd.args
{modules}
database mdb
maxsize 16777216
suffix "{suffix}"
directory {dir}/data

access to attrs=userPassword
    by anonymous auth
    by * none
access to dn.subtree="ou=Nodes,{suffix}"
    by dn.exact="{registrar}" write
    by * read
access to *
    by * read
"""

BASE_LDIF = """\
dn: {suffix}
objectClass: dcObject
objectClass: organization
dc: treechat
o: treechat

dn: ou=Nodes,{suffix}
objectClass: organizationalUnit
ou: Nodes

dn: {registrar}
objectClass: organizationalRole
objectClass: simpleSecurityObject
cn: registrar
userPassword: {registrar_hash}

dn: {guest}
objectClass: organizationalRole
objectClass: simpleSecurityObject
cn: guest
userPassword: {guest_hash}
"""


class Slapd:
    registrar = f"cn=registrar,{SUFFIX}"
    guest = f"cn=guest,{SUFFIX}"
    password = "registrar-s3cret"
    guest_password = "guest-s3cret"
    suffix = SUFFIX

    def __init__(self, workdir: Path):
        self.dir = workdir
        self.port = free_ports(1)[0]
        self.url = f"ldap://127.0.0.1:{self.port}"
        self.password_file = workdir / "registrar.password"
        self.password_file.write_text(self.password + "\n")
        self.proc: subprocess.Popen | None = None
        self.configure()

    def configure(self) -> None:
        (self.dir / "data").mkdir()
        slapd = Path(shutil.which("slapd") or "/usr/sbin/slapd")
        modules = f"modulepath {MODULES}\nmoduleload back_mdb" if MODULES.exists() else ""
        (self.dir / "slapd.conf").write_text(CONFIG.format(
            schema=SCHEMA, dir=self.dir, modules=modules, suffix=SUFFIX, registrar=self.registrar))
        (self.dir / "base.ldif").write_text(BASE_LDIF.format(
            suffix=SUFFIX, registrar=self.registrar, guest=self.guest,
            registrar_hash=self.hash(self.password), guest_hash=self.hash(self.guest_password)))
        subprocess.run([str(slapd.with_name("slapadd")), "-f", str(self.dir / "slapd.conf"),
                        "-l", str(self.dir / "base.ldif")], check=True, capture_output=True,
                       timeout=30)

    @staticmethod
    def hash(password: str) -> str:
        out = subprocess.run([shutil.which("slappasswd") or "/usr/sbin/slappasswd", "-s", password],
                             check=True, capture_output=True, text=True, timeout=30)
        return out.stdout.strip()

    def start(self, timeout: float = 20.0) -> None:
        # -d 0: stay in the foreground (so we own the process) without debug output.
        self.proc = subprocess.Popen(
            [shutil.which("slapd") or "/usr/sbin/slapd", "-f", str(self.dir / "slapd.conf"),
             "-h", f"{self.url}/", "-d", "0"],
            stdout=open(self.dir / "slapd.log", "ab"), stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"slapd did not start (exit {self.proc.poll()}):\n"
                                   + (self.dir / "slapd.log").read_text(errors="replace"))
            time.sleep(0.05)

    def answers(self) -> bool:
        from ldap3 import Connection, Server
        try:
            conn = Connection(Server(self.url, connect_timeout=1, get_info="NO_INFO"),
                              receive_timeout=2)
            ok = conn.bind()
            conn.unbind()
            return ok
        except Exception:  # noqa: BLE001  (any failure means "not yet")
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def root_args(self, password_file: Path | None = None) -> list[str]:
        return ["--registry", "ldap", "--ldap-url", self.url, "--ldap-bind-dn", self.registrar,
                "--ldap-password-file", str(password_file or self.password_file)]

    def connect(self, user: str | None = None, password: str | None = None):
        """An ldap3 connection, bound as `user` (anonymous when None); check `.bound`."""
        from ldap3 import Connection, Server
        conn = Connection(Server(self.url, connect_timeout=5, get_info="NO_INFO"), user=user,
                          password=password, receive_timeout=10, raise_exceptions=False)
        conn.bind()
        return conn

    def nodes(self) -> dict[str, dict]:
        """Every node entry under ou=Nodes, read anonymously: name -> attributes."""
        import orjson
        from ldap3 import LEVEL
        conn = self.connect()
        try:
            conn.search(f"ou=Nodes,{SUFFIX}", "(objectClass=applicationProcess)", LEVEL,
                        attributes=["cn", "labeledURI", "description", "objectClass"])
            return {str(e.cn.value): {"dn": e.entry_dn, "labeledURI": str(e.labeledURI.value),
                                      "description": (orjson.loads(str(e.description.value))
                                                      if e.description.value else None),
                                      "objectClass": set(e.objectClass.values)}
                    for e in conn.entries}
        finally:
            conn.unbind()


@pytest.fixture(name="slapd")
def slapd_fixture(tmp_path_factory):
    if shutil.which("slapd") is None and not os.path.exists("/usr/sbin/slapd"):
        pytest.skip("OpenLDAP slapd is not installed (apt-get install slapd ldap-utils)")
    server = Slapd(tmp_path_factory.mktemp("slapd"))
    server.start()
    yield server
    server.stop()
