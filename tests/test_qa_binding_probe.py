"""The binding probe's data and oracle tokens (the probe's training runs the tested stage-2 code)."""

from __future__ import annotations

import json

import torch

from mixllm.data.scenes import generate_split, write_scenes
from training.qa_binding_probe import binding_records, word_tokens


def test_binding_records_are_the_colour_and_shape_questions_of_multi_shape_scenes(tmp_path):
    write_scenes(tmp_path, counts={"train": 40}, seed=5, progress=False)
    records = json.loads((tmp_path / "train_qa.json").read_text())
    scenes = generate_split("train", 40, seed=5)
    probe = binding_records(tmp_path / "train_qa.json")
    expected = sum(1 for r, s in zip(records, scenes) if len(s.shapes) > 1
                   for t in r["question_types"] if t in ("colour", "shape"))  # fmt: skip
    assert probe and len(probe) == expected
    for record in probe:
        scene = scenes[int(record["id"].split("-")[1]) - 1]
        (qtype,) = record["question_types"]
        question, answer = (turn["value"] for turn in record["conversations"])
        assert len(scene.shapes) > 1 and question.startswith("<image>\n") and question.count("<image>") == 1
        word = question.rstrip("?").split()[-1 if qtype == "colour" else -2]  # "the star?" / "the red object?"
        (shape,) = [s for s in scene.shapes if (s.shape if qtype == "colour" else s.colour) == word]
        assert answer == (shape.colour if qtype == "colour" else shape.shape)


def test_word_tokens_sit_on_each_shapes_cell_and_nowhere_else():
    from transformers import AutoTokenizer

    from mixllm.assets import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m-instruct"))
    embedding = torch.randn(len(tokenizer), 6, generator=torch.Generator().manual_seed(0))
    scene = next(s for s in generate_split("train", 20, seed=1) if len(s.shapes) > 2)
    tokens = word_tokens(scene, embedding, tokenizer, scale=3.0)
    assert tokens.shape == (49, 6)
    cells = {s.cell[0] * 7 + s.cell[1]: s for s in scene.shapes}
    for cell in range(49):
        if cell not in cells:
            assert not tokens[cell].any()
            continue
        s = cells[cell]
        ids = [tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in (s.colour, s.shape)]
        torch.testing.assert_close(tokens[cell], 3.0 * (embedding[ids[0]] + embedding[ids[1]]))
