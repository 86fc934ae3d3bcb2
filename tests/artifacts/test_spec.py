"""Variant spec grammar, canonical form, presets and the presets-only switch."""

from __future__ import annotations

import dataclasses

import pytest

from aiserver.artifacts.spec import Fit, VariantPolicy, VariantSpec, build_spec, parse_spec
from aiserver.errors import ErrorKind, ServiceError


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("width=256", "width=256,format=webp"),
        ("height=128", "height=128,format=webp"),
        ("width=256,height=128", "width=256,height=128,format=webp"),
        ("height=128,width=256", "width=256,height=128,format=webp"),
        ("width=16,height=9,fit=contain,format=jpeg,quality=80", "width=16,height=9,format=jpg"),
        ("width=16,height=9,fit=cover", "width=16,height=9,fit=cover,format=webp"),
        ("fit=fill,height=9,width=16", "width=16,height=9,fit=fill,format=webp"),
        ("width=10,fit=cover", "width=10,format=webp"),  # one side: fit is irrelevant
        ("width=10,format=png,quality=5", "width=10,format=png"),  # lossless: no quality
        ("width=10,format=jpg,quality=100", "width=10,format=jpg,quality=100"),
        ("quality=1,format=avif,height=4096", "height=4096,format=avif,quality=1"),
        ("width=1", "width=1,format=webp"),
    ],
)
def test_valid_specs_and_their_canonical_form(text: str, canonical: str) -> None:
    spec = parse_spec(text)
    assert spec.canonical == canonical
    assert str(spec) == canonical
    assert parse_spec(canonical) == spec  # canonical form is a fixed point


def test_equal_specs_compare_and_hash_equal() -> None:
    a = parse_spec("width=100,height=50,format=jpeg")
    b = parse_spec("height=50,width=100,fit=contain,format=jpg,quality=80")
    assert a == b and hash(a) == hash(b)
    assert a == VariantSpec(100, 50, Fit.CONTAIN, "jpg", 80)


def test_the_canonical_form_is_made_once_and_follows_a_replace() -> None:
    # Read on every variant request (the cache's key, the URL): made with the spec.
    spec = parse_spec("width=100,format=png")
    assert spec.canonical is spec.canonical
    assert dataclasses.replace(spec, width=7).canonical == "width=7,format=png"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "INVALID_VARIANT_SPEC"),
        ("width", "INVALID_VARIANT_SPEC"),
        ("width=", "INVALID_VARIANT_SPEC"),
        ("=256", "INVALID_VARIANT_SPEC"),
        ("width=1=2", "INVALID_VARIANT_SPEC"),
        ("width=0", "INVALID_VARIANT_SPEC"),
        ("width=-1", "INVALID_VARIANT_SPEC"),
        ("width=+1", "INVALID_VARIANT_SPEC"),
        ("width=01", "INVALID_VARIANT_SPEC"),
        ("width=1.5", "INVALID_VARIANT_SPEC"),
        ("width=1e3", "INVALID_VARIANT_SPEC"),
        ("width=abc", "INVALID_VARIANT_SPEC"),
        ("width=0x10", "INVALID_VARIANT_SPEC"),
        ("width=99999999999", "INVALID_VARIANT_SPEC"),
        ("width=\uff12\uff15\uff16", "INVALID_VARIANT_SPEC"),  # full-width digits
        ("Width=256", "INVALID_VARIANT_SPEC"),
        ("width=256,format=WEBP", "INVALID_VARIANT_SPEC"),
        (" width=256", "INVALID_VARIANT_SPEC"),
        ("width=256 ", "INVALID_VARIANT_SPEC"),
        ("width= 256", "INVALID_VARIANT_SPEC"),
        ("width=256, height=1", "INVALID_VARIANT_SPEC"),
        ("width=256\n", "INVALID_VARIANT_SPEC"),
        ("width=256\t", "INVALID_VARIANT_SPEC"),
        ("width=256,", "INVALID_VARIANT_SPEC"),
        (",width=256", "INVALID_VARIANT_SPEC"),
        ("width=256,,height=1", "INVALID_VARIANT_SPEC"),
        ("width=256;height=1", "INVALID_VARIANT_SPEC"),
        ("width=256&height=1", "INVALID_VARIANT_SPEC"),
        ("width=1,width=2", "INVALID_VARIANT_SPEC"),
        ("width=1,width=1", "INVALID_VARIANT_SPEC"),
        ("depth=3,width=1", "INVALID_VARIANT_SPEC"),
        ("fit=cover", "INVALID_VARIANT_SPEC"),  # no side
        ("format=png,quality=5", "INVALID_VARIANT_SPEC"),
        ("width=1,fit=crop", "INVALID_VARIANT_SPEC"),
        ("width=1,format=gif", "INVALID_VARIANT_SPEC"),
        ("width=1,format=", "INVALID_VARIANT_SPEC"),
        ("width=1,quality=0", "INVALID_VARIANT_SPEC"),
        ("width=1,quality=101", "INVALID_VARIANT_SPEC"),
        ("width=1,format=webp,format=jpg", "INVALID_VARIANT_SPEC"),
        ("width=1," + "a" * 200, "INVALID_VARIANT_SPEC"),  # over-long
        ("width=4097", "VARIANT_TOO_LARGE"),
        ("width=10,height=100000", "VARIANT_TOO_LARGE"),
    ],
)
def test_invalid_specs(text: str, reason: str) -> None:
    with pytest.raises(ServiceError) as exc:
        parse_spec(text)
    err = exc.value
    assert (err.kind, err.reason) == (ErrorKind.INVALID_ARGUMENT, reason)
    assert [v.field for v in err.violations] == ["spec"]


