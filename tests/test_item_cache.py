import pytest
import torch

from conftest import make_language_model, make_tokenizer
from mixllm.config import ItemConfig, MixLLMConfig
from mixllm.errors import DataError
from mixllm.item_cache import ItemTokenCache, cache_key
from mixllm.loading import build
from mixllm.ranking import ItemCatalog, MixLLMRanker, RankingRequest

F, N_ITEMS = 8, 30
REQUESTS = [RankingRequest(history=[3, 17, 5], candidates=[8, 2, 21, 2]), RankingRequest(history=[], candidates=[0, 29])]


def _student(tokens_per_item: int = 2) -> MixLLMRanker:
    torch.manual_seed(0)
    item = ItemConfig(feature_dim=F, num_items=0, tokens_per_item=tokens_per_item, projector="mlp2x_gelu")
    model, processor = build(MixLLMConfig(language_model="unused", item=item), language_model=make_language_model("llama"),
                             tokenizer=make_tokenizer())
    features = torch.randn(N_ITEMS, F, generator=torch.Generator().manual_seed(1))
    return MixLLMRanker(model, processor, ItemCatalog(features=features), mode="student").eval()


def _forbid_item_encoding(ranker: MixLLMRanker, monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("the item encoder/projector ran for a cached item")

    monkeypatch.setattr(ranker.model.encoders["item"], "forward", fail)
    monkeypatch.setattr(ranker.model.projectors["item"], "forward", fail)


@torch.no_grad()
def test_cached_tokens_give_the_same_scores_and_never_run_the_encoder(monkeypatch):
    ranker = _student()
    expected = ranker.score(REQUESTS)
    ranker.token_cache = ItemTokenCache.build(ranker.model, features=ranker.catalog.features, batch_size=7)
    _forbid_item_encoding(ranker, monkeypatch)
    got = ranker.score(REQUESTS)
    # The cache runs the same projector on the same rows, only in batches of 7 instead of per request:
    # float32 matmuls of width <= 64 may round differently per batch shape, ~1e-7 relative, far below 1e-5.
    for g, e in zip(got, expected):
        assert torch.allclose(g, e, atol=1e-5), (g, e)
    assert not torch.allclose(got[0][0], got[0][1], atol=1e-3)  # rows are not mixed up: items score differently


@torch.no_grad()
def test_put_appends_new_rows_and_grows_geometrically():
    ranker = _student()
    cache = ItemTokenCache.build(ranker.model, features=ranker.catalog.features)
    assert cache.tokens.shape == (N_ITEMS, 2, 32)
    new = torch.randn(3, F)
    tokens = ItemTokenCache.encode(ranker.model, features=new)
    cache.put([N_ITEMS, N_ITEMS + 1, N_ITEMS + 2], tokens)
    assert cache.num_rows == N_ITEMS + 3 and cache._buffer.shape[0] >= 2 * N_ITEMS  # capacity doubled, not +3
    assert torch.equal(cache.gather(torch.tensor([N_ITEMS + 1])), tokens[1:2])  # a copy of the same numbers
    old = cache.gather(torch.tensor([4])).clone()
    cache.put([4], tokens[:1])  # an update overwrites in place
    assert torch.equal(cache.gather(torch.tensor([4])), tokens[:1]) and not torch.equal(old, tokens[:1])
    with pytest.raises(ValueError, match="do not fit"):
        cache.put([1], torch.zeros(1, 3, 32))
    ranker.token_cache = cache
    with pytest.raises(DataError, match=r"request 0 candidates: item row 40 is not in the item token cache \(rows 0..32\)"):
        ranker.score([RankingRequest([1], [40])])
    (scores,) = ranker.score([RankingRequest([1, N_ITEMS + 2], [N_ITEMS, 3])])  # new rows rank like any other
    assert torch.isfinite(scores).all()


def test_cache_file_is_keyed_by_checkpoint_and_catalog(tmp_path):
    ranker = _student()
    ckpt = tmp_path / "ckpt"
    ranker.model.save_pretrained(ckpt)
    features = ranker.catalog.features
    key = cache_key(ckpt, features)
    assert key == cache_key(ckpt, features.clone())
    assert key != cache_key(ckpt, features[:-1])  # another catalog
    cache = ItemTokenCache.build(ranker.model, features=features)
    cache.save(tmp_path / "cache.safetensors", key)
    loaded = ItemTokenCache.load(tmp_path / "cache.safetensors", key)
    assert loaded is not None and torch.equal(loaded.tokens, cache.tokens)
    assert ItemTokenCache.load(tmp_path / "cache.safetensors", "another key") is None
    (ckpt / "mixllm_weights.safetensors").write_bytes(b"changed weights")
    assert cache_key(ckpt, features) != key  # another checkpoint
    (tmp_path / "torn.safetensors").write_bytes(b"\x00" * 10)
    assert ItemTokenCache.load(tmp_path / "torn.safetensors", key) is None
    assert ItemTokenCache.load(tmp_path / "missing.safetensors", key) is None
