"""ImageProcessor: output layout, EfficientNet-Lite normalization, resize/crop geometry, mode conversion, errors."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mixllm.image_processing import ImageProcessor, to_rgb

WHITE = (255 - 127) / 128  # 0.9921875
BLACK = (0 - 127) / 128  # -0.9921875


@pytest.fixture
def processor():
    return ImageProcessor()


def test_single_image_and_list_shapes(processor):
    out = processor(Image.new("RGB", (640, 480)))
    assert out.shape == (1, 3, 224, 224) and out.dtype == torch.float32
    images = [Image.new("RGB", (640, 480)), Image.new("RGB", (100, 300)), Image.new("RGB", (224, 224))]
    assert processor(images).shape == (3, 3, 224, 224)
    assert ImageProcessor(size=32)(images).shape == (3, 3, 32, 32)


def test_efficientnet_lite_normalization(processor):
    # (pixel - 127) / 128 on 0..255 pixels, per channel.
    out = processor(Image.new("RGB", (300, 200), (255, 0, 127)))[0]
    torch.testing.assert_close(out[0], torch.full((224, 224), WHITE))
    torch.testing.assert_close(out[1], torch.full((224, 224), BLACK))
    torch.testing.assert_close(out[2], torch.zeros(224, 224), atol=1e-6, rtol=0)
    noise = Image.frombytes("RGB", (256, 256), bytes(torch.randint(0, 256, (256 * 256 * 3,)).tolist()))
    out = processor(noise)
    assert out.min() >= BLACK - 1e-6 and out.max() <= WHITE + 1e-6


def test_center_crop_of_the_shorter_side():
    # 300×100: red | green | red in thirds. Resizing the shorter side to 224 and center cropping keeps the green third.
    image = Image.new("RGB", (300, 100), (255, 0, 0))
    image.paste((0, 255, 0), (100, 0, 200, 100))
    out = ImageProcessor()(image)[0]
    inner = out[:, :, 8:-8]  # away from the bicubic blend at the crop edges
    assert torch.allclose(inner[1], torch.tensor(WHITE), atol=0.05)
    assert torch.allclose(inner[0], torch.tensor(BLACK), atol=0.05)


def test_crop_pct_drops_the_border():
    # A 256×256 image with a 16-px red frame: crop_pct 0.875 (resize to 256, crop 224) removes exactly the frame.
    image = Image.new("RGB", (256, 256), (255, 0, 0))
    image.paste((0, 255, 0), (16, 16, 240, 240))
    out = ImageProcessor(crop_pct=0.875)(image)[0]
    assert torch.allclose(out[1], torch.tensor(WHITE)) and torch.allclose(out[0], torch.tensor(BLACK))
    framed = ImageProcessor(crop_pct=1.0)(image)[0]  # the frame is resized but kept
    assert framed[0, 0, 0] > 0.9


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P", "I;16", "CMYK"])
def test_any_mode_becomes_three_channels(processor, mode):
    image = Image.new("RGB", (50, 40), (30, 60, 90)).convert(mode)
    assert processor(image).shape == (1, 3, 224, 224)


def test_grayscale_repeats_the_channel(processor):
    out = processor(Image.new("L", (64, 64), 200))[0]
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


def test_transparent_pixels_become_white():
    transparent = Image.new("RGBA", (10, 10), (0, 0, 0, 0))  # black but fully transparent
    assert to_rgb(transparent).getpixel((5, 5)) == (255, 255, 255)
    opaque = Image.new("RGBA", (10, 10), (10, 20, 30, 255))
    assert to_rgb(opaque).getpixel((5, 5)) == (10, 20, 30)


def test_errors_name_what_was_wrong(processor):
    with pytest.raises(ValueError, match="empty list"):
        processor([])
    with pytest.raises(ValueError, match="images\\[1\\] is a str"):
        processor([Image.new("RGB", (8, 8)), "cat.jpg"])
    with pytest.raises(ValueError, match="PIL image"):
        processor(torch.zeros(3, 224, 224))
    with pytest.raises(ValueError, match="empty"):
        processor(Image.new("RGB", (0, 5)))


@pytest.mark.parametrize(
    "kwargs", [{"size": 0}, {"crop_pct": 0.0}, {"crop_pct": 1.5}, {"std": (1.0, 0.0, 1.0)}, {"mean": (0.5,)}]
)
def test_invalid_settings(kwargs):
    with pytest.raises(ValueError):
        ImageProcessor(**kwargs)
