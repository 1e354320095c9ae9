"""Image preprocessing: PIL images -> a normalized (B, 3, size, size) float32 batch for the vision tower.

The default normalization is the one the packaged EfficientNet-Lite0 weights were trained with (TF-Lite
EfficientNet): `(pixel - 127) / 128` on 0..255 pixels, i.e. mean 127/255 and std 128/255 on [0, 1] pixels.
By default the shorter side is resized (bicubic) straight to `size` and the center square kept, as
CLIP/LLaVA processors do, so the whole shorter side is seen; `crop_pct=0.875` reproduces the TF ImageNet
evaluation crop (224 out of 256).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

# TF-Lite EfficientNet normalization (efficientnet/lite/efficientnet_lite_builder.py: MEAN_RGB, STDDEV_RGB).
EFFICIENTNET_LITE_MEAN = (127.0 / 255.0, 127.0 / 255.0, 127.0 / 255.0)
EFFICIENTNET_LITE_STD = (128.0 / 255.0, 128.0 / 255.0, 128.0 / 255.0)


@dataclass
class ImageProcessor:
    """Resize the shorter side, center crop to `size`, convert to RGB, scale to [0, 1] and normalize.

    Grayscale, palette and alpha images are converted to RGB (transparent areas composited onto white).
    """

    size: int = 224
    """Side of the square output crop, in pixels."""
    crop_pct: float = 1.0
    """Fraction of the resized shorter side kept by the center crop: the shorter side is resized to
    `round(size / crop_pct)` before cropping. 1.0 resizes it straight to `size`; 0.875 is the TF ImageNet
    evaluation crop (resize to 256, crop 224)."""
    mean: tuple[float, float, float] = EFFICIENTNET_LITE_MEAN
    """Per-channel mean subtracted from [0, 1] pixels."""
    std: tuple[float, float, float] = EFFICIENTNET_LITE_STD
    """Per-channel standard deviation dividing the centred pixels."""

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size <= 0:
            raise ValueError(f"size must be a positive int, got {self.size!r}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {self.mean!r} and {self.std!r}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std!r}")
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)

    def __call__(self, images: Image.Image | list[Image.Image]) -> torch.Tensor:
        """One image or a list of images -> (B, 3, size, size) float32."""
        if isinstance(images, Image.Image):
            images = [images]
        if not isinstance(images, (list, tuple)):
            raise ValueError(f"expected a PIL image or a list of PIL images, got {type(images).__name__}")
        if len(images) == 0:
            raise ValueError("expected at least one image, got an empty list")
        for i, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise ValueError(f"images[{i}] is a {type(image).__name__}, not a PIL image")
            if image.width == 0 or image.height == 0:
                raise ValueError(f"images[{i}] is empty ({image.width}x{image.height})")
        pixels = torch.stack([self._to_tensor(self._resize_and_crop(to_rgb(im))) for im in images])  # (B, 3, S, S)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (pixels - mean) / std

    def _resize_and_crop(self, image: Image.Image) -> Image.Image:
        resized_short = max(self.size, round(self.size / self.crop_pct))
        scale = resized_short / min(image.width, image.height)
        width = max(resized_short, round(image.width * scale))  # max(): rounding never takes a side below the crop
        height = max(resized_short, round(image.height * scale))
        image = image.resize((width, height), Image.Resampling.BICUBIC)
        left = (width - self.size) // 2
        top = (height - self.size) // 2
        return image.crop((left, top, left + self.size, top + self.size))

    @staticmethod
    def _to_tensor(image: Image.Image) -> torch.Tensor:
        """RGB PIL image -> (3, H, W) float32 in [0, 1]."""
        data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)  # (H * W * 3,)
        return data.view(image.height, image.width, 3).permute(2, 0, 1).float() / 255.0  # (3, H, W)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited onto white rather than dropped."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
