"""Stage-1 alignment by cells: each image token learns to read as the words that name what its cell holds.

LLaVA's stage 1 aligns the projector through a caption loss, which rewards tokens that let the frozen LLM
describe the image as a whole; nothing asks the token of one cell to say what is in that cell, and the
trained MLP's tokens come out ~40x a word's norm. On the built-in scenes the generator knows every shape's
cell, so stage 1 can instead regress each cell's token onto a target in the LLM's own word-embedding space
(``CaptionRecipe.align: cell_words``):

- a cell holding a shape -> E(" colour") + E(" kind") (the first sub-token of each word);
- every other cell -> zeros (an empty token).

With ``model.image.position_input`` (the projector sees each token's row and column), a shape's cell also
gets the words for the sides it is on (:func:`side_words`): E(" left") or E(" right") unless it is in the
middle column, E(" top") or E(" bottom") unless in the middle row, as the position questions define them.

In the binding probe (:mod:`training.qa_binding_probe`) exactly these tokens, given as an oracle, let
stage 2 learn to bind a question to one shape within 80 steps, where stage-1 caption tokens did not start.
The loss is the mean squared distance over shape cells plus the same over empty cells (a scene has ~2.5
shape cells of 49, which would otherwise barely count). No LLM forward runs: a stage-1 epoch costs only
the projector. Validation also reports ``val/cell_accuracy``: the share of shape cells whose token is
nearest (Euclidean) to its own colour-and-kind target among all colour-and-kind pairs.
"""

from __future__ import annotations

import torch

from mixllm.data.llava import Conversation
from mixllm.data.scenes import COLOURS, GRID, SHAPES, Scene, generate_split, parse_scene_id

EMPTY = -1
"""A cell's label when it holds no shape."""


def word_vector(embedding: torch.Tensor, tokenizer, word: str) -> torch.Tensor:
    """The input embedding of ``" " + word``'s first sub-token (how the word starts mid-sentence)."""
    return embedding[tokenizer(" " + word, add_special_tokens=False)["input_ids"][0]]


def pair_vectors(embedding: torch.Tensor, tokenizer) -> torch.Tensor:
    """(len(COLOURS) * len(SHAPES), hidden): row ``c * len(SHAPES) + k`` is E(colour c) + E(kind k)."""
    colours = torch.stack([word_vector(embedding, tokenizer, c) for c in COLOURS])
    kinds = torch.stack([word_vector(embedding, tokenizer, k) for k in SHAPES])
    return (colours[:, None] + kinds[None]).reshape(-1, embedding.shape[1]).float()


POSITION_SCALE = 0.5
"""Position words enter at half a word's size beside a shape's two words."""
SIDE_SCALE = 1.0
"""Side words enter at a word's size, as the colour and the kind do."""


def _sides_table(embedding: torch.Tensor, tokenizer, grid: int, weight) -> torch.Tensor:
    """(grid*grid, hidden): for the cell in row r, column c, weight(c - centre) x E(" left" or " right") +
    weight(r - centre) x E(" top" or " bottom"), the word of the side of the centre the cell is on."""
    words = {w: word_vector(embedding, tokenizer, w).float() for w in ("left", "right", "top", "bottom")}
    centre = (grid - 1) / 2
    rows = []
    for r in range(grid):
        for c in range(grid):
            across, down = c - centre, r - centre
            rows.append(weight(across, centre) * words["right" if across > 0 else "left"]
                        + weight(down, centre) * words["bottom" if down > 0 else "top"])  # fmt: skip
    return torch.stack(rows)


def position_words(embedding: torch.Tensor, tokenizer, grid: int = GRID, scale: float = POSITION_SCALE) -> torch.Tensor:
    """(grid*grid, hidden) starting rows of the projector's position table: for the cell in row r, column c,
    ``scale`` x (h E(" left" or " right") + v E(" top" or " bottom")), where h = |c - centre| / centre and
    v likewise: the words the position questions answer with, graded from 0 at the middle to 1 at the edge."""
    return _sides_table(embedding, tokenizer, grid, lambda offset, centre: abs(offset) / centre if offset else 0.0) * scale


def side_words(embedding: torch.Tensor, tokenizer, grid: int = GRID, scale: float = SIDE_SCALE) -> torch.Tensor:
    """(grid*grid, hidden): for the cell in row r, column c, ``scale`` x (E(" left") if c is left of the middle
    column, E(" right") if right of it, nothing in it; likewise E(" top") / E(" bottom") by row): the sides
    a shape centred there is on, as :func:`mixllm.data.scenes.questions` defines the position questions' sides."""
    return _sides_table(embedding, tokenizer, grid, lambda offset, centre: float(offset != 0)) * scale


