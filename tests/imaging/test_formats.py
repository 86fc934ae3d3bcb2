from __future__ import annotations

import pytest
from PIL import features

from aiserver.errors import ErrorKind
from aiserver.imaging import available_formats, format_for_pillow, parse_format

from .testkit import raises_service_error


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("jpg", "jpg"),
        ("JPEG", "jpg"),
        ("png", "png"),
        (" Gif ", "gif"),
        ("bmp", "bmp"),
        ("TIF", "tiff"),
        ("tiff", "tiff"),
        ("WebP", "webp"),
    ],
)
def test_parse_format_accepts_names_and_aliases(name: str, canonical: str) -> None:
    assert parse_format(name, "params.format").name == canonical


def test_avif_only_when_pillow_has_it() -> None:
    names = {f.name for f in available_formats()}
    assert ("avif" in names) == features.check("avif")
    if features.check("avif"):
        assert parse_format("AVIF", "f").mime_type == "image/avif"


@pytest.mark.parametrize("name", ["heic", "", "svg", "jpg2000", "image/png"])
def test_unknown_format_is_rejected_with_accepted_list(name: str) -> None:
    with raises_service_error(
        ErrorKind.INVALID_ARGUMENT, "UNSUPPORTED_FORMAT", "params.format"
    ) as info:
        parse_format(name, "params.format")
    assert "jpeg" in info.value.message and "tif" in info.value.message
    assert "png" in info.value.metadata["accepted"]


def test_registry_entries() -> None:
    jpg, png, gif = (parse_format(n, "f") for n in ("jpg", "png", "gif"))
    assert (jpg.pil_format, jpg.mime_type, jpg.extension) == ("JPEG", "image/jpeg", ".jpg")
    assert jpg.lossy and not jpg.supports_alpha and not jpg.supports_animation
    assert not png.lossy and png.supports_alpha and png.supports_animation
    assert gif.supports_animation and not gif.supports_icc
    assert len({f.name for f in available_formats()}) == len(available_formats())


@pytest.mark.parametrize(
    ("pil_format", "name"),
    [("JPEG", "jpg"), ("MPO", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("TIFF", "tiff")],
)
def test_format_for_pillow(pil_format: str, name: str) -> None:
    found = format_for_pillow(pil_format)
    assert found is not None and found.name == name


@pytest.mark.parametrize("pil_format", ["PCX", "PDF", "", None])
def test_format_for_pillow_unknown(pil_format: str | None) -> None:
    assert format_for_pillow(pil_format) is None
