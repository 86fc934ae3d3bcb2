"""Image decoding limits, format registry and the crop/convert/resize transforms.

Nothing here imports grpc: failures are :class:`aiserver.errors.ServiceError`.
"""

from aiserver.imaging.formats import (
    OutputFormat,
    available_formats,
    format_for_pillow,
    parse_format,
)
from aiserver.imaging.limits import DEFAULT_LIMITS, ImageLimits
from aiserver.imaging.safe_open import (
    HeldImage,
    ImageInfo,
    ImageSource,
    check_frame_size,
    exif_orientation,
    open_image,
    open_image_with_info,
    probe,
)
from aiserver.imaging.transforms import (
    DEFAULT_QUALITY,
    FITS,
    EncodedImage,
    apply_jpeg_draft,
    convert,
    crop,
    resize,
    verify,
)

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_QUALITY",
    "FITS",
    "EncodedImage",
    "HeldImage",
    "ImageInfo",
    "ImageLimits",
    "ImageSource",
    "OutputFormat",
    "apply_jpeg_draft",
    "available_formats",
    "check_frame_size",
    "convert",
    "crop",
    "exif_orientation",
    "format_for_pillow",
    "open_image",
    "open_image_with_info",
    "parse_format",
    "probe",
    "resize",
    "verify",
]
