"""``aiserver gateway``: the HTTP shim on its own, in front of a (possibly remote) gRPC target."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

import grpc

from aiserver.gateway.app import Gateway
from aiserver.gateway.backend import GatewaySettings

__all__ = ["main", "parser", "run"]

logger = logging.getLogger(__name__)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="aiserver gateway",
        description="HTTP/JSON and AI Server REST in front of the imagetasks gRPC service.",
    )
    p.add_argument("--target", default="127.0.0.1:50051", help="gRPC target, host:port")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (0: any)")
    p.add_argument("--tls", action="store_true", help="use TLS to the target (system roots)")
    p.add_argument("--root-certs", type=Path, help="PEM roots for --tls instead of the system's")
    defaults = GatewaySettings()
    p.add_argument("--public-base-url", default=defaults.public_base_url)
    p.add_argument("--trust-forwarded", action="store_true", default=defaults.trust_forwarded)
    p.add_argument("--max-upload-bytes", type=int, default=defaults.max_upload_bytes)
    p.add_argument("--chunk-bytes", type=int, default=defaults.chunk_bytes)
    p.add_argument("--max-message-bytes", type=int, default=defaults.max_message_bytes)
    p.add_argument("--unary-timeout-s", type=float, default=defaults.unary_timeout_s)
    p.add_argument("--sync-timeout-s", type=float, default=defaults.sync_timeout_s)
    p.add_argument("--shutdown-grace-s", type=float, default=defaults.shutdown_grace_s)
    p.add_argument("--spool-dir", type=Path, default=defaults.spool_dir)
    p.add_argument("--body-idle-timeout-s", type=float, default=defaults.body_idle_timeout_s)
    p.add_argument("--body-timeout-s", type=float, default=defaults.body_timeout_s)
    p.add_argument("--header-timeout-s", type=float, default=defaults.header_timeout_s)
    p.add_argument("--max-uploads-per-client", type=int, default=defaults.max_uploads_per_client)
    p.add_argument("--log-level", default="INFO")
    return p


def _settings(args: argparse.Namespace) -> GatewaySettings:
    names = {f.name for f in fields(GatewaySettings)}
    given = {k: v for k, v in vars(args).items() if k in names}
    return GatewaySettings(**given)


async def run(gateway: Gateway, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set."""
    await gateway.start()
    try:
        await stop.wait()
    finally:
        await gateway.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s"
    )
    credentials = None
    if args.tls or args.root_certs:
        roots = args.root_certs.read_bytes() if args.root_certs else None
        credentials = grpc.ssl_channel_credentials(root_certificates=roots)
    gateway = Gateway(
        args.target,
        host=args.host,
        port=args.port,
        settings=_settings(args),
        credentials=credentials,
    )

    async def serve() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await gateway.start()
        except OSError as exc:  # the port is in use, or the address is not this machine's
            await gateway.stop()
            print(
                f"aiserver gateway: cannot listen on {args.host}:{args.port}:"
                f" {exc.strerror or exc}",
                file=sys.stderr,
            )
            return 2
        try:
            await stop.wait()
        finally:
            await gateway.stop()
        return 0

    return asyncio.run(serve())


if __name__ == "__main__":
    raise SystemExit(main())
