"""The service's security settings, checked and built once: API keys, URL signing, request
rate, the interceptor, and who may scrape metrics over the public HTTP port."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from imagetasks.v1 import artifact_service_pb2

from aiserver.api.guard import Guard
from aiserver.api.stalls import MAX_SPARED
from aiserver.artifacts.links import UrlSigner
from aiserver.auth import ConfigError, KeyRing, exposure_problem
from aiserver.config import Settings
from aiserver.metrics import Metrics
from aiserver.ratelimit import RateLimiter

__all__ = ["ARTIFACT_ACCESS", "Security"]

logger = logging.getLogger(__name__)

ARTIFACT_ACCESS = ("private", "signed")
_ARTIFACTS = artifact_service_pb2.DESCRIPTOR.services_by_name["ArtifactService"].full_name
SIGNED_READS = frozenset(
    f"/{_ARTIFACTS}/{m}" for m in ("GetArtifact", "ReadArtifact", "GetVariant")
)
"""The calls a signed URL may make without an API key."""


@dataclass(frozen=True, slots=True)
class Security:
    keys: KeyRing
    signer: UrlSigner | None
    """Set when ``artifact_access = "signed"``."""
    rate: RateLimiter | None
    max_streams: int
    upload_idle_s: float = 0.0
    upload_total_s: float = 0.0
    max_uploads_per_peer: int = 0
    stream_idle_s: float = 0.0
    stream_max_spared: int = MAX_SPARED

    @classmethod
    def from_settings(cls, settings: Settings) -> Security:
        """Raises :class:`ConfigError` for unusable settings, and for a non-loopback address
        without API keys unless ``allow_open``."""
        keys = KeyRing.load(settings.api_keys, settings.api_keys_file)
        hosts = {"grpc_host": settings.grpc_host}
        if settings.http_enabled:
            hosts["http_host"] = settings.http_host
        problem = exposure_problem(hosts, keys_enabled=keys.enabled, allow_open=settings.allow_open)
        if problem:
            raise ConfigError(problem)
        if settings.artifact_access not in ARTIFACT_ACCESS:
            raise ConfigError(
                f"artifact_access must be one of {', '.join(ARTIFACT_ACCESS)}, "
                f"not {settings.artifact_access!r}"
            )
        signer = None
        if settings.artifact_access == "signed":
            if not settings.url_signing_secrets:
                raise ConfigError(
                    'artifact_access = "signed" needs url_signing_secrets '
                    "(AISERVER_URL_SIGNING_SECRETS)"
                )
            try:
                signer = UrlSigner(settings.url_signing_secrets, ttl_s=settings.signed_url_ttl_s)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        for name in ("rate_limit_per_s", "rate_limit_burst", "max_streaming_calls"):
            if getattr(settings, name) < 0:
                raise ConfigError(f"{name} must not be negative")
        rate = None
        if settings.rate_limit_per_s > 0:
            rate = RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst)
        if not keys.enabled:
            exposed = exposure_problem(hosts, keys_enabled=False, allow_open=False)
            log = logger.warning if exposed else logger.info
            log("no API keys configured: open mode, every caller is an admin")
        return cls(
            keys,
            signer,
            rate,
            settings.max_streaming_calls,
            upload_idle_s=settings.upload_idle_timeout_s,
            upload_total_s=settings.upload_timeout_s,
            max_uploads_per_peer=settings.max_uploads_per_client,
            stream_idle_s=settings.upload_idle_timeout_s
            if settings.stream_idle_timeout_s is None
            else settings.stream_idle_timeout_s,
            stream_max_spared=settings.stream_max_spared,
        )

    def link(self, url: str) -> str:
        """An artifact or variant URL as handed out: signed in signed mode."""
        return self.signer.sign(url) if self.signer is not None else url

    def guard(self, metrics: Metrics | None, *, shim_token: str = "") -> Guard:
        """The interceptor; ``shim_token``: what the in-process HTTP shim sends to be known."""
        return Guard(
            keys=self.keys,
            rate=self.rate,
            max_streams=self.max_streams,
            keyless_methods=SIGNED_READS if self.signer is not None else (),
            metrics=metrics,
            upload_idle_s=self.upload_idle_s,
            upload_total_s=self.upload_total_s,
            max_uploads_per_peer=self.max_uploads_per_peer,
            shim_token=shim_token,
            stream_idle_s=self.stream_idle_s,
            stream_max_spared=self.stream_max_spared,
        )

    def metrics_handler(
        self, metrics: Metrics
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """``/metrics`` for the public HTTP port: an admin key when keys are configured."""

        async def handle(request: web.Request) -> web.StreamResponse:
            header = request.headers.get("Authorization")
            principal = self.keys.admits_header(header)
            if principal is None or not principal.admin:
                if principal is not None:
                    reason = "ADMIN_ONLY"  # a valid key, not an admin's
                elif header is None:
                    reason = "API_KEY_MISSING"
                else:
                    reason = "API_KEY_INVALID"
                return web.json_response(
                    {
                        "responseStatus": {
                            "errorCode": reason,
                            "message": "metrics need an admin API key",
                            "errors": [],
                        }
                    },
                    status=401 if principal is None else 403,
                    headers={"WWW-Authenticate": "Bearer"} if principal is None else None,
                )
            return await metrics.handle(request)

        return handle
