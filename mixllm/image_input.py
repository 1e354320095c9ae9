"""Image input, checked once for the CLI (``mixllm ask``) and the API (``/v1/chat/completions``).

Accepted: PNG, JPEG and WebP, recognised by the bytes' signature (so only those three PIL decoders ever
run), at most ``max_bytes`` bytes and ``max_pixels`` pixels. The pixel count (width x height) is read from
the header before any pixel is decoded, so a decompression bomb (a small file that expands to gigabytes)
is refused without allocating it; PIL's own bomb limit (``Image.MAX_IMAGE_PIXELS``, ~179 M pixels for the
error) applies too. The image is then fully decoded (``.load()``: a truncated file fails here, not in
the model), turned upright by its EXIF orientation, and converted to RGB (:func:`to_rgb`: grayscale,
palette and CMYK converted, transparency composited onto white).

Every error is an :class:`~mixllm.errors.InputError` naming the field, the value and the limit, with the
HTTP status the service answers with:

========================  ======  ==============================================================
error                     status  when
========================  ======  ==============================================================
InvalidImageURL           400     not a ``data:image/...;base64,...`` URL, or invalid base64
ImageTooLarge             413     more than ``max_bytes`` bytes (checked before base64 decoding)
TooManyPixels             413     more than ``max_pixels`` pixels (or PIL's bomb limit)
EmptyImage                422     no bytes, or a zero width or height
UnsupportedImageFormat    422     an image, but not PNG/JPEG/WebP (GIF, BMP, TIFF, ...)
UnreadableImage           422     not an image, or a damaged header
TruncatedImage            422     the pixel data ends early or is corrupt
========================  ======  ==============================================================

A malformed data URL is 400 (the request itself is malformed); an image the service cannot use is 422
(well-formed, wrong content); a limit is 413.
"""

from __future__ import annotations

import base64
import binascii
import io
import struct
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from mixllm.errors import InputError

MAX_IMAGE_BYTES = 10_000_000
"""Default largest encoded image, in bytes (10 MB)."""
MAX_IMAGE_PIXELS = 40_000_000
"""Default largest image, in pixels (width x height: 40 megapixels)."""
FORMATS = ("PNG", "JPEG", "WEBP")
"""The accepted formats (PIL's names)."""
MEDIA_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP"}
"""Media types a data URL may declare. The bytes decide the format: a declared type that does not match
them (a JPEG sent as ``image/png``) is accepted as long as the bytes are one of :data:`FORMATS`."""
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"), (b"8BPS", "PSD"), (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (b"qoif", "QOI"),
)  # fmt: skip
_ISO_BRANDS = {b"avif": "AVIF", b"avis": "AVIF", b"heic": "HEIC", b"heix": "HEIC", b"mif1": "HEIF"}
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error)
"""What PIL raises on damaged data (it is not consistent across formats)."""


class ImageInputError(InputError):
    """An image a request carries cannot be used (see the module doc for the kinds and statuses)."""

    type = "invalid_image"


class InvalidImageURL(ImageInputError):
    status = 400
    type = "invalid_image_url"


class ImageTooLarge(ImageInputError):
    status = 413
    type = "image_too_large"


class TooManyPixels(ImageInputError):
    status = 413
    type = "image_too_many_pixels"


class EmptyImage(ImageInputError):
    type = "empty_image"


class UnsupportedImageFormat(ImageInputError):
    type = "unsupported_image_format"


class UnreadableImage(ImageInputError):
    type = "unreadable_image"


class TruncatedImage(ImageInputError):
    type = "truncated_image"


