"""Training lists for the rankers: sliding windows, negatives redrawn from a pool every epoch, hard
negatives from a retriever -- and nothing at or after a target's position in its own history."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixllm.data import PAD, leave_one_out, make_synthetic_dataset
from training.ranker_recipe import RankerRecipe
from training.ranking_lists import ListCollator, build_training_lists
from training.recipe import RecipeError, read_raw_recipe

SPLIT = leave_one_out(make_synthetic_dataset(seed=0))


def _recipe(**overrides) -> RankerRecipe:
    return RankerRecipe.from_yaml("teacher_tiny.yaml", **{"limit_train_users": None, **overrides})


def _check_no_leak(lists, split=SPLIT):
    """Every list's history is exactly the items right before its target in the training sequence."""
    for row in range(len(lists)):
        seq = split.train_sequence(lists.users[row]).tolist()
        target = int(lists.candidates[row, lists.target_index[row]])
        t = seq.index(target)  # synthetic users never repeat an item
        history = [int(i) for i in lists.histories[row] if i != PAD]
        assert history == seq[max(0, t - lists.histories.shape[1]) : t], row


class _PopularRetriever:
    """A stand-in for FAISS over SASRec: the most popular allowed items, recording what it was asked."""

    max_history = 6

    def __init__(self, split):
        self.order = np.argsort(-split.train_item_counts(), kind="stable")
        self.seen: list[np.ndarray] = []

    def top_k(self, history, allowed, k):
        self.seen.append(history.numpy())
        return np.stack([[i for i in self.order if ok[i]][:k] for ok in allowed])


def test_sliding_windows_take_every_position_and_never_leak():
    lists = build_training_lists(SPLIT, _recipe(targets_per_user=None))
    expected = sum(len(SPLIT.train_sequence(u)) - 1 for u in range(SPLIT.num_users))
    assert len(lists) == expected
    _check_no_leak(lists)
    sampled = build_training_lists(SPLIT, _recipe(targets_per_user=2))
    assert len(sampled) < len(lists) and sampled.key != lists.key
    _check_no_leak(sampled)


def test_wider_histories_for_user_tokens_still_end_before_the_target():
    lists = build_training_lists(SPLIT, _recipe(targets_per_user=3), history_width=9)
    assert lists.histories.shape[1] == 9
    _check_no_leak(lists)


def test_pool_draws_change_with_the_epoch_and_are_reproducible():
    recipe = _recipe(negative_pool=12, num_negatives=4)
    lists = build_training_lists(SPLIT, recipe)
    assert lists.candidates.shape[1] == 13
    rows = np.arange(len(lists))
    first = lists.draw(rows, 0, 4, 0.0, recipe.seed)
    assert np.array_equal(first, lists.draw(rows, 0, 4, 0.0, recipe.seed))  # a resumed run draws the same
    second = lists.draw(rows, 1, 4, 0.0, recipe.seed)
    assert (np.sort(first, 1) != np.sort(second, 1)).any(axis=1).mean() > 0.5  # most lists see new negatives
    for columns, row in zip(first, rows):
        assert len(set(columns.tolist())) == 5 and (columns == lists.target_index[row]).sum() == 1
    fixed = build_training_lists(SPLIT, _recipe(num_negatives=4))  # no pool: the stored list every epoch
    assert np.array_equal(fixed.draw(rows[:5], 3, 4, 0.0, 0), np.tile(np.arange(5), (5, 1)))


def test_collator_gives_each_drawn_candidate_its_own_teacher_score():
    """Teacher scores are stored per pool column; a draw must carry the scores of exactly the drawn items."""
    recipe = _recipe(negative_pool=10, num_negatives=4)
    lists = build_training_lists(SPLIT, recipe)
    scores = torch.from_numpy(lists.candidates).float() * 0.5  # a score that names its item

    class _Echo:
        fusion_gate = None

        def prepare(self, requests):
            return requests

    collate = ListCollator(_Echo(), lists, scores, recipe)
    for epoch in (0, 1):
        collate.epoch = epoch
        batch = collate(list(range(0, len(lists), 7)))
        for request, row_scores, target, row in zip(batch["inputs"], batch["teacher_scores"], batch["target_index"],
                                                    range(0, len(lists), 7)):  # fmt: skip
            assert len(request.candidates) == 5
            assert row_scores.tolist() == [c * 0.5 for c in request.candidates]
            assert request.candidates[int(target)] == lists.candidates[row, lists.target_index[row]]


def test_hard_negatives_come_from_the_retriever_never_the_target_nor_seen_items():
    retriever = _PopularRetriever(SPLIT)
    recipe = _recipe(targets_per_user=3, negative_pool=8, num_negatives=4, hard_negatives=0.5, hard_pool=10)
    lists = build_training_lists(SPLIT, recipe, retriever=retriever, retriever_id="popular")
    assert lists.hard is not None and (lists.hard.sum(1) == 4).all()  # round(0.5 * 8) hard per pool
    # the retriever read only what came before each target, at its own history length
    seen = np.concatenate(retriever.seen)
    assert seen.shape == (len(lists), 6)
    for row in range(len(lists)):
        seq = SPLIT.train_sequence(lists.users[row]).tolist()
        target = int(lists.candidates[row, lists.target_index[row]])
        assert [int(i) for i in seen[row] if i != PAD] == seq[max(0, seq.index(target) - 6) : seq.index(target)]
        interacted = set(SPLIT.interacted_items(lists.users[row]).tolist())
        hard = lists.candidates[row, lists.hard[row]]
        assert target not in hard and not set(hard.tolist()) & interacted
        allowed = np.array([i not in interacted for i in range(SPLIT.num_items)])
        top = set(retriever.top_k(torch.zeros(1, 1), allowed[None], 10)[0].tolist())
        assert set(hard.tolist()) <= top
        negatives = set(np.delete(lists.candidates[row], lists.target_index[row]).tolist())
        assert len(negatives) == 8 and not negatives & interacted
    drawn = lists.draw(np.arange(len(lists)), 0, 4, 0.5, recipe.seed)
    assert all(lists.hard[row, columns].sum() == 2 for row, columns in enumerate(drawn))  # round(0.5 * 4) per list
    with pytest.raises(RecipeError, match="^hard_negatives: needs a retriever"):
        build_training_lists(SPLIT, recipe)
    with pytest.raises(RecipeError, match="^hard_pool:"):
        build_training_lists(SPLIT, recipe.replace(hard_pool=3), retriever=retriever)


def test_recipes_extend_their_base_and_name_only_what_changes(tmp_path):
    student, labels = read_raw_recipe("student.yaml"), read_raw_recipe("student_labels.yaml")
    assert labels["alpha"] == 0.0 and labels["lora"] == student["lora"] and labels["item"] == student["item"]
    assert {k for k in student if student[k] != labels.get(k)} == {"alpha", "teacher_scores", "teacher_checkpoint", "output_dir"}
    (tmp_path / "a.yaml").write_text("extends: b.yaml\nlr: 0.1\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(RecipeError, match="^extends: .*extends itself"):
        read_raw_recipe(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: student.yaml\nitem: {id_dim: 8}\n")
    merged = read_raw_recipe(tmp_path / "c.yaml")  # sections merge key by key
    assert merged["item"] == {**student["item"], "id_dim": 8}
    (tmp_path / "d.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(RecipeError, match="^config: nowhere.yaml not found"):
        read_raw_recipe(tmp_path / "d.yaml")
