"""Variant specs (AI Server's ``width=256,height=128``) and the operator's variant policy.

Grammar (strict: lower case, no blanks, at most 128 characters)::

    spec    = pair *("," pair)         ; each key at most once, width and/or height required
    pair    = "width=" side | "height=" side | "fit=" fit | "format=" format
            | "quality=" quality
    side    = 1..max_side              ; decimal, no sign, no leading zero (default cap 4096)
    fit     = "contain" | "cover" | "fill"               ; default contain
    format  = "webp" | "jpg" | "jpeg" | "png" | "avif"   ; default webp; jpeg means jpg
    quality = 1..100                                     ; default 80

Canonical form, used for cache keys and URLs: keys in the fixed order width, height, fit,
format, quality; ``format`` always present; ``fit`` only with both sides and when not
``contain`` (one side keeps the aspect ratio whatever the fit); ``quality`` only for lossy
formats and when not 80. So ``width=256`` is ``width=256,format=webp`` and
``height=9,width=16,fit=contain,format=jpeg,quality=80`` is ``width=16,height=9,format=jpg``.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from aiserver.errors import ErrorKind, FieldViolation, ServiceError, invalid_argument

__all__ = [
    "DEFAULT_FORMAT",
    "DEFAULT_MAX_SIDE",
    "DEFAULT_QUALITY",
    "MAX_SPEC_CHARS",
    "Fit",
    "VariantPolicy",
    "VariantSpec",
    "build_spec",
    "parse_spec",
]

DEFAULT_MAX_SIDE = 4096
DEFAULT_FORMAT = "webp"
DEFAULT_QUALITY = 80
MAX_SPEC_CHARS = 128

_FORMATS = {"webp": "webp", "jpg": "jpg", "jpeg": "jpg", "png": "png", "avif": "avif"}
_LOSSY = frozenset({"webp", "jpg", "avif"})
_KEYS = ("width", "height", "fit", "format", "quality")
_SPEC_CHARS = re.compile(r"[a-z0-9=,]+")
_NUMBER = re.compile(r"[1-9][0-9]{0,8}")
_PRESET_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")


class Fit(enum.Enum):
    """How a variant fits a box given by both sides."""

    CONTAIN = "contain"
    """Inside the box, aspect ratio kept (one side may be shorter)."""
    COVER = "cover"
    """Fills the box, aspect ratio kept, overflow cropped around the centre."""
    FILL = "fill"
    """Exactly the box, stretched."""


@dataclass(frozen=True, slots=True)
class VariantSpec:
    """A normalised variant request; build it with :func:`parse_spec` or :func:`build_spec`.

    Irrelevant settings are normalised away (fit with one side, quality of PNG), so equal
    outputs have equal specs and share one cache entry.
    """

    width: int | None
    height: int | None
    fit: Fit = Fit.CONTAIN
    format: str = DEFAULT_FORMAT
    """Canonical format name: webp, jpg, png or avif."""
    quality: int = DEFAULT_QUALITY
    canonical: str = field(init=False, repr=False, compare=False)
    """The spec as a string (the cache's key and the URL's): made once, read per request."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "canonical", self._canonical())

    def _canonical(self) -> str:
        parts = []
        if self.width is not None:
            parts.append(f"width={self.width}")
        if self.height is not None:
            parts.append(f"height={self.height}")
        if self.fit is not Fit.CONTAIN:
            parts.append(f"fit={self.fit.value}")
        parts.append(f"format={self.format}")
        if self.quality != DEFAULT_QUALITY:
            parts.append(f"quality={self.quality}")
        return ",".join(parts)

    def __str__(self) -> str:
        return self.canonical


def _spec_error(
    message: str, field: str = "spec", reason: str = "INVALID_VARIANT_SPEC"
) -> ServiceError:
    return invalid_argument(field, reason, message)


def build_spec(
    *,
    width: int | None = None,
    height: int | None = None,
    fit: Fit | str = Fit.CONTAIN,
    format: str = DEFAULT_FORMAT,
    quality: int | None = None,
    max_side: int = DEFAULT_MAX_SIDE,
    field_prefix: str = "",
) -> VariantSpec:
    """A spec from separate values (the request's own fields); violations name those fields.

    ``None`` or 0 for a side means "from the other side and the aspect ratio".
    """
    bad: list[FieldViolation] = []
    too_large: list[FieldViolation] = []
    sides: dict[str, int | None] = {"width": width or None, "height": height or None}
    for name, value in sides.items():
        if value is None:
            continue
        if value < 0:
            bad.append(FieldViolation(field_prefix + name, "must be a positive integer"))
        elif value > max_side:
            too_large.append(FieldViolation(field_prefix + name, f"must be at most {max_side}"))
    if sides["width"] is None and sides["height"] is None:
        bad.append(FieldViolation(field_prefix + "width", "give width, height or both"))
    try:
        fit_value = fit if isinstance(fit, Fit) else Fit(fit)
    except ValueError:
        bad.append(FieldViolation(field_prefix + "fit", "must be contain, cover or fill"))
        fit_value = Fit.CONTAIN
    fmt = _FORMATS.get(format)
    if fmt is None:
        bad.append(FieldViolation(field_prefix + "format", "must be webp, jpg, jpeg, png or avif"))
    if quality is not None and not 1 <= quality <= 100:
        bad.append(FieldViolation(field_prefix + "quality", "must be in 1..100"))
    if bad or too_large:
        reason = "INVALID_VARIANT_SPEC" if bad else "VARIANT_TOO_LARGE"
        violations = tuple(bad or too_large)
        raise ServiceError(
            ErrorKind.INVALID_ARGUMENT,
            reason,
            "invalid variant: " + "; ".join(f"{v.field} {v.description}" for v in violations),
            violations=violations,
            metadata={"field": violations[0].field, "max_side": str(max_side)},
        )
    return _normalised(sides["width"], sides["height"], fit_value, fmt or DEFAULT_FORMAT, quality)


