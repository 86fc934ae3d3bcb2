"""Artifacts stored straight into a running service, for tests that read them back."""

from __future__ import annotations

from aiserver.server import Service


async def put_bytes(service: Service, data: bytes, *, job_id: str = "j1") -> str:
    """``data`` stored as an artifact (the store takes any bytes under an image type);
    its name."""
    ref = await service.artifacts.put(
        data,
        file_name="a.png",
        mime_type="image/png",
        width=0,
        height=0,
        seed=None,
        provider="test",
        job_id=job_id,
        owner="",
    )
    return ref.name
