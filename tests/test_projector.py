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


def test_standardize_maps_each_channel_to_zero_mean_unit_std_before_the_mlp():
    torch.manual_seed(0)
    scales = torch.tensor([0.1, 1.0, 300.0]).repeat_interleave(4)  # tower stages of very different scales
    features = torch.randn(50, 9, 12) * scales + 5.0
    projector = Projector(12, 20, "mlp2x_gelu", standardize=True)
    x = features[:3]
    plain = Projector(12, 20, "mlp2x_gelu")
    plain.load_state_dict({k: v for k, v in projector.state_dict().items() if k.startswith("linear_")})
    torch.testing.assert_close(projector(x), plain(x))  # identity until fitted
    projector.fit_input_statistics(features)
    assert {"input_mean", "input_std"} <= set(projector.state_dict())  # stored in checkpoints
    flat = features.reshape(-1, 12)
    standardised = (x - flat.mean(0)) / (flat.std(0) + 1e-3)
    torch.testing.assert_close(projector(x), plain(standardised))
    per_channel = ((flat - projector.input_mean) / projector.input_std).std(0)
    assert (per_channel > 0.98).all() and (per_channel < 1.01).all()  # every channel at one scale (eps: 1% at 0.1)


def test_fitting_statistics_needs_a_standardising_projector_and_matching_features():
    with pytest.raises(ValueError, match="standardize=False"):
        Projector(12, 20).fit_input_statistics(torch.randn(4, 12))
    with pytest.raises(ValueError, match="width 12"):
        Projector(12, 20, standardize=True).fit_input_statistics(torch.randn(4, 10))


def test_position_table_adds_one_row_per_token_and_can_be_left_out():
    torch.manual_seed(0)
    projector = Projector(12, 20, "mlp2x_gelu", positions=9)
    assert projector.positions.shape == (9, 20) and not projector.positions.any()  # zeros until set
    with torch.no_grad():
        projector.positions.normal_()
    x = torch.randn(2, 9, 12)
    content = projector(x, add_positions=False)
    torch.testing.assert_close(projector(x), content + projector.positions)
    assert "positions" in projector.state_dict()
    projector(x).sum().backward()
    torch.testing.assert_close(projector.positions.grad, torch.full((9, 20), 2.0))  # one per image of the batch
    with pytest.raises(ValueError, match="9 rows but the input has 4 tokens"):
        projector(torch.randn(2, 4, 12))
    with pytest.raises(ValueError, match="positions must be >= 1"):
        Projector(12, 20, positions=0)


def test_grid_input_tells_the_mlp_each_tokens_row_and_column():
    from mixllm.projector import grid_codes

    codes = grid_codes(3)
    assert codes.shape == (9, 6)
    assert codes[5].tolist() == [0, 1, 0, 0, 0, 1]  # token 5 of a 3x3 raster: row 1, column 2
    assert torch.unique(codes, dim=0).shape[0] == 9  # every cell is told apart
    torch.manual_seed(0)
    projector = Projector(12, 20, "mlp2x_gelu", standardize=True, grid=3)
    assert projector.linear_1.in_features == 12 + 6
    assert "grid_codes" not in projector.state_dict()  # rebuilt from the config, not stored
    same = torch.randn(12).expand(2, 9, 12)  # one feature vector in every cell
    out = projector(same)
    assert out.shape == (2, 9, 20)
    assert not torch.allclose(out[:, 0], out[:, 1])  # the same content in two cells now differs
    torch.testing.assert_close(out[0], out[1])  # and depends on the cell, not on the image in the batch
    # the codes enter after the standardisation: a changed mean moves the content, not the codes' columns
    with torch.no_grad():
        projector.linear_1.weight[:, :12] = 0
    torch.testing.assert_close(projector(torch.randn(2, 9, 12)), projector(torch.randn(2, 9, 12)))
    with pytest.raises(ValueError, match="grid is 3x3 = 9 tokens but the input has 4"):
        projector(torch.randn(2, 4, 12))
    with pytest.raises(ValueError, match="grid must be >= 1"):
        Projector(12, 20, grid=0)
