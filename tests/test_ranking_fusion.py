"""Score fusion: score + gate * retriever score, with a learned gate that starts at 0."""

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_language_model, make_tokenizer
from mixllm.config import ItemConfig, MixLLMConfig
from mixllm.errors import DataError
from mixllm.loading import build
from mixllm.ranking import ItemCatalog, MixLLMRanker, RankingRequest

F, N_ITEMS = 8, 30
CANDIDATES = [[8, 2, 21, 5], [0, 29, 13]]
RETRIEVER = [[2.0, -1.0, 0.5, 3.0], [-0.5, 1.5, 4.0]]  # e.g. SASRec's dot products of the candidates
REQUESTS = [RankingRequest([3, 17, 5], c, r) for c, r in zip(CANDIDATES, RETRIEVER)]


def _pair(scoring: str = "head", lm_path="unused") -> tuple[MixLLMRanker, MixLLMRanker]:
    """The same model and score head without and with fusion."""
    torch.manual_seed(0)
    item = ItemConfig(feature_dim=F, num_items=0, tokens_per_item=1, projector="linear")
    model, processor = build(MixLLMConfig(language_model=str(lm_path), item=item), language_model=make_language_model("llama"),
                             tokenizer=make_tokenizer())  # fmt: skip
    catalog = ItemCatalog(features=torch.randn(N_ITEMS, F, generator=torch.Generator().manual_seed(1)))
    plain = MixLLMRanker(model, processor, catalog, scoring=scoring).eval()
    fused = MixLLMRanker(model, processor, catalog, scoring=scoring, fusion=True).eval()
    if scoring == "head":
        fused.score_head.load_state_dict(plain.score_head.state_dict())
    return plain, fused


def _alone(requests: list[RankingRequest]) -> list[RankingRequest]:
    return [RankingRequest(r.history, r.candidates) for r in requests]


@torch.no_grad()
def test_gate_starts_at_zero_and_gives_exactly_the_ranker_alone():
    plain, fused = _pair()
    assert plain.fusion_gate is None and "fusion_gate" not in dict(plain.named_parameters())
    assert fused.fusion_gate.dtype == torch.float32 and fused.fusion_gate.shape == () and float(fused.fusion_gate) == 0.0
    expected = plain.score(_alone(REQUESTS))
    got = fused.score(REQUESTS)
    for g, e in zip(got, expected):
        assert torch.equal(g, e)  # s + 0 * r == s exactly for finite r


def test_gate_gets_a_gradient_from_a_listwise_loss():
    plain, fused = _pair()
    fused.train()
    inputs = fused.prepare(REQUESTS)
    scores = fused(inputs).masked_fill(~inputs.candidate_mask, float("-inf"))  # (B, C_max)
    loss = torch.nn.functional.cross_entropy(scores, torch.tensor([0, 2]), reduction="sum")
    loss.backward()
    # d loss / d gate = sum_b sum_c (softmax(s_b) - onehot_b)_c * r_bc, non-zero unless r is flat.
    with torch.no_grad():
        probs = torch.softmax(scores, -1)
        onehot = torch.nn.functional.one_hot(torch.tensor([0, 2]), scores.shape[1]).float()
        expected = ((probs - onehot) * inputs.retriever_scores).sum()
    assert abs(float(expected)) > 1e-2  # the check is not vacuous
    assert torch.allclose(fused.fusion_gate.grad, expected, atol=1e-5), (fused.fusion_gate.grad, expected)


@torch.no_grad()
def test_scores_are_the_ranker_score_plus_gate_times_retriever_score():
    plain, fused = _pair()
    fused.fusion_gate.fill_(0.7)
    inputs = fused.prepare(REQUESTS)
    assert inputs.retriever_scores.tolist() == [RETRIEVER[0], RETRIEVER[1] + [0.0]]  # padded slot: 0
    got = fused(inputs)
    inputs.retriever_scores = None
    expected = plain(inputs) + 0.7 * torch.tensor([RETRIEVER[0], RETRIEVER[1] + [0.0]])
    expected[1, 3] = 0.0  # the padded candidate slot scores 0
    assert torch.allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("scoring", ["head", "answer_token"])
def test_save_load_keeps_the_gate(tmp_path, tiny_lm_dir, scoring):
    _, fused = _pair(scoring, lm_path=tiny_lm_dir)
    with torch.no_grad():
        fused.fusion_gate.fill_(-1.25)
        expected = fused.score(REQUESTS)
    fused.save_pretrained(tmp_path / "ckpt")
    assert float(load_file(str(tmp_path / "ckpt" / "ranker_head.safetensors"))["fusion_gate"]) == -1.25
    loaded = MixLLMRanker.from_pretrained(tmp_path / "ckpt")
    assert loaded.fusion_gate.item() == -1.25 and loaded.ranker_config()["fusion"] is True
    with torch.no_grad():
        got = loaded.score(REQUESTS)
    for g, e in zip(got, expected):
        assert torch.allclose(g, e, atol=1e-6)


def test_retriever_scores_errors_name_the_problem():
    plain, fused = _pair()
    # Refused, not ignored: a caller that passes them expects them to count.
    with pytest.raises(DataError, match=r"retriever_scores: this ranker has no score fusion \(built with fusion=False\)"):
        plain.score(REQUESTS)
    with pytest.raises(DataError, match="retriever_scores: this ranker fuses .* but none were given"):
        fused.score(_alone(REQUESTS))
    with pytest.raises(DataError, match="request 1: 2 retriever_scores for 3 candidates; give one per candidate"):
        fused.score([REQUESTS[0], RankingRequest([1], CANDIDATES[1], [1.0, 2.0])])
    with pytest.raises(DataError, match="request 1: no retriever_scores while other requests of the batch have them"):
        fused.score([REQUESTS[0], RankingRequest([1], CANDIDATES[1])])
    with pytest.raises(DataError, match="request 0: retriever_scores hold a non-finite value"):
        fused.score([RankingRequest([1], [2, 3], [1.0, float("nan")])])
    inputs = fused.prepare(REQUESTS)
    inputs.retriever_scores = torch.zeros(2, 3)
    with pytest.raises(DataError, match=r"retriever_scores: shape \(2, 3\) but the batch has candidates of shape \(2, 4\)"):
        fused(inputs)
