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
