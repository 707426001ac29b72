"""`genadapter serve`: the HTTP server on uvicorn."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
from urllib.parse import urlsplit

from ..options import add_model_args

log = logging.getLogger(__name__)

API_KEY_ENV = "GENADAPTER_API_KEY"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_origin(origin: str) -> str:
    """`origin` if it is a browser origin (scheme://host[:port], no path) or "*"; ValueError
    otherwise (a trailing slash or a path never matches the Origin header a browser sends)."""
    if origin == "*":
        return origin
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc or origin.endswith("/"):
        raise ValueError(
            f"--cors-origin {origin}: not an origin; give scheme://host[:port] with no path, "
            "such as https://app.example.com or http://localhost:5173, or *"
        )
    if parts.path or parts.query or parts.fragment:
        raise ValueError(f"--cors-origin {origin}: an origin has no path, query or fragment")
    return origin


def cmd_serve(args: argparse.Namespace) -> int:
    if not is_loopback(args.host) and not args.api_key:
        raise ValueError(
            f"binding {args.host} exposes the server beyond this machine: give --api-key "
            f"(or set {API_KEY_ENV})"
        )
    if args.port is not None and not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    for option in ("session_memory_tokens", "memory_cap_bytes"):
        if getattr(args, option) < 1:
            raise ValueError(f"--{option.replace('_', '-')} must be at least 1")
    origins = tuple(check_origin(o) for o in args.cors_origin or ())
    import uvicorn

    from ..options import load_model
    from .app import ServerConfig, create_app

    config = ServerConfig(
        api_key=args.api_key or None,
        max_document_bytes=args.max_document_bytes,
        max_document_tokens=args.max_document_tokens,
        max_batch=args.max_batch,
        session_memory_tokens=args.session_memory_tokens,
        memory_cap_bytes=args.memory_cap_bytes,
        cors_origins=origins,
    )
    app = create_app(load_model(args), args.store, config)
    logging.getLogger("genadapter").setLevel(logging.INFO)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def add_serve_parser(sub) -> None:
    """Register `serve` on the command line's subparsers."""
    serve = sub.add_parser(
        "serve",
        help="HTTP server: sessions and OpenAI-compatible chat",
        description="Serve sessions and OpenAI-compatible chat over HTTP (a chat page at /).",
    )
    add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to bind (default: 8000)")
    serve.add_argument("--store", required=True, metavar="DIR", help="where sessions are kept")
    serve.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"clients must send 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}, else "
        "none); required when binding a non-loopback address",
    )
    serve.add_argument(
        "--max-document-bytes",
        type=int,
        default=4 << 20,
        metavar="N",
        help="largest document accepted (default: 4194304, 4 MiB)",
    )
    serve.add_argument(
        "--max-document-tokens",
        type=int,
        default=1 << 20,
        metavar="N",
        help="most tokens in one document (default: 1048576)",
    )
    serve.add_argument(
        "--max-batch",
        type=int,
        default=32,
        metavar="N",
        help="chats decoded together (default: 32)",
    )
    serve.add_argument(
        "--session-memory-tokens",
        type=int,
        default=32768,
        metavar="N",
        help="most tokens of context memory one session holds; a document past it is refused "
        "(default: 32768)",
    )
    serve.add_argument(
        "--memory-cap-bytes",
        type=int,
        default=4 << 30,
        metavar="N",
        help="most bytes of session memory loaded at once; idle sessions are spilled to the "
        "store to make room (default: 4294967296, 4 GiB)",
    )
    serve.add_argument(
        "--cors-origin",
        action="append",
        metavar="ORIGIN",
        help="let browser pages from ORIGIN (scheme://host[:port]; * for any) call the API; "
        "repeatable (default: none, browsers on other origins are refused)",
    )
    serve.set_defaults(run=cmd_serve)
