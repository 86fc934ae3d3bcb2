"""Artifacts stored straight into a running service, for tests that read them back."""

from __future__ import annotations

from aiserver.jobs.model import ArtifactRef
from aiserver.server import Service


async def put_ref(
    service: Service,
    data: bytes,
    *,
    job_id: str = "j1",
    width: int = 0,
    height: int = 0,
    file_name: str = "a.png",
) -> ArtifactRef:
    """``data`` stored as a PNG artifact of ``job_id`` (the store takes any bytes under an
    image type)."""
    return await service.artifacts.put(
        data,
        file_name=file_name,
        mime_type="image/png",
        width=width,
        height=height,
        seed=None,
        provider="test",
        job_id=job_id,
        owner="",
    )


async def put_bytes(service: Service, data: bytes, *, job_id: str = "j1") -> str:
    """:func:`put_ref`'s artifact name."""
    return (await put_ref(service, data, job_id=job_id)).name