def image_format(data: bytes) -> str | None:
    """The format the bytes' signature names ("PNG", "JPEG", "WEBP", "GIF", "BMP", ...), None if unknown."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[4:8] == b"ftyp" and data[8:12] in _ISO_BRANDS:
        return _ISO_BRANDS[data[8:12]]
    return next((name for signature, name in _SIGNATURES if data.startswith(signature)), None)


def _check_size(width: int, height: int, max_pixels: int, field: str) -> None:
    if width == 0 or height == 0:
        raise EmptyImage(f"{field}: the image is {width}x{height} pixels (empty)", field, f"{width}x{height}")
    if width * height > max_pixels:
        raise TooManyPixels(f"{field}: {width}x{height} = {width * height:,} pixels is more than the limit of "
                            f"{max_pixels:,} pixels", field, width * height, max_pixels)


def decode_image(data: bytes, *, max_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_IMAGE_PIXELS,
                 field: str = "image") -> Image.Image:
    """Encoded PNG/JPEG/WebP bytes -> a fully decoded RGB PIL image, or an :class:`ImageInputError`
    (module doc) whose message starts with ``field``."""
    if not data:
        raise EmptyImage(f"{field}: the image is empty (0 bytes)", field, 0)
    if len(data) > max_bytes:
        raise ImageTooLarge(f"{field}: {len(data):,} bytes is more than the limit of {max_bytes:,} bytes", field,
                            len(data), max_bytes)
    kind = image_format(data)
    if kind not in FORMATS:
        if kind is not None:
            raise UnsupportedImageFormat(f"{field}: a {kind} image; only PNG, JPEG and WebP are accepted", field, kind,
                                         list(FORMATS))
        raise UnreadableImage(f"{field}: not a PNG, JPEG or WebP image (it starts with {data[:8]!r})", field)
    if kind == "PNG" and len(data) >= 24 and data[12:16] == b"IHDR":  # PIL refuses a zero size without saying so
        _check_size(*struct.unpack(">II", data[16:24]), max_pixels, field)
    try:
        image = Image.open(io.BytesIO(data), formats=[kind])
    except Image.DecompressionBombError as err:
        raise TooManyPixels(f"{field}: {err}", field, None, max_pixels) from None
    except _DECODE_ERRORS as err:
        raise UnreadableImage(f"{field}: a damaged {kind} header ({err})", field, kind) from None
    _check_size(image.width, image.height, max_pixels, field)  # from the header: nothing is decoded yet
    try:
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
    except _DECODE_ERRORS as err:
        raise TruncatedImage(f"{field}: the {kind} data is truncated or corrupt ({err})", field, kind) from None
    from mixllm.image_processing import to_rgb  # here: it imports torch, and the service's settings import this module

    return to_rgb(image)


def _shown(url: str) -> str:
    return url if len(url) <= 60 else url[:57] + "..."


def image_from_data_url(url: str, *, max_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_IMAGE_PIXELS,
                        field: str = "image_url") -> Image.Image:
    """A ``data:image/png|jpeg|webp;base64,...`` URL -> an RGB PIL image (see :func:`decode_image`)."""
    head, comma, payload = url.partition(",")
    if not head.startswith("data:") or not comma:
        raise InvalidImageURL(f"{field}: not a data URL; send the image as data:image/png;base64,<data> "
                              "(or image/jpeg, image/webp)", field, _shown(url))
    media_type, *params = head[len("data:"):].split(";")
    if "base64" not in params:
        raise InvalidImageURL(f"{field}: the data URL is not base64-encoded (data:{media_type};base64,...)", field,
                              _shown(url))
    if media_type.lower() not in MEDIA_TYPES:
        raise UnsupportedImageFormat(f"{field}: media type {media_type!r}; only image/png, image/jpeg and image/webp "
                                     "are accepted", field, media_type, sorted(set(MEDIA_TYPES) - {"image/jpg"}))
    encoded = "".join(payload.split())  # line breaks inside the base64 are tolerated
    size = len(encoded) * 3 // 4 - encoded[-2:].count("=")  # decoded size, known before decoding
    if size > max_bytes:
        raise ImageTooLarge(f"{field}: {size:,} bytes is more than the limit of {max_bytes:,} bytes", field, size,
                            max_bytes)
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as err:
        raise InvalidImageURL(f"{field}: the base64 data is invalid ({err})", field, _shown(url)) from None
    return decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels, field=field)


def open_image_file(path: str | Path, *, max_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_IMAGE_PIXELS,
                    field: str | None = None) -> Image.Image:
    """An image file -> an RGB PIL image (see :func:`decode_image`); errors start with ``field`` (default: the path)."""
    path = Path(path)
    field = field or str(path)
    if not path.is_file():
        raise InputError(f"{field}: no such file" + ("" if field == str(path) else f" {path}"), field, str(path))
    size = path.stat().st_size
    if size > max_bytes:
        raise ImageTooLarge(f"{field}: {size:,} bytes is more than the limit of {max_bytes:,} bytes", field, size,
                            max_bytes)
    return decode_image(path.read_bytes(), max_bytes=max_bytes, max_pixels=max_pixels, field=field)
