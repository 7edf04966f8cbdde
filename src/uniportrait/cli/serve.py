"""``uniportrait serve``: the web UI and the REST API in one process, sharing one pipeline."""

from __future__ import annotations

import argparse
import ipaddress
import logging

from uniportrait.cli._common import add_limit_args, add_model_args, limits_from_args, load_pipeline_from_args
from uniportrait.errors import UniPortraitError

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve the web UI (/ui) and the REST API (/v1, docs at /docs)",
        description="Serve the web UI at /ui and the REST API at /v1 (OpenAPI docs at /docs) from one "
        "process and one shared pipeline. Set UNIPORTRAIT_API_KEY to require a key (the UI then asks "
        "for it as its password).",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)"
    )
    parser.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860)")
    parser.add_argument(
        "--allowed-hosts",
        default="",
        metavar="NAME[,NAME...]",
        help="Host names to answer besides localhost, IP addresses and --host (e.g. the name a proxy "
        "forwards); '*' answers any. Protects against DNS rebinding (see docs/security.md)",
    )
    parser.add_argument("--workers", type=int, default=1, help="generation threads (default 1)")
    parser.add_argument("--queue-size", type=int, default=8, help="requests that may wait; more get HTTP 429")
    parser.add_argument("--timeout", type=float, default=600.0, help="per-request time limit in seconds")
    add_limit_args(parser)
    parser.add_argument("--max-upload-mb", type=float, default=10.0, help="per uploaded photo (default 10)")
    parser.add_argument(
        "--max-pixels", type=int, default=16_000_000, help="per uploaded photo (default 16000000)"
    )
    parser.add_argument("--no-ui", action="store_true", help="serve only the REST API (no gradio needed)")
    parser.add_argument("--temp-dir", default=None,
                        help="the web UI's uploads and results (default: a new folder, removed at exit)")  # fmt: skip
    parser.add_argument("--temp-ttl", type=float, default=3600.0,
                        help="delete the UI's temporary files older than this many seconds (default 3600)")  # fmt: skip
    parser.add_argument("--home", default=None, help="identity bank location (default: $UNIPORTRAIT_HOME)")
    from uniportrait.server.config import ServerConfig

    parser.add_argument(
        "--body-timeout",
        type=float,
        default=ServerConfig.body_timeout_s,
        help=f"seconds a request body may take to arrive, else 408 (default {ServerConfig.body_timeout_s:g})",
    )
    add_model_args(parser)
    parser.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    from uniportrait.server.config import MB, Limits, ServerConfig

    try:
        limits = Limits(
            **vars(limits_from_args(args)),
            max_upload_bytes=int(args.max_upload_mb * MB),
            max_pixels=args.max_pixels,
        )
        return ServerConfig(
            limits=limits,
            workers=args.workers,
            queue_size=args.queue_size,
            timeout_s=args.timeout,
            api_key=ServerConfig.api_key_from_env(),
            home=args.home,
            preset=args.preset,  # its default side and steps
            ui=not args.no_ui,
            host=args.host,
            temp_dir=args.temp_dir,
            temp_ttl_s=args.temp_ttl,
            body_timeout_s=args.body_timeout,
            allowed_hosts=tuple(h for h in args.allowed_hosts.split(",") if h.strip()),
        )
    except ValueError as err:
        raise UniPortraitError(str(err)) from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_address(host: str, port: int) -> None:
    """Fail before the model loads when the port is invalid or already taken."""
    import socket

    if not 1 <= port <= 65535:
        raise UniPortraitError(f"--port must be between 1 and 65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise UniPortraitError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    check_address(args.host, args.port)
    try:
        import uvicorn
    except ImportError:
        raise UniPortraitError("serving needs the 'serve' extra: pip install 'uniportrait[serve]'") from None
    from uniportrait.server import API_KEY_ENV, create_app

    if not is_loopback(args.host) and config.api_key is None:
        logger.warning(
            "binding %s without an API key: anyone who can reach this port can use it (set %s)",
            args.host,
            API_KEY_ENV,
        )
    pipe = load_pipeline_from_args(args)
    pipe.set_progress_bar_config(disable=True)
    app = create_app(pipe, config)
    base = f"http://{f'[{args.host}]' if ':' in args.host else args.host}:{args.port}"
    logger.info("%sAPI docs: %s/docs", f"web UI: {base}/ui  " if config.ui else "", base)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info")
    return 0
