"""TLS at the edges: the gateways' certificate flags, and the clients' verification flags.

No process or socket of its own: the HTTP gateway passes `server_context()` to Tornado's
HTTPServer and the TCP gateway to its TCPServer (`ssl_options`); `treechat chat` and
`treechat bench` wrap their connections in `client_context()`. The tree's own links (ZeroMQ)
are not TLS: CurveZMQ encrypts them (`broker/security.py`).

    gateway:  --tls-cert FILE --tls-key FILE        serve HTTPS / TLS (PEM files; the cert file may
                                                    hold the chain, leaf first)
    client:   --tls                                 TCP over TLS (HTTP: an https:// URL says it)
              --tls-ca FILE                         trust the CA (or self-signed cert) in FILE
              --tls-no-verify                       no certificate check at all (self-signed tests)

A client verifies by default against the system's CAs, and checks the host name or IP address
it connects to against the certificate, as curl and browsers do.
"""

from __future__ import annotations

import argparse
import os
import ssl


def add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-cert", default=None, metavar="FILE",
                   help="serve TLS with this certificate (PEM, chain after the leaf); needs --tls-key")
    p.add_argument("--tls-key", default=None, metavar="FILE", help="the certificate's private key (PEM)")


def server_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """A server context for `--tls-cert`/`--tls-key`, None without them; ValueError says what is
    wrong with the files (so the gateway fails at start, not at the first handshake)."""
    if not cert and not key:
        return None
    if not cert or not key:
        raise ValueError("--tls-cert and --tls-key go together: give both or neither")
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        if not os.access(path, os.R_OK):
            raise ValueError(f"{flag} {path}: no such file, or it cannot be read")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)  # TLS 1.2+, no compression
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"cannot load --tls-cert {cert} with --tls-key {key}: {e}") from None
    return ctx


def add_client_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("TLS (an https:// URL turns it on for HTTP)")
    g.add_argument("--tls", action="store_true", help="speak TLS to the TCP gateway")
    g.add_argument("--tls-ca", default=None, metavar="FILE",
                   help="verify the server against the CA certificate(s) in FILE instead of the "
                        "system's (a self-signed certificate is its own CA); implies --tls")
    g.add_argument("--tls-no-verify", action="store_true",
                   help="do not check the server's certificate at all (testing with a "
                        "self-signed certificate only); implies --tls")


def wants_tls(args: argparse.Namespace) -> bool:
    return bool(args.tls or args.tls_ca or args.tls_no_verify)


def client_context(ca: str | None = None, verify: bool = True) -> ssl.SSLContext:
    """A client context: the system's CAs (or `ca`), host name checked; `verify=False` checks
    nothing (encrypted, but anyone in the middle could answer)."""
    try:
        ctx = ssl.create_default_context(cafile=ca)
    except FileNotFoundError:
        raise ValueError(f"--tls-ca {ca}: no such file") from None
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"--tls-ca {ca}: not a PEM certificate file ({e})") from None
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_context_of(args: argparse.Namespace) -> ssl.SSLContext:
    return client_context(args.tls_ca, verify=not args.tls_no_verify)


def describe(err: BaseException) -> str:
    """A handshake failure in words a user can act on."""
    if isinstance(err, ssl.SSLCertVerificationError):
        return (f"the server's certificate did not verify ({err.verify_message}); pass "
                "--tls-ca FILE with the CA that signed it (or --tls-no-verify to test)")
    if isinstance(err, ssl.SSLError):
        return f"TLS failed ({err.reason or err}); is the server speaking TLS on that port?"
    return str(err)
