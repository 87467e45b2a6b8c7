"""The target `treechat bench`'s flags name: --base-url (HTTPTarget), --tcp (TCPTarget) or --root
(RootTarget), each with the options every target takes. Above `bench.clients` and
`bench.http_client`, which it picks between."""

from __future__ import annotations

import orjson

from bench.clients import RootTarget, Target, TCPTarget
from bench.http_client import HTTPTarget
from treechat import tls as tlsopt


def target_options(args) -> dict:
    """The options every target takes, from `treechat bench`'s flags."""
    extra = {}
    if args.extra_body:
        try:
            extra = orjson.loads(args.extra_body)
        except orjson.JSONDecodeError as e:
            raise ValueError(f"--extra-body is not JSON: {e}") from None
        if not isinstance(extra, dict):
            raise ValueError("--extra-body must be a JSON object")
    return {"ignore_eos": args.ignore_eos, "timeout": args.request_timeout, "extra": extra}


def make_target(args) -> Target:
    kw = target_options(args)
    chosen = [x for x in (args.base_url, args.tcp, args.root) if x]
    if len(chosen) != 1:
        raise ValueError("give exactly one target: --base-url URL, --tcp HOST:PORT or --root HOST:PORT")
    context = tlsopt.client_context_of(args) if tlsopt.wants_tls(args) else None
    if args.base_url:
        return HTTPTarget(args.base_url, args.endpoint, args.model, args.api_key, tls=context, **kw)
    if args.root and context is not None:
        raise ValueError("--root speaks ZeroMQ (CurveZMQ encrypts it), not TLS: drop --tls*")
    if args.tcp:
        return TCPTarget(args.tcp, tls=context, api_key=args.api_key, **kw)
    return RootTarget(args.root, **kw)
