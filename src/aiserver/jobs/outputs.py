"""What the scheduler needs to store a job's outputs (``aiserver.artifacts`` implements it)."""

from __future__ import annotations

from typing import Protocol

from aiserver.jobs.model import ArtifactRef

__all__ = ["ArtifactWriter"]


class ArtifactWriter(Protocol):
    async def put(
        self,
        data: bytes,
        *,
        file_name: str,
        mime_type: str,
        width: int,
        height: int,
        seed: int | None,
        provider: str,
        job_id: str,
        owner: str,
    ) -> ArtifactRef:
        """Store ``data`` durably and return its reference (content-addressed: same bytes,
        same name)."""
        ...
