"""EfficientNet-Lite0: shapes, parameter count, TF "SAME" padding and strict loading (random weights), then the
packaged ImageNet weights (integration)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mixllm.encoders.efficientnet_lite import (
    Conv2dSame,
    EfficientNetLite0,
    EfficientNetLiteConfig,
    StageArgs,
    efficientnet_lite0,
)
from mixllm.errors import AssetError
from mixllm.image_processing import ImageProcessor

LITE0_PARAMS = 4_652_008  # weights + biases of the packaged state dict (BN running stats excluded)
MILITARY_UNIFORM = 652  # ImageNet-1k class index


@pytest.fixture(scope="module")
def random_model():
    torch.manual_seed(0)
    return efficientnet_lite0(weights=None)


def test_feature_grid_and_logits_shapes(random_model):
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        features = random_model.forward_features(x)
        logits = random_model(x)
    assert features.shape == (2, EfficientNetLite0.num_features, 7, 7)
    assert logits.shape == (2, 1000)
    assert features.min() >= 0 and features.max() <= 6  # after the head's ReLU6
    assert not random_model.training  # the factory returns eval mode


def test_other_input_sizes_give_ceil_stride_32_grids(random_model):
    with torch.no_grad():
        # ceil(200 / 32) = 7
        assert random_model.forward_features(torch.randn(1, 3, 256, 200)).shape == (1, 1280, 8, 7)
        assert random_model.forward_features(torch.randn(1, 3, 225, 225)).shape == (1, 1280, 8, 8)


def test_rejects_wrong_input_layout(random_model):
    with pytest.raises(ValueError, match="pixel_values"):
        random_model.forward_features(torch.randn(1, 224, 224, 3))


def test_parameter_count_and_block_layout(random_model):
    assert sum(p.numel() for p in random_model.parameters()) == LITE0_PARAMS
    assert len(random_model._blocks) == 16
    assert len(random_model.state_dict()) == 296
    assert not hasattr(random_model._blocks[0], "_expand_conv")  # expand ratio 1: no expansion conv
    assert random_model._blocks[3]._depthwise_conv.kernel_size == (5, 5)
    assert random_model._bn0.eps == 1e-3


def test_tf_same_padding_puts_the_extra_pixel_bottom_right():
    # A kernel that reads only its top-left tap: with TF "SAME" (pad 0 before, 1 after for k3 s2 on an even
    # input) output[i, j] == x[2i, 2j]; PyTorch's symmetric padding would read x[2i - 1, 2j - 1].
    conv = Conv2dSame(1, 1, 3, stride=2)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 0, 0] = 1.0
    x = torch.arange(64.0).view(1, 1, 8, 8)
    assert torch.equal(conv(x), x[:, :, ::2, ::2])
    # Odd input: total padding 2, split (1, 1); output keeps ceil(9 / 2) = 5.
    assert conv(torch.randn(1, 1, 9, 9)).shape == (1, 1, 5, 5)


def test_symmetric_padding_option_builds_the_same_parameters():
    model = EfficientNetLite0(EfficientNetLiteConfig(tf_same_padding=False))
    assert sum(p.numel() for p in model.parameters()) == LITE0_PARAMS
    assert not any(isinstance(m, Conv2dSame) for m in model.modules())


def test_strict_round_trip_of_own_state_dict(random_model, tmp_path):
    path = tmp_path / "efficientnet-lite0.pth"
    torch.save(random_model.state_dict(), path)
    x = torch.randn(1, 3, 224, 224)
    state = random_model.state_dict()
    with torch.no_grad():
        expected = random_model(x)
        for weights in (path, str(path), tmp_path):  # a file, its str, or the directory holding it
            loaded = efficientnet_lite0(weights)
            # Bit-for-bit copies of every weight and BN statistic; the outputs are then the same
            # function of x, equal up to float32 rounding (compared with torch's float32 defaults,
            # rtol 1.3e-6 / atol 1e-5; a missing or mis-mapped tensor changes them by orders more).
            assert set(loaded.state_dict()) == set(state)
            assert all(torch.equal(loaded.state_dict()[name], value) for name, value in state.items())
            torch.testing.assert_close(loaded(x), expected)


def test_strict_load_rejects_missing_and_unexpected_keys(random_model, tmp_path):
    state = random_model.state_dict()
    missing = dict(state)
    missing.pop("_fc.bias")
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(RuntimeError, match="_fc.bias"):
        efficientnet_lite0(tmp_path / "missing.pth")
    extra = dict(state, **{"_blocks.0._se_reduce.weight": torch.zeros(8, 32, 1, 1)})  # a B0 (squeeze-excite) key
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(RuntimeError, match="_se_reduce"):
        efficientnet_lite0(tmp_path / "extra.pth")


def test_missing_weights_file_is_an_asset_error(tmp_path):
    with pytest.raises(AssetError, match="not found"):
        efficientnet_lite0(tmp_path / "nope.pth")


def test_config_rejects_stages_that_do_not_chain():
    with pytest.raises(ValueError, match="do not chain"):
        EfficientNetLiteConfig(stages=(StageArgs(1, 3, 1, 1, 32, 16), StageArgs(1, 3, 2, 6, 24, 40)))
    with pytest.raises(ValueError, match="stem"):
        EfficientNetLiteConfig(stages=(StageArgs(1, 3, 1, 1, 16, 16),))


def test_stochastic_depth_only_in_training():
    torch.manual_seed(0)
    model = EfficientNetLite0(EfficientNetLiteConfig(drop_connect_rate=0.5, dropout=0.0))
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(1)
    out = model(x)
    out.sum().backward()  # trains end to end
    assert model._conv_stem.weight.grad is not None


# --- the packaged ImageNet weights ---------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained():
    return efficientnet_lite0()  # "default": asset_path("efficientnet-lite0") / "efficientnet-lite0.pth", strict


@pytest.fixture(scope="module")
def grace_hopper():
    cbook = pytest.importorskip("matplotlib.cbook")
    return Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")  # 512×600


@pytest.mark.integration
def test_pretrained_loads_strictly_and_gives_a_7x7x1280_grid(pretrained):
    image = Image.new("RGB", (224, 224), (120, 160, 200))
    with torch.no_grad():
        features = pretrained.forward_features(ImageProcessor()(image))
    assert features.shape == (1, 1280, 7, 7)
    assert torch.isfinite(features).all()


@pytest.mark.integration
def test_pretrained_recognises_grace_hopper_under_small_shifts(pretrained, grace_hopper):
    """matplotlib's photo of Grace Hopper in uniform: 'military uniform' stays in the top 5 under small shifts."""
    crops = [grace_hopper.crop((dx, dy, dx + 500, dy + 580)) for dx, dy in ((0, 0), (6, 10), (12, 20))]
    with torch.no_grad():
        logits = pretrained(ImageProcessor()(crops))  # (3, 1000)
    assert logits.std(dim=-1).min() > 0.5  # not degenerate
    for row in logits:
        assert MILITARY_UNIFORM in row.topk(5).indices.tolist()


