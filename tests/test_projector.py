import pytest
import torch

from mixllm.projector import Projector


def test_linear_and_mlp_shapes_and_llava_names():
    x = torch.randn(2, 7, 12)
    assert Projector(12, 20, "linear")(x).shape == (2, 7, 20)
    mlp = Projector(12, 20, "mlp2x_gelu")
    assert mlp(x).shape == (2, 7, 20)
    assert set(mlp.state_dict()) == {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}
    expected = mlp.linear_2(torch.nn.functional.gelu(mlp.linear_1(x)))
    assert torch.allclose(mlp(x), expected)


def test_unknown_type_is_rejected():
    with pytest.raises(ValueError, match="'conv'"):
        Projector(4, 4, "conv")


def test_output_norm_gives_every_token_the_set_rms_and_its_gain_learns():
    projector = Projector(12, 20, "mlp2x_gelu", output_rms=0.25)
    assert "norm.weight" in projector.state_dict()
    x = torch.randn(2, 7, 12) * torch.tensor([0.01, 1.0, 300.0]).repeat_interleave(4)  # inputs of very different scales
    out = projector(x)
    rms = out.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.full_like(rms, 0.25), rtol=1e-4, atol=0)
    out.sum().backward()
    assert projector.norm.weight.grad is not None and projector.linear_1.weight.grad is not None
    plain = Projector(12, 20, "mlp2x_gelu")
    plain.load_state_dict({k: v for k, v in projector.state_dict().items() if not k.startswith("norm.")})
    direction = torch.nn.functional.normalize(plain(x), dim=-1)
    torch.testing.assert_close(torch.nn.functional.normalize(out, dim=-1), direction, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rms", [0.0, -1.0])
def test_output_norm_must_be_positive(rms):
    with pytest.raises(ValueError, match="output_rms must be positive"):
        Projector(4, 4, output_rms=rms)
