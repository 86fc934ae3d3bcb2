"""The ``Content-Disposition`` of downloads: a plain name as it is, any other both as an ASCII
fallback and as RFC 5987 ``filename*`` (the usual plain name takes a shortcut: same text)."""

from __future__ import annotations

import pytest

from aiserver.gateway.compat import content_disposition


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("photo-2x.png", 'inline; filename="photo-2x.png"'),
        ("a b;c.webp", 'inline; filename="a b;c.webp"'),
        ("", 'inline; filename="file"'),
        ('say "hi".png', "inline; filename=\"say hi.png\"; filename*=UTF-8''say%20%22hi%22.png"),
        ("a\\b.png", "inline; filename=\"ab.png\"; filename*=UTF-8''a%5Cb.png"),
        ("café.png", "inline; filename=\"caf.png\"; filename*=UTF-8''caf%C3%A9.png"),
        ("中.png", "inline; filename=\".png\"; filename*=UTF-8''%E4%B8%AD.png"),
        ("tab\there", "inline; filename=\"tabhere\"; filename*=UTF-8''tab%09here"),
        ('"', "inline; filename=\"file\"; filename*=UTF-8''%22"),
    ],
)
def test_names(name: str, expected: str) -> None:
    assert content_disposition("inline", name) == expected
