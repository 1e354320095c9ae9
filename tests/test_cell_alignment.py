"""Stage-1 alignment by cells: targets in the LLM's word space, the objective, and a tiny run."""

from __future__ import annotations

import math

import pytest
import torch

from mixllm.data.scenes import COLOURS, SHAPES, generate_split, parse_scene_id
from training.cell_alignment import (
    EMPTY, CellWordObjective, cell_labels, cell_targets, conversation_labels, pair_vectors, side_words,
)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from mixllm.assets import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m-instruct"))


def _word(embedding, tokenizer, word):
    return embedding[tokenizer(" " + word, add_special_tokens=False)["input_ids"][0]]


def test_targets_are_colour_plus_kind_words_on_shape_cells_and_zero_elsewhere(tokenizer):
    embedding = torch.randn(len(tokenizer), 6, generator=torch.Generator().manual_seed(0))
    pairs = pair_vectors(embedding, tokenizer)
    assert pairs.shape == (len(COLOURS) * len(SHAPES), 6)
    scene = next(s for s in generate_split("train", 30, seed=1) if len(s.shapes) > 2)
    labels = cell_labels(scene)
    targets = cell_targets(labels, pairs)
    cells = {s.cell[0] * 7 + s.cell[1]: s for s in scene.shapes}
    assert (labels != EMPTY).sum() == len(scene.shapes)
    for cell in range(49):
        if cell not in cells:
            assert labels[cell] == EMPTY and not targets[cell].any()
            continue
        shape = cells[cell]
        expected = _word(embedding, tokenizer, shape.colour) + _word(embedding, tokenizer, shape.shape)
        torch.testing.assert_close(targets[cell], expected)


def test_scene_ids_find_their_scenes():
    from mixllm.data.llava import Conversation

    assert parse_scene_id("val-000042") == ("val", 41) and parse_scene_id("train-1234567") == ("train", 1234566)
    for bad in ("valid-000001", "train-", "train-0", "train-x1", "42"):
        with pytest.raises(ValueError, match="not a built-in scene id"):
            parse_scene_id(bad)
    convs = [Conversation(id=i, image=None, turns=[]) for i in ("val-000003", "train-000002", "val-000001")]
    labels = conversation_labels(convs, seed=4)
    val, train = generate_split("val", 3, seed=4), generate_split("train", 2, seed=4)
    for row, scene in zip(labels, (val[2], train[1], val[0])):
        assert torch.equal(row, cell_labels(scene))


class _Tokens:
    """A stand-in model whose image tokens are given (its position table left out)."""

    def __init__(self, tokens):
        self.tokens = tokens

    def get_image_features(self, vision_features=None, add_positions=True):
        assert not add_positions  # stage 1 aligns the content only
        return self.tokens


def test_objective_is_zero_on_the_targets_and_counts_shape_and_empty_cells_alike():
    pairs = torch.randn(len(COLOURS) * len(SHAPES), 8, generator=torch.Generator().manual_seed(1))
    labels = torch.full((2, 49), EMPTY)
    labels[0, 3], labels[0, 20], labels[1, 48] = 0, 7, 39
    batch = {"vision_features": torch.zeros(2, 49, 4), "cell_labels": labels}
    targets = cell_targets(labels, pairs)
    exact = CellWordObjective(pairs)(_Tokens(targets.clone()), batch)
    assert exact["loss"] == 0 and exact["cell_accuracy"] == 1
    off = targets.clone()
    off[0, 3] = pairs[1]  # one shape cell reads as another colour-and-kind pair
    off[1, 0] += 1.0  # one empty cell is not empty
    result = CellWordObjective(pairs)(_Tokens(off), batch)
    shape_term = (pairs[1] - pairs[0]).pow(2).sum() / 3  # mean over the 3 shape cells
    empty_term = torch.tensor(8.0) / (2 * 49 - 3)  # mean over the 95 empty cells
    torch.testing.assert_close(result["loss"], shape_term + empty_term)
    assert math.isclose(result["cell_accuracy"].item(), 2 / 3, rel_tol=1e-6)


