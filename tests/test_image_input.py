"""Image input checks: every kind of bad image is refused with its own error, status, field, value and
limit, before the model sees it; good images of any mode come out RGB and fully decoded."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import pytest
from PIL import Image

from mixllm.errors import InputError
from mixllm.image_input import (
    EmptyImage, ImageTooLarge, InvalidImageURL, TooManyPixels, TruncatedImage, UnreadableImage,
    UnsupportedImageFormat, decode_image, image_from_data_url, open_image_file,
)  # fmt: skip


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def png(width: int = 16, height: int = 12, mode: str = "RGB", color=(10, 200, 30)) -> bytes:
    return encode(Image.new(mode, (width, height), color), "PNG")


def with_png_size(data: bytes, width: int, height: int) -> bytes:
    """The PNG with its IHDR chunk claiming another size (valid CRC), the pixel data unchanged."""
    body = b"IHDR" + struct.pack(">II", width, height) + data[24:29]
    return data[:8] + struct.pack(">I", 13) + body + struct.pack(">I", zlib.crc32(body)) + data[33:]


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def test_a_good_png_jpeg_and_webp_decode_to_rgb_with_their_pixels():
    for fmt in ("PNG", "JPEG", "WEBP"):
        data = encode(Image.new("RGB", (16, 12), (10, 200, 30)), fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        image = decode_image(data)
        assert image.mode == "RGB" and image.size == (16, 12)
        red, green, blue = image.getpixel((5, 5))
        assert abs(red - 10) <= 3 and abs(green - 200) <= 3 and abs(blue - 30) <= 3, fmt  # JPEG rounds a little


@pytest.mark.parametrize("mode,color,expected", [
    ("RGBA", (0, 0, 0, 0), (255, 255, 255)),  # fully transparent -> the white background, not black
    ("RGBA", (10, 20, 30, 255), (10, 20, 30)),
    ("LA", (100, 0), (255, 255, 255)),
    ("L", 100, (100, 100, 100)),
    ("P", 3, None),
])  # fmt: skip
def test_other_modes_are_converted_to_rgb(mode, color, expected):
    image = decode_image(png(mode=mode, color=color))
    assert image.mode == "RGB" and image.size == (16, 12)
    if expected is not None:
        assert image.getpixel((0, 0)) == expected


def test_cmyk_jpeg_is_converted_to_rgb():
    image = decode_image(encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"))
    assert image.mode == "RGB"
    red, green, blue = image.getpixel((4, 4))
    assert red > 200 and green < 60 and blue < 60  # cyan 0, magenta + yellow full = red


def test_exif_orientation_turns_the_image_upright():
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    assert decode_image(encode(image, "JPEG", exif=exif)).size == (20, 40)


def test_garbage_bytes_are_unreadable():
    with pytest.raises(UnreadableImage, match="^photo: not a PNG, JPEG or WebP image") as err:
        decode_image(b"this is not an image at all", field="photo")
    assert err.value.status == 422 and err.value.field == "photo"


def test_a_damaged_header_is_unreadable():
    data = png()
    with pytest.raises(UnreadableImage, match="damaged PNG header"):
        decode_image(data[:20])


def test_a_truncated_png_is_refused_at_decode_time():
    data = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG")
    with pytest.raises(TruncatedImage, match="truncated") as err:
        decode_image(data[: len(data) // 2])
    assert err.value.status == 422


def test_empty_data_and_a_zero_size_image_are_empty():
    with pytest.raises(EmptyImage, match="0 bytes"):
        decode_image(b"")
    with pytest.raises(EmptyImage, match="0x12 pixels") as err:
        decode_image(with_png_size(png(), 0, 12))
    assert err.value.value == "0x12"


def test_too_many_bytes_is_413_with_value_and_limit():
    data = png()
    with pytest.raises(ImageTooLarge) as err:
        decode_image(data, max_bytes=len(data) - 1)
    assert (err.value.status, err.value.value, err.value.limit) == (413, len(data), len(data) - 1)
    with pytest.raises(ImageTooLarge):  # a data URL: refused from its length, before decoding the base64
        image_from_data_url(data_url(data), max_bytes=len(data) - 1)
    assert decode_image(data, max_bytes=len(data)).size == (16, 12)


def test_a_decompression_bomb_is_refused_from_its_header():
    bomb = with_png_size(png(), 100_000, 100_000)  # a few hundred bytes claiming 10 gigapixels
    with pytest.raises(TooManyPixels) as err:
        decode_image(bomb)
    assert (err.value.status, err.value.value, err.value.limit) == (413, 10**10, 40_000_000)
    jpeg = encode(Image.new("RGB", (100, 50)), "JPEG")
    with pytest.raises(TooManyPixels, match="5,000 pixels"):
        decode_image(jpeg, max_pixels=4_999)
    assert decode_image(jpeg, max_pixels=5_000).size == (100, 50)


def test_pils_own_bomb_limit_applies_above_ours():
    jpeg = bytearray(encode(Image.new("RGB", (64, 64)), "JPEG"))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5: sof + 9] = struct.pack(">HH", 20_000, 20_000)  # 400 M pixels in the frame header
    with pytest.raises(TooManyPixels, match="decompression bomb"):
        decode_image(bytes(jpeg), max_pixels=10**12)


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "ICO"])
def test_other_image_formats_are_unsupported(fmt):
    with pytest.raises(UnsupportedImageFormat, match=f"a {fmt} image; only PNG, JPEG and WebP") as err:
        decode_image(encode(Image.new("RGB", (16, 16)), fmt))
    assert err.value.status == 422 and err.value.value == fmt and err.value.limit == ["PNG", "JPEG", "WEBP"]


def test_data_urls():
    data = png()
    assert image_from_data_url(data_url(data)).tobytes() == decode_image(data).tobytes()
    wrapped = data_url(data).replace("base64,", "base64,\n")  # line breaks in the base64 are fine
    assert image_from_data_url(wrapped).size == (16, 12)
    cases = [
        ("http://example.com/cat.png", InvalidImageURL, "not a data URL"),
        ("data:image/png,rawbytes", InvalidImageURL, "not base64-encoded"),
        ("data:image/png;base64,@@@notbase64@@@", InvalidImageURL, "base64 data is invalid"),
        ("data:image/png;base64,QUJDRA=", InvalidImageURL, "base64 data is invalid"),  # bad padding
        (data_url(data, "image/gif"), UnsupportedImageFormat, "media type 'image/gif'"),
        (data_url(b"GIF89a" + b"\0" * 20), UnsupportedImageFormat, "a GIF image"),
        (data_url(b"plain text"), UnreadableImage, "not a PNG, JPEG or WebP image"),
    ]
    for url, kind, message in cases:
        with pytest.raises(kind, match=message) as err:
            image_from_data_url(url, field="messages[0].content[1].image_url.url")
        assert err.value.field == "messages[0].content[1].image_url.url"
        assert str(err.value).startswith("messages[0].content[1].image_url.url: ")
    with pytest.raises(InvalidImageURL) as err:
        image_from_data_url("data:image/png;base64,%%%")
    assert err.value.status == 400


def test_image_files(tmp_path):
    (tmp_path / "ok.webp").write_bytes(encode(Image.new("RGB", (8, 6)), "WEBP"))
    assert open_image_file(tmp_path / "ok.webp").size == (8, 6)
    with pytest.raises(InputError, match="no such file"):
        open_image_file(tmp_path / "missing.png")
    (tmp_path / "big.png").write_bytes(png(64, 64))
    with pytest.raises(ImageTooLarge, match=r"big.png: .* bytes is more than the limit of 10 bytes"):
        open_image_file(tmp_path / "big.png", max_bytes=10)
