"""The ``aiserver`` console script: ``serve`` runs the service, ``gateway`` the HTTP shim
alone, and the other commands are clients of a running service (``aiserver --help``)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from aiserver import __version__
from aiserver.cli_client import add_client_commands, run_client_command
from aiserver.config import load_settings
from aiserver.logs import configure_logging

__all__ = ["main"]

# Plain text: argparse prints it as it is (the module docstring is for readers of the code).
_DESCRIPTION = "AI Server's image tasks as a gRPC service that runs them on ComfyUI agents."
_EPILOG = """\
serve and gateway run servers; every other command is a client of a running
service, found at --server HOST:PORT or $AISERVER_ADDRESS (default
localhost:50051). Each command has its own --help.

examples:
  aiserver serve --port 50051
  aiserver upscale photo.png -o photo-2x.png
  aiserver convert photo.png --format webp -o photo.webp
  aiserver jobs list --state running
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="aiserver",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="run the gRPC service")
    serve_cmd.add_argument("--host", help="bind address (AISERVER_GRPC_HOST)")
    serve_cmd.add_argument("--port", type=int, help="gRPC port (AISERVER_GRPC_PORT)")
    serve_cmd.add_argument("--data-dir", help="data folder (AISERVER_DATA_DIR)")
    serve_cmd.add_argument("--http-port", type=int, help="HTTP shim port (AISERVER_HTTP_PORT)")
    add_client_commands(commands)
    commands.add_parser(
        "gateway",
        help="run the HTTP shim alone, in front of a remote gRPC target",
        add_help=False,
    )
    args, rest = parser.parse_known_args(argv)
    if args.command == "gateway":
        from aiserver.gateway import main as gateway_main

        return gateway_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command != "serve":
        return run_client_command(args)

    overrides = {
        key: value
        for key, value in (
            ("grpc_host", args.host),
            ("grpc_port", args.port),
            ("data_dir", args.data_dir),
            ("http_port", args.http_port),
        )
        if value is not None
    }
    try:
        settings = load_settings(overrides=overrides)
    except (ValueError, TypeError, OSError) as exc:
        print(f"aiserver: bad configuration: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, json_lines=settings.log_json)

    from aiserver.auth import ConfigError
    from aiserver.server import StartupError, serve  # late: grpc's import cost for `serve` only

    try:
        asyncio.run(serve(settings))
    except ConfigError as exc:
        print(f"aiserver: bad configuration: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"aiserver: cannot start: {exc}", file=sys.stderr)
        return 2
    return 0