def test_max_side_is_configurable() -> None:
    assert parse_spec("width=5000", max_side=8000).width == 5000
    with pytest.raises(ServiceError) as exc:
        parse_spec("width=300", max_side=256)
    assert exc.value.reason == "VARIANT_TOO_LARGE"


def test_build_spec_names_request_fields() -> None:
    assert build_spec(width=64, format="jpeg").canonical == "width=64,format=jpg"
    assert build_spec(width=64, height=0).canonical == "width=64,format=webp"  # 0 = unset
    with pytest.raises(ServiceError) as exc:
        build_spec(width=0, height=0)
    assert exc.value.reason == "INVALID_VARIANT_SPEC"
    assert [v.field for v in exc.value.violations] == ["width"]
    with pytest.raises(ServiceError) as exc:
        build_spec(width=10, quality=0, fit="crop")
    assert {v.field for v in exc.value.violations} == {"fit", "quality"}
    with pytest.raises(ServiceError) as exc:
        build_spec(height=9000)
    assert exc.value.reason == "VARIANT_TOO_LARGE"
    assert [v.field for v in exc.value.violations] == ["height"]


PRESETS = {"thumb": "width=128", "card": "width=400,height=300,fit=cover,format=jpg"}


def test_presets_resolve_by_name() -> None:
    policy = VariantPolicy(PRESETS)
    assert policy.resolve(preset="thumb").canonical == "width=128,format=webp"
    assert policy.resolve("card").canonical == "width=400,height=300,fit=cover,format=jpg"
    assert policy.resolve("width=7").width == 7  # arbitrary specs are allowed by default
    with pytest.raises(ServiceError) as exc:
        policy.resolve(preset="poster")
    assert (exc.value.reason, exc.value.violations[0].field) == ("UNKNOWN_VARIANT_PRESET", "preset")
    with pytest.raises(ServiceError) as exc:
        policy.resolve("width=7", preset="thumb")
    assert exc.value.kind is ErrorKind.INVALID_ARGUMENT


def test_presets_only_mode() -> None:
    policy = VariantPolicy(PRESETS, presets_only=True)
    assert policy.resolve(preset="thumb") == parse_spec("width=128")
    # A spec equal to a preset is that preset: canonical variant URLs keep working.
    assert policy.resolve("width=128,format=webp") == parse_spec("width=128")
    assert policy.resolve("height=300,width=400,fit=cover,format=jpeg").height == 300
    for text in ("width=129", "width=128,format=png"):
        with pytest.raises(ServiceError) as exc:
            policy.resolve(text)
        assert (exc.value.kind, exc.value.reason) == (
            ErrorKind.INVALID_ARGUMENT,
            "VARIANT_NOT_ALLOWED",
        )
        assert exc.value.violations[0].field == "spec"
    with pytest.raises(ServiceError) as exc:
        policy.resolve("width=0")  # still validated first
    assert exc.value.reason == "INVALID_VARIANT_SPEC"
    with pytest.raises(ServiceError) as exc:
        policy.allow(build_spec(width=5))
    assert exc.value.reason == "VARIANT_NOT_ALLOWED"


@pytest.mark.parametrize(
    "presets", [{"Thumb": "width=1"}, {"a,b": "width=1"}, {"thumb": "width=0"}, {"": "width=1"}]
)
def test_bad_presets_fail_at_configuration(presets: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="preset"):
        VariantPolicy(presets)