def _normalised(
    width: int | None, height: int | None, fit: Fit, fmt: str, quality: int | None
) -> VariantSpec:
    if width is None or height is None:
        fit = Fit.CONTAIN
    if quality is None or fmt not in _LOSSY:
        quality = DEFAULT_QUALITY
    return VariantSpec(width, height, fit, fmt, quality)


def parse_spec(spec: str, *, max_side: int = DEFAULT_MAX_SIDE) -> VariantSpec:
    """Parse AI Server's spec string (see the module docstring); errors name ``spec``."""
    if len(spec) > MAX_SPEC_CHARS:
        raise _spec_error(f"longer than {MAX_SPEC_CHARS} characters")
    if not _SPEC_CHARS.fullmatch(spec):
        raise _spec_error("use key=value pairs separated by commas: lower case, no blanks")
    values: dict[str, str] = {}
    for pair in spec.split(","):
        key, eq, value = pair.partition("=")
        if not eq or not key or not value or "=" in value:
            raise _spec_error(f"{pair!r} is not key=value")
        if key not in _KEYS:
            raise _spec_error(f"unknown key {key!r}; known: {', '.join(_KEYS)}")
        if key in values:
            raise _spec_error(f"{key} given twice")
        values[key] = value
    sides: dict[str, int | None] = {}
    for key in ("width", "height", "quality"):
        raw = values.get(key)
        if raw is None:
            sides[key] = None
        elif not _NUMBER.fullmatch(raw):
            raise _spec_error(f"{key} must be a positive integer without leading zeros")
        else:
            sides[key] = int(raw)
    width, height, quality = sides["width"], sides["height"], sides["quality"]
    if width is None and height is None:
        raise _spec_error("give width, height or both")
    for key, side in (("width", width), ("height", height)):
        if side is not None and side > max_side:
            raise _spec_error(f"{key} must be at most {max_side}", reason="VARIANT_TOO_LARGE")
    if quality is not None and quality > 100:
        raise _spec_error("quality must be in 1..100")
    try:
        fit = Fit(values.get("fit", Fit.CONTAIN.value))
    except ValueError:
        raise _spec_error("fit must be contain, cover or fill") from None
    fmt = _FORMATS.get(values.get("format", DEFAULT_FORMAT))
    if fmt is None:
        raise _spec_error("format must be webp, jpg, jpeg, png or avif")
    return _normalised(width, height, fit, fmt, quality)


class VariantPolicy:
    """Which variants may be made: any valid spec up to ``max_side``, or only named presets.

    Presets map a name (``thumb``) to a spec (``width=256,format=webp``). In presets-only
    mode a spec string is still accepted when it is equivalent to a preset, so the
    canonical URLs of preset variants keep working.
    """

    def __init__(
        self,
        presets: Mapping[str, str] | None = None,
        *,
        presets_only: bool = False,
        max_side: int = DEFAULT_MAX_SIDE,
    ) -> None:
        self.max_side = max_side
        self.presets_only = presets_only
        self.presets: dict[str, VariantSpec] = {}
        for name, text in (presets or {}).items():
            if not _PRESET_NAME.fullmatch(name):
                raise ValueError(f"variant preset name {name!r}: use [a-z0-9_-], at most 32")
            try:
                self.presets[name] = parse_spec(text, max_side=max_side)
            except ServiceError as exc:
                raise ValueError(f"variant preset {name!r}: {exc.message}") from exc
        self._allowed = frozenset(self.presets.values())

    def resolve(self, spec: str = "", *, preset: str = "") -> VariantSpec:
        """The spec for a request's ``spec`` string or ``preset`` name (one of the two).

        A ``spec`` without ``=`` is taken as a preset name (``/variants/thumb/...``).
        """
        if spec and preset:
            raise invalid_argument(
                "preset", "INVALID_VARIANT_SPEC", "give spec or preset, not both"
            )
        if preset or (spec and "=" not in spec):
            field = "preset" if preset else "spec"
            found = self.presets.get(preset or spec)
            if found is None:
                known = ", ".join(sorted(self.presets)) or "none are configured"
                raise invalid_argument(
                    field, "UNKNOWN_VARIANT_PRESET", f"unknown variant preset; known: {known}"
                )
            return found
        return self.allow(parse_spec(spec, max_side=self.max_side))

    def allow(self, spec: VariantSpec, field: str = "spec") -> VariantSpec:
        """``spec`` itself, or VARIANT_NOT_ALLOWED in presets-only mode if it is no preset's."""
        if self.presets_only and spec not in self._allowed:
            known = ", ".join(sorted(self.presets)) or "none are configured"
            raise invalid_argument(
                field, "VARIANT_NOT_ALLOWED", f"only variant presets are served here: {known}"
            )
        if (spec.width or 0) > self.max_side or (spec.height or 0) > self.max_side:
            raise invalid_argument(field, "VARIANT_TOO_LARGE", f"sides are at most {self.max_side}")
        return spec
