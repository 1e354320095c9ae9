import pytest
import torch

from mixllm.merge import merge_modality_features

D = 4
TOKENS = {"image": 90, "item": 91, "user": 92}


def _embeds(input_ids):
    # Every text position carries its token id in all channels, so where features land is visible.
    return input_ids.float().unsqueeze(-1).expand(*input_ids.shape, D).clone()


@pytest.mark.parametrize("side", ["left", "right"])
def test_features_land_at_placeholders_in_order(side):
    pad = 0
    rows = [[5, 90, 90, 6, 91], [7, 91, 8]]
    length = max(map(len, rows))
    ids = torch.full((2, length), pad)
    for i, row in enumerate(rows):
        if side == "left":
            ids[i, length - len(row):] = torch.tensor(row)
        else:
            ids[i, : len(row)] = torch.tensor(row)
    image = torch.arange(2 * D, dtype=torch.float).view(1, 2, D) + 100  # one image, 2 tokens
    item = torch.arange(2 * D, dtype=torch.float).view(2, 1, D) + 200  # two items, 1 token each
    out = merge_modality_features(_embeds(ids), ids, {"image": image, "item": item}, TOKENS)

    img_pos = (ids == 90).nonzero().tolist()
    item_pos = (ids == 91).nonzero().tolist()
    assert [out[b, t].tolist() for b, t in img_pos] == image.view(-1, D).tolist()
    # Items are consumed row by row: the first item goes to row 0, the second to row 1.
    assert item_pos[0][0] == 0 and item_pos[1][0] == 1
    assert [out[b, t].tolist() for b, t in item_pos] == item.view(-1, D).tolist()
    text = (ids != 90) & (ids != 91)
    assert torch.equal(out[text], _embeds(ids)[text])  # text and padding untouched


def test_mismatch_raises_with_modality_and_both_counts():
    ids = torch.tensor([[1, 91, 91, 2]])
    with pytest.raises(ValueError, match=r"item: 2 placeholder tokens .* but 3 feature vectors"):
        merge_modality_features(_embeds(ids), ids, {"item": torch.randn(3, 1, D)}, TOKENS)
    with pytest.raises(ValueError, match=r"item: 2 placeholder tokens .* but 0 feature vectors"):
        merge_modality_features(_embeds(ids), ids, {}, TOKENS)
    no_item = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match=r"item: 0 placeholder tokens .* but 1 feature vectors"):
        merge_modality_features(_embeds(no_item), no_item, {"item": torch.randn(1, 1, D)}, TOKENS)


def test_width_and_unknown_modality_errors():
    ids = torch.tensor([[91]])
    with pytest.raises(ValueError, match="hidden size is 4"):
        merge_modality_features(_embeds(ids), ids, {"item": torch.randn(1, 1, D + 1)}, TOKENS)
    with pytest.raises(ValueError, match="unknown modalities"):
        merge_modality_features(_embeds(ids), ids, {"audio": torch.randn(1, D)}, {"item": 91})


def test_rows_without_modalities_and_mixed_batch():
    ids = torch.tensor([[1, 2, 3, 4], [90, 91, 92, 5], [6, 7, 92, 8]])
    feats = {"image": torch.full((1, 1, D), 1.0), "item": torch.full((1, 1, D), 2.0), "user": torch.full((2, 1, D), 3.0)}
    out = merge_modality_features(_embeds(ids), ids, feats, TOKENS)
    assert torch.equal(out[0], _embeds(ids)[0])  # a row with no modality is untouched
    assert out[1, 0].eq(1).all() and out[1, 1].eq(2).all() and out[1, 2].eq(3).all()
    assert out[2, 2].eq(3).all() and out[2, 3].eq(8).all()


def test_casts_to_embedding_dtype_and_keeps_gradients():
    ids = torch.tensor([[1, 91]])
    feats = torch.randn(1, 1, D, dtype=torch.float64, requires_grad=True)
    out = merge_modality_features(_embeds(ids), ids, {"item": feats}, TOKENS)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0
