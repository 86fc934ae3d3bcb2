"""Bootstrap: builds the components, serves gRPC with health and reflection, shuts down cleanly."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from imagetasks.v1 import transform_service_pb2, transform_service_pb2_grpc

from aiserver.api.transform import TransformServicer
from aiserver.config import Settings
from aiserver.imaging import ImageLimits
from aiserver.spool import InputSpool
from aiserver.workers import BlockingPool

__all__ = ["Service", "serve"]

logger = logging.getLogger(__name__)

_TRANSFORM = transform_service_pb2.DESCRIPTOR.services_by_name["TransformService"].full_name

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Service:
    """The whole service: start it, read ``grpc_port``, stop it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.grpc_port = 0
        data = settings.data_dir
        data.mkdir(parents=True, exist_ok=True)
        self.spool = InputSpool(data / "spool")
        self.pool = BlockingPool(settings.image_threads)
        self.limits = ImageLimits(max_pixels=settings.max_pixels)
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None

    def _services(self) -> Sequence[str]:
        return (_TRANSFORM,)

    async def start(self) -> int:
        s = self.settings
        self.spool.sweep_tmp()
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", s.max_message_bytes),
                ("grpc.max_send_message_length", s.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        transform_service_pb2_grpc.add_TransformServiceServicer_to_server(
            TransformServicer(
                spool=self.spool,
                pool=self.pool,
                limits=self.limits,
                max_upload_bytes=s.max_upload_bytes,
                chunk_bytes=s.chunk_bytes,
            ),
            server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = (*self._services(), health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
        self.grpc_port = server.add_insecure_port(f"{s.grpc_host}:{s.grpc_port}")
        if self.grpc_port == 0:
            raise OSError(f"cannot bind gRPC to {s.grpc_host}:{s.grpc_port}")
        await server.start()
        self._server = server
        await self.health.set("", SERVING)
        for name in self._services():
            await self.health.set(name, SERVING)
        logger.info("gRPC listening on %s:%d", s.grpc_host, self.grpc_port)
        return self.grpc_port

    async def stop(self, grace_s: float | None = None) -> None:
        """Health goes NOT_SERVING first, then in-flight calls get ``grace_s`` to finish."""
        if self._server is None:
            return
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        await self.health.enter_graceful_shutdown()
        await self._server.stop(grace)
        self._server = None
        self.pool.close()
        logger.info("stopped")

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    service = Service(settings)
    await service.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("signal received; shutting down (grace %.1fs)", settings.shutdown_grace_s)
    await service.stop()