@pytest.mark.integration
def test_processor_normalization_matches_the_weights_batchnorm_statistics(pretrained, grace_hopper):
    """The stem BatchNorm's running variance records the input scale the weights were trained with. On a natural
    photo, (x*255-127)/128 reproduces it (ratio ~1.1); ImageNet mean/std would give ~5.6 and [0, 1] pixels ~0.28."""
    with torch.no_grad():
        stem = pretrained._conv_stem(ImageProcessor()(grace_hopper))  # (1, 32, 112, 112), before BN
    ratio = (stem.var(dim=(0, 2, 3)) / pretrained._bn0.running_var).median()
    assert 0.5 < ratio < 2.0


@pytest.mark.integration
def test_tf_same_padding_and_lite_normalization_fit_the_weights_best(pretrained, grace_hopper):
    """Mean log-probability of 'military uniform' over three shifted crops: the shipped setup (TF "SAME" padding,
    (x*255-127)/128) scores about -0.8; symmetric padding about -2.0; ImageNet mean/std about -1.2."""
    crops = [grace_hopper.crop((dx, dy, dx + 500, dy + 580)) for dx, dy in ((0, 0), (6, 10), (12, 20))]
    imagenet = ImageProcessor(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    symmetric = EfficientNetLite0(EfficientNetLiteConfig(tf_same_padding=False))
    symmetric.load_state_dict(pretrained.state_dict(), strict=True)
    symmetric.eval()

    def score(model, processor):
        with torch.no_grad():
            return model(processor(crops)).log_softmax(dim=-1)[:, MILITARY_UNIFORM].mean().item()

    shipped = score(pretrained, ImageProcessor())
    assert shipped > score(symmetric, ImageProcessor()) + 0.5
    assert shipped > score(pretrained, imagenet) + 0.2