def cell_labels(scene: Scene, grid: int = GRID) -> torch.Tensor:
    """(grid*grid,) long: each shape's cell holds its colour-and-kind pair index, every other cell EMPTY."""
    labels = torch.full((grid * grid,), EMPTY, dtype=torch.long)
    colours = list(COLOURS)
    for shape in scene.shapes:
        row, col = shape.cell
        labels[row * grid + col] = colours.index(shape.colour) * len(SHAPES) + SHAPES.index(shape.shape)
    return labels


def cell_targets(labels: torch.Tensor, pairs: torch.Tensor, sides: torch.Tensor | None = None) -> torch.Tensor:
    """(..., cells) labels -> (..., cells, hidden) targets: the pair's vector (+ the cell's row of ``sides``,
    (cells, hidden), when given), zeros on EMPTY cells."""
    occupied = labels != EMPTY
    targets = pairs[labels.clamp(min=0)]
    if sides is not None:
        targets = targets + sides
    return targets * occupied[..., None]


def conversation_labels(conversations: list[Conversation], seed: int, grid: int = GRID) -> torch.Tensor:
    """(len(conversations), grid*grid) cell labels of built-in scene records, found by their ids."""
    where = [parse_scene_id(c.id) for c in conversations]
    scenes = {split: generate_split(split, 1 + max(i for s, i in where if s == split), seed=seed) for split in {s for s, _ in where}}
    return torch.stack([cell_labels(scenes[split][i], grid) for split, i in where])


class CellCollator:
    """Rows -> ``{"vision_features": (B, tower_tokens, D) float32, "cell_labels": (B, cells)}``."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor):
        if features.shape[0] != labels.shape[0]:
            raise ValueError(f"{features.shape[0]} feature rows but {labels.shape[0]} label rows")
        self.features, self.labels = features, labels

    def __call__(self, rows: list[int]) -> dict[str, torch.Tensor]:
        index = torch.tensor(rows)
        return {"vision_features": self.features[index].float(), "cell_labels": self.labels[index]}


class CellWordObjective:
    """``(model, batch) -> {"loss", "cell_accuracy"}`` for :class:`training.caption.CaptionModule`. The
    projector's position table (``model.image.position_embedding``) is left out, so stage 1 does not move it.
    ``sides`` ((cells, hidden), :func:`side_words`): added to each shape cell's target; the colour-and-kind
    accuracy is then read from the token less its cell's side words, and ``side_accuracy`` is the share of
    shape cells whose token less its pair is nearest its own side words among all the table's distinct rows."""

    def __init__(self, pairs: torch.Tensor, sides: torch.Tensor | None = None):
        self.pairs = pairs  # (P, hidden) float32
        self.sides = sides  # (cells, hidden) float32 or None

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # the content, without the position table (it keeps its start)
        tokens = model.get_image_features(vision_features=batch["vision_features"], add_positions=False).float()
        labels = batch["cell_labels"]
        if tokens.shape[1] != labels.shape[1]:
            raise ValueError(f"the projector gives {tokens.shape[1]} tokens an image but the scenes have {labels.shape[1]} cells")
        pairs = self.pairs.to(tokens.device)
        sides = None if self.sides is None else self.sides.to(tokens.device)
        if sides is not None and sides.shape[0] != labels.shape[1]:
            raise ValueError(f"the side words cover {sides.shape[0]} cells but the scenes have {labels.shape[1]}")
        distance = (tokens - cell_targets(labels, pairs, sides)).pow(2).sum(-1)  # (B, cells)
        occupied = labels != EMPTY
        loss = distance[occupied].mean() + distance[~occupied].mean()
        metrics = {"loss": loss}
        with torch.no_grad():
            content = tokens if sides is None else tokens - sides  # each token less its cell's side words
            nearest = torch.cdist(content[occupied], pairs).argmin(-1)
            metrics["cell_accuracy"] = (nearest == labels[occupied]).float().mean()
            if sides is not None:
                distinct, side_label = torch.unique(sides, dim=0, return_inverse=True)
                where = (tokens - pairs[labels.clamp(min=0)])[occupied]  # each token less its pair
                cell_side = side_label.expand_as(labels)[occupied]
                metrics["side_accuracy"] = (torch.cdist(where, distinct).argmin(-1) == cell_side).float().mean()
        return metrics
