"""SentenceEncoder: masked mean pooling, normalization and batching on a tiny random BERT; MiniLM (integration)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BertConfig, BertModel

from mixllm.encoders.text import SentenceEncoder, mean_pool
from mixllm.errors import AssetError

PAD = 0  # conftest tokenizer's <pad> id


def tiny_bert() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, pad_token_id=PAD,
    )
    return BertModel(config, add_pooling_layer=False).eval()


@pytest.fixture
def encoder(tokenizer):
    return SentenceEncoder(tiny_bert(), tokenizer).eval()


def test_mean_pool_by_hand():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])  # (1, 3, 2), last token is padding
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(mean_pool(hidden, mask), torch.tensor([[2.0, 3.0]]))
    assert torch.equal(mean_pool(hidden, torch.zeros(1, 3)), torch.zeros(1, 2))  # all padding: zeros, not NaN


def test_pooling_ignores_padding(encoder):
    ids = torch.tensor([[5, 9, 12, 7]])
    alone = encoder(ids, torch.ones_like(ids))  # (1, D)
    # The same text padded to 9 tokens, in a batch next to a longer text.
    padded = torch.tensor([[5, 9, 12, 7, PAD, PAD, PAD, PAD, PAD], [4, 6, 8, 10, 11, 13, 14, 15, 16]])
    mask = (padded != PAD).long()
    batched = encoder(padded, mask)  # (2, D)
    torch.testing.assert_close(batched[0], alone[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batched[1], alone[0], atol=1e-3)


def test_embeddings_are_unit_norm_with_dim_of_hidden_size(encoder):
    ids = torch.randint(4, 64, (3, 6))
    out = encoder(ids, torch.ones_like(ids))
    assert encoder.dim == 32 and out.shape == (3, 32)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))


def test_encode_keeps_order_and_does_not_depend_on_batching(encoder, tokenizer):
    texts = ["the movie", "a good film user likes", "yes", "what is this image", "bad"]
    one_by_one = torch.cat([encoder.encode([t]) for t in texts])
    for batch_size in (1, 2, 64):
        torch.testing.assert_close(encoder.encode(texts, batch_size=batch_size), one_by_one, atol=1e-5, rtol=1e-5)
    batch = tokenizer(["a good film user likes"], return_tensors="pt")
    torch.testing.assert_close(one_by_one[1], encoder(batch["input_ids"], batch["attention_mask"])[0])


def test_encode_truncates_to_max_length(encoder):
    long_text = " ".join(["movie"] * 50)
    truncated = encoder.encode(["movie movie movie movie"], max_length=4)
    torch.testing.assert_close(encoder.encode([long_text], max_length=4), truncated)


def test_encode_progress_bar_and_empty_input(encoder, capsys):
    out = encoder.encode(["the movie"] * 3, batch_size=2, show_progress=True)
    assert out.shape == (3, 32)
    assert "encoding texts" in capsys.readouterr().err
    assert encoder.encode([]).shape == (0, 32)


def test_encode_errors(encoder):
    with pytest.raises(ValueError, match="list of strings"):
        encoder.encode("the movie")
    with pytest.raises(ValueError, match=r"texts\[1\] is a int"):
        encoder.encode(["the movie", 3])
    with pytest.raises(ValueError, match="tokenizer"):
        SentenceEncoder(tiny_bert()).encode(["the movie"])


def test_from_pretrained_local_directory(tmp_path, tokenizer):
    tiny_bert().save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    loaded = SentenceEncoder.from_pretrained(tmp_path)
    reference = SentenceEncoder(tiny_bert(), tokenizer)
    assert not loaded.training
    torch.testing.assert_close(loaded.encode(["the movie"]), reference.encode(["the movie"]))

    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    with pytest.raises(ValueError, match="mean tokens"):
        SentenceEncoder.from_pretrained(tmp_path)
    with pytest.raises(AssetError, match="config.json"):
        SentenceEncoder.from_pretrained(tmp_path / "missing")


@pytest.mark.integration
def test_minilm_ranks_related_texts_closer():
    encoder = SentenceEncoder.from_pretrained()  # asset_path("all-minilm-l6-v2")
    funny, comedy, tax = encoder.encode(["a funny film", "a comedy movie", "tax law regulations"])
    assert encoder.dim == 384 and funny.shape == (384,)
    torch.testing.assert_close(torch.stack([funny, comedy, tax]).norm(dim=-1), torch.ones(3))
    assert funny @ comedy > tax @ comedy + 0.3
