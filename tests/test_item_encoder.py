import pytest
import torch

from mixllm.config import ItemConfig
from mixllm.encoders.item import ItemEncoder


def test_one_token_per_item_keeps_the_features_and_id_embedding():
    enc = ItemEncoder(ItemConfig(feature_dim=5, num_items=10, id_dim=3))
    feats, ids = torch.randn(4, 5), torch.tensor([0, 3, 3, 9])
    out = enc(feats, ids)
    assert out.shape == (4, 1, 8)
    assert torch.equal(out[:, 0, :5], feats)
    assert torch.equal(out[1, 0, 5:], out[2, 0, 5:])  # same id, same embedding
    assert torch.equal(out[:, 0, 5:], enc.id_embedding(ids))


def test_k_tokens_per_item_and_feature_only_or_id_only():
    assert ItemEncoder(ItemConfig(feature_dim=5, tokens_per_item=3))(torch.randn(2, 5)).shape == (2, 3, 5)
    assert ItemEncoder(ItemConfig(feature_dim=0, num_items=7, id_dim=4))(None, torch.tensor([1, 2])).shape == (2, 1, 4)


def test_errors():
    enc = ItemEncoder(ItemConfig(feature_dim=5, num_items=10, id_dim=3))
    with pytest.raises(ValueError, match=r"\(num_items, 5\)"):
        enc(torch.randn(2, 4), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="item_ids are required"):
        enc(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        enc(torch.randn(1, 5), torch.tensor([10]))
    with pytest.raises(ValueError, match="feature_dim > 0 or num_items > 0"):
        __import__("mixllm.config", fromlist=["MixLLMConfig"]).MixLLMConfig(item=ItemConfig(feature_dim=0))
