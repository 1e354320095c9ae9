"""Protocols: candidate sampling (valid, seeded, uniform), the on-disk cache, and the evaluator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixllm.data import (
    FULL_RANKING,
    PROTOCOLS,
    SAMPLED_20,
    SAMPLED_100,
    EvalProtocol,
    Ranker,
    evaluate,
    evaluate_protocols,
    get_candidates,
    leave_one_out,
    make_synthetic_dataset,
    sample_candidates,
)
from mixllm.data import protocols as protocols_module
from mixllm.data.protocols import _draw_unseen
from mixllm.errors import DataError


@pytest.fixture(scope="module")
def split():
    # 150 items so that 99 negatives always fit next to a user's <= 30 interactions.
    return leave_one_out(make_synthetic_dataset(num_users=25, num_items=150, min_length=5, max_length=30, seed=4))


@pytest.mark.parametrize("protocol", [SAMPLED_20, SAMPLED_100])
@pytest.mark.parametrize("which", ["valid", "test"])
def test_candidates_hold_target_once_and_no_interacted_item(split, protocol, which):
    lists = sample_candidates(split, protocol, which, seed=0)
    assert lists.candidates.shape == (split.num_users, protocol.num_candidates)
    targets = split.targets(which)
    for user in range(split.num_users):
        row = lists.candidates[user]
        assert len(set(row.tolist())) == len(row)  # no repeats
        assert row[lists.target_index[user]] == targets[user]
        others = np.delete(row, lists.target_index[user])
        assert not set(others.tolist()) & set(split.interacted_items(user).tolist())
        assert ((0 <= row) & (row < split.num_items)).all()


def test_sampling_is_seeded_and_split_specific(split):
    a = sample_candidates(split, SAMPLED_20, "valid", seed=0)
    b = sample_candidates(split, SAMPLED_20, "valid", seed=0)
    np.testing.assert_array_equal(a.candidates, b.candidates)
    np.testing.assert_array_equal(a.target_index, b.target_index)
    assert a.digest() == b.digest()
    assert a.digest() != sample_candidates(split, SAMPLED_20, "valid", seed=1).digest()
    assert a.digest() != sample_candidates(split, SAMPLED_20, "test", seed=0).digest()


def test_target_position_is_shuffled(split):
    positions = sample_candidates(split, SAMPLED_20, "test", seed=0).target_index
    assert len(set(positions.tolist())) > 5  # not always the same column


def test_negatives_are_uniform_over_unseen_items():
    rng = np.random.default_rng(0)
    seen = np.array([0, 3, 4, 9])
    counts = np.zeros(12)
    for _ in range(4000):
        counts[_draw_unseen(rng, 12, seen, 4)] += 1
    assert counts[seen].sum() == 0
    unseen = np.setdiff1d(np.arange(12), seen)
    expected = 4000 * 4 / len(unseen)  # 2000 draws of each unseen item
    assert np.abs(counts[unseen] - expected).max() < 0.06 * expected


def test_too_few_unseen_items_is_a_data_error():
    tiny = leave_one_out(make_synthetic_dataset(num_users=3, num_items=15, min_length=10, max_length=10))
    with pytest.raises(DataError, match="fewer than the 19 negatives"):
        sample_candidates(tiny, SAMPLED_20, "valid", seed=0)


def test_cache_written_once_and_reused(split, tmp_path, monkeypatch):
    first = get_candidates(split, SAMPLED_20, "valid", 3, tmp_path)
    files = list((tmp_path / "synthetic").glob("sampled-20_seed3_valid_*.npz"))
    assert len(files) == 1

    def fail(*args, **kwargs):
        raise AssertionError("sampled again instead of reading the cache")

    monkeypatch.setattr(protocols_module, "sample_candidates", fail)
    again = get_candidates(split, SAMPLED_20, "valid", 3, tmp_path)
    assert again.digest() == first.digest()


def test_changed_data_or_protocol_gets_new_lists(split, tmp_path):
    get_candidates(split, SAMPLED_20, "valid", 0, tmp_path)
    other = leave_one_out(make_synthetic_dataset(num_users=25, num_items=150, min_length=5, max_length=30, seed=5))
    get_candidates(other, SAMPLED_20, "valid", 0, tmp_path)
    wider = EvalProtocol("sampled-20", num_negatives=29, metrics=("hr@1",))  # same name, different config
    get_candidates(split, wider, "valid", 0, tmp_path)
    assert len(list((tmp_path / "synthetic").glob("sampled-20_seed0_valid_*.npz"))) == 3


def test_protocol_config_is_validated():
    assert set(PROTOCOLS) == {"sampled-20", "sampled-100", "full"}
    assert (SAMPLED_20.num_candidates, SAMPLED_100.num_candidates, FULL_RANKING.num_candidates) == (20, 100, None)
    with pytest.raises(ValueError, match="unknown metric"):
        EvalProtocol("x", 5, ("precision@3",))
    with pytest.raises(ValueError, match="num_negatives"):
        EvalProtocol("x", 0, ("hr@1",))


# --- evaluator ---------------------------------------------------------------------------------------
class Oracle(Ranker):
    """Knows the targets: an upper bound that checks the plumbing (targets, masks, columns)."""

    name = "oracle"
    supports_full_ranking = True

    def __init__(self, split, which, boost_history=False):
        self.split, self.which, self.boost_history = split, which, boost_history

    def score_all(self, batch):
        scores = torch.zeros(len(batch.users), self.split.num_items)
        targets = torch.from_numpy(self.split.targets(self.which))[batch.users]
        scores[torch.arange(len(batch.users)), targets] = 1.0
        if self.boost_history:  # interacted items above the target: full ranking must mask them out
            for row, user in enumerate(batch.users.tolist()):
                scores[row, torch.tensor(self.split.interacted_items(user))] += 5.0
                scores[row, targets[row]] = 1.0
        return scores


class Constant(Ranker):
    name = "constant"
    max_history = 0
    supports_full_ranking = True

    def score_all(self, batch):
        return torch.zeros(len(batch.users), 150)


class CandidatesOnly(Ranker):
    name = "candidates-only"

    def score(self, batch):
        assert batch.history.shape[1] == self.max_history
        return -batch.candidates.float()


@pytest.mark.parametrize("which", ["valid", "test"])
def test_oracle_scores_perfectly_even_when_it_ranks_history_first(split, tmp_path, which):
    for boost in (False, True):
        results = evaluate_protocols(Oracle(split, which, boost), split, seed=0, splits=[which], cache_dir=tmp_path)
        for protocol, metrics in results[which].items():
            assert all(v == pytest.approx(1.0) for v in metrics.values()), (boost, protocol, metrics)


def test_constant_ranker_gets_chance_level(split, tmp_path):
    results = evaluate_protocols(Constant(), split, seed=0, cache_dir=tmp_path)
    assert results["test"]["sampled-20"]["hr@1"] == pytest.approx(1 / 20)
    assert results["test"]["sampled-100"]["hr@10"] == pytest.approx(10 / 100)
    # Full ranking: the target competes with the items the user never interacted with.
    unseen = np.array([split.num_items - len(split.interacted_items(u)) + 1 for u in range(split.num_users)])
    assert results["valid"]["full"]["recall@10"] == pytest.approx(np.mean(10 / unseen))


def test_candidate_only_rankers_skip_full_ranking(split, tmp_path):
    results = evaluate_protocols(CandidatesOnly(), split, seed=0, cache_dir=tmp_path)
    assert set(results["valid"]) == {"sampled-20", "sampled-100"}
    with pytest.raises(ValueError, match="does not support full ranking"):
        evaluate(CandidatesOnly(), split, FULL_RANKING, "valid")


def test_wrong_score_shape_is_reported(split, tmp_path):
    class Broken(Ranker):
        name = "broken"

        def score(self, batch):
            return torch.zeros(len(batch.users), 3)

    lists = get_candidates(split, SAMPLED_20, "valid", 0, tmp_path)
    with pytest.raises(ValueError, match=r"broken returned scores of shape \(25, 3\), expected \(25, 20\)"):
        evaluate(Broken(), split, SAMPLED_20, "valid", lists)
    with pytest.raises(ValueError, match="needs its candidate lists"):
        evaluate(Broken(), split, SAMPLED_20, "test", lists)
