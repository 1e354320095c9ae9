"""The image encoder with transformers vision towers from local directories (CLIP, SigLIP)."""

import pytest
import torch

from mixllm.config import ImageConfig
from mixllm.encoders.image import ImageEncoder

TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8)


def _save_clip_vision(path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(**TOWER)).eval()
    model.save_pretrained(path)
    return model


def test_clip_drops_cls_and_selects_the_layer(tmp_path):
    reference = _save_clip_vision(tmp_path / "clip")
    enc = ImageEncoder(ImageConfig(encoder="hf", path=str(tmp_path / "clip"), vision_feature_layer=-2))
    pixels = torch.randn(2, 3, 32, 32)
    out = enc(pixels)
    assert enc.num_tokens == 16 and out.shape == (2, 16, 32)
    expected = reference(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    assert torch.allclose(out, expected, atol=1e-6)
    assert not any(p.requires_grad for p in enc.parameters())  # frozen by default


def test_dual_clip_directory_loads_the_vision_half(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=99)
    CLIPModel(CLIPConfig(text_config=text, vision_config=TOWER, projection_dim=16)).save_pretrained(tmp_path / "dual")
    enc = ImageEncoder(ImageConfig(encoder="hf", path=str(tmp_path / "dual")))
    assert enc(torch.randn(1, 3, 32, 32)).shape == (1, 16, 32)


def test_siglip_keeps_every_patch(tmp_path):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    SiglipVisionModel(SiglipVisionConfig(**TOWER)).save_pretrained(tmp_path / "siglip")
    enc = ImageEncoder(ImageConfig(encoder="hf", path=str(tmp_path / "siglip")))
    assert enc.strategy == "full" and enc.num_tokens == 16
    assert enc(torch.randn(1, 3, 32, 32)).shape == (1, 16, 32)


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="local directory"):
        ImageEncoder(ImageConfig(encoder="hf", path=str(tmp_path / "nope")))


def test_efficientnet_feature_stages_pool_to_the_head_grid_and_concatenate():
    import torch.nn.functional as F

    from mixllm.config import MixLLMConfig

    head = ImageEncoder(ImageConfig())
    assert head.output_dim == 1280 and head.num_tokens == 49
    both = ImageEncoder(ImageConfig(vision_feature_layer=[7, 14]), tower=head.tower)
    assert both.output_dim == 80 + 192 and both.tower_tokens == 49
    pixels = torch.randn(2, 3, 224, 224)
    tower = head.tower
    with torch.no_grad():
        x = tower.act(tower._bn0(tower._conv_stem(pixels)))
        outputs = []
        for block in tower._blocks:
            x = block(x)
            outputs.append(x)
        expected = torch.cat([F.avg_pool2d(outputs[7], 2), outputs[14]], 1).flatten(2).transpose(1, 2)  # 14x14 -> 7x7
        torch.testing.assert_close(both.tower_features(pixels), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(head.tower_features(pixels), tower.forward_features(pixels).flatten(2).transpose(1, 2))
        last = ImageEncoder(ImageConfig(vision_feature_layer=16), tower=tower).tower_features(pixels)
        torch.testing.assert_close(last, head.tower_features(pixels))
    with pytest.raises(ValueError, match="stages 0-16"):
        ImageEncoder(ImageConfig(vision_feature_layer=17), tower=tower)
    with pytest.raises(ValueError, match="vision_feature_layer"):
        MixLLMConfig(image=ImageConfig(vision_feature_layer=[]))
