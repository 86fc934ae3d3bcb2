"""The hostile-input suite, batch by batch, through gRPC and HTTP, against a keyed service
with a ComfyUI stand-in; the service is checked healthy after each batch."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.security import hostile
from tests.security.conftest import bearer, channel_to, http_base, keyed_service


@pytest.mark.parametrize("batch", sorted(hostile.FILE_BATCHES))
async def test_hostile_files(tmp_path: Path, batch: str) -> None:
    async with (
        keyed_service(tmp_path) as (service, comfy),
        channel_to(service) as ch,
        httpx.AsyncClient(base_url=http_base(service), timeout=60) as http,
    ):
        cases = hostile.FILE_BATCHES[batch]()
        await hostile.file_batch(cases, ch, http, bearer("alice"))
        await hostile.assert_healthy(ch, bearer("alice"))
        if batch != "polyglots":  # nothing hostile reached ComfyUI
            errors = [c for c in cases if c.expect == "error"]
            assert len(comfy[0].received.uploads) <= 2 * (len(cases) - len(errors))


@pytest.mark.parametrize("batch", ["names", "numbers", "long fields"])
async def test_hostile_fields(tmp_path: Path, batch: str) -> None:
    run = {
        "names": hostile.names_batch,
        "numbers": hostile.numbers_batch,
        "long fields": hostile.long_fields_batch,
    }[batch]
    async with (
        keyed_service(tmp_path) as (service, _),
        channel_to(service) as ch,
        httpx.AsyncClient(base_url=http_base(service), timeout=60) as http,
    ):
        await run(ch, http, bearer("alice"))
        await hostile.assert_healthy(ch, bearer("alice"))
