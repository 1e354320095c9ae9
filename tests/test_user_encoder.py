import pytest
import torch

from mixllm.config import UserConfig
from mixllm.encoders.user import UserEncoder


def _encoder():
    torch.manual_seed(0)
    return UserEncoder(UserConfig(item_dim=6, num_tokens=3, hidden_dim=16, num_heads=2, max_history=8)).eval()


def test_fixed_number_of_tokens_whatever_the_history_length():
    enc = _encoder()
    assert enc(torch.randn(2, 5, 6)).shape == (2, 3, 16)
    assert enc(torch.randn(1, 8, 6)).shape == (1, 3, 16)


def test_padding_does_not_change_a_users_tokens():
    enc = _encoder()
    history = torch.randn(1, 4, 6)
    alone = enc(history)
    padded = torch.cat([history, torch.randn(1, 3, 6) * 100], dim=1)  # junk in the padded slots
    mask = torch.tensor([[True] * 4 + [False] * 3])
    assert torch.allclose(enc(padded, mask), alone, atol=1e-5)


def test_history_order_matters():
    enc = _encoder()
    history = torch.randn(1, 4, 6)
    assert not torch.allclose(enc(history), enc(history.flip(1)), atol=1e-4)


def test_errors_name_the_limit():
    enc = _encoder()
    with pytest.raises(ValueError, match="at most 8"):
        enc(torch.randn(1, 9, 6))
    with pytest.raises(ValueError, match="width 6"):
        enc(torch.randn(1, 2, 5))
    with pytest.raises(ValueError, match="at least one history item"):
        enc(torch.randn(2, 2, 6), torch.tensor([[True, False], [False, False]]))
