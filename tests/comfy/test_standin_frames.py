"""The stand-in encodes a binary frame's image once per kind of peer it is sent to, with the
bytes it always sent: a job whose client asked for preview metadata (the service's channel)
costs the stand-in one PNG encode, as it costs ComfyUI, not two."""

from __future__ import annotations

import io
from typing import Any

import pytest
from PIL import Image

from tests.support.comfy_standin.server import _Frame, _image_frame


def _saved(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _image(mode: str) -> Image.Image:
    image = Image.new("RGB", (48, 40))
    image.putdata([(x * 5 % 256, y * 7 % 256, (x * y) % 256) for y in range(40) for x in range(48)])
    return image.convert(mode)


@pytest.mark.parametrize(
    ("mode", "fmt"), [("RGB", "PNG"), ("RGBA", "PNG"), ("L", "PNG"), ("RGB", "JPEG")]
)
@pytest.mark.parametrize("legacy_first", [True, False])
def test_a_frame_sends_the_bytes_it_always_sent(mode: str, fmt: str, legacy_first: bool) -> None:
    image = _image(mode)
    frame = _Frame(image, fmt, "image/png" if fmt == "PNG" else "image/jpeg")
    if legacy_first:
        legacy, encoded = frame.legacy(), frame.encoded()
    else:
        encoded, legacy = frame.encoded(), frame.legacy()
    assert legacy == _image_frame(image, fmt)  # types 1/2: the image as RGB
    assert encoded == _saved(image, fmt)  # type 4: the image as it is


def test_an_rgb_frame_is_encoded_once_for_both_kinds_and_never_unasked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    image = _image("RGB")
    saves: list[Any] = []
    real_save = Image.Image.save

    def counted(self: Image.Image, *args: Any, **kwargs: Any) -> None:
        saves.append(args)
        real_save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", counted)
    frame = _Frame(image, "PNG", "image/png")
    assert saves == []  # nothing encoded before a peer is sent it
    frame.encoded()
    frame.encoded()
    assert len(saves) == 1
    frame.legacy()
    assert len(saves) == 1