def test_position_words_name_the_side_graded_from_the_centre(tokenizer):
    from training.cell_alignment import position_words

    embedding = torch.randn(len(tokenizer), 6, generator=torch.Generator().manual_seed(2))
    words = {w: _word(embedding, tokenizer, w) for w in ("left", "right", "top", "bottom")}
    table = position_words(embedding, tokenizer, grid=7, scale=0.5)
    assert table.shape == (49, 6)
    assert not table[3 * 7 + 3].any()  # the centre cell names no side
    torch.testing.assert_close(table[3 * 7 + 0], 0.5 * words["left"])  # middle row, left edge
    torch.testing.assert_close(table[0 * 7 + 6], 0.5 * (words["right"] + words["top"]))  # top right corner
    torch.testing.assert_close(table[6 * 7 + 2], 0.5 * (words["left"] / 3 + words["bottom"]))  # a third of the way left


def test_side_words_name_the_sides_the_position_questions_use(tokenizer):
    from mixllm.data.scenes import questions

    embedding = torch.randn(len(tokenizer), 6, generator=torch.Generator().manual_seed(3))
    words = {w: _word(embedding, tokenizer, w) for w in ("left", "right", "top", "bottom")}
    table = side_words(embedding, tokenizer, grid=7)
    assert table.shape == (49, 6)
    assert not table[3 * 7 + 3].any()  # the centre cell is on no side
    torch.testing.assert_close(table[3 * 7 + 2], words["left"])  # middle row, next to the middle column: left, full size
    torch.testing.assert_close(table[0 * 7 + 4], words["right"] + words["top"])
    torch.testing.assert_close(table[6 * 7 + 3], words["bottom"])
    # every position question's answer is among its shape cell's side words
    import random

    rng = random.Random(0)
    asked = 0
    for scene in generate_split("train", 60, seed=2):
        for qa in questions(scene, rng):
            if qa.type != "position":
                continue
            shape = next(s for s in scene.shapes if f"the {s.colour} {s.shape} " in qa.question)
            row, col = shape.cell
            across = qa.answer in ("left", "right")
            rest = table[row * 7 + col] - words[qa.answer]  # what is left is the other axis's word, or nothing
            other_axis = [torch.zeros(6)] + [words[w] for w in (("top", "bottom") if across else ("left", "right"))]
            assert any(torch.allclose(rest, w, atol=1e-6) for w in other_axis), (qa, shape.cell)
            asked += 1
    assert asked > 30


def test_objective_with_side_words_targets_them_on_shape_cells_only():
    generator = torch.Generator().manual_seed(4)
    pairs = torch.randn(len(COLOURS) * len(SHAPES), 8, generator=generator)
    sides = torch.randn(3, 8, generator=generator)[torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])]  # 3 distinct rows, 9 cells
    labels = torch.full((2, 9), EMPTY)
    labels[0, 0], labels[0, 4], labels[1, 8] = 5, 9, 2
    batch = {"vision_features": torch.zeros(2, 9, 4), "cell_labels": labels}
    targets = cell_targets(labels, pairs, sides)
    assert not targets[labels == EMPTY].any()  # empty cells stay empty
    torch.testing.assert_close(targets[0, 4], pairs[9] + sides[4])
    exact = CellWordObjective(pairs, sides)(_Tokens(targets.clone()), batch)
    assert exact["loss"] == 0 and exact["cell_accuracy"] == 1 and exact["side_accuracy"] == 1
    off = targets.clone()
    off[0, 4] = pairs[9] + sides[0]  # right content, the side of another cell
    result = CellWordObjective(pairs, sides)(_Tokens(off), batch)
    assert math.isclose(result["side_accuracy"].item(), 2 / 3, rel_tol=1e-6)
    assert result["loss"] > 0
    without = CellWordObjective(pairs)(_Tokens(targets.clone()), batch)
    assert "side_accuracy" not in without and without["loss"] > 0  # side words are not part of plain targets
