"""Synthetic scenes: layout rules, answers that follow from the scene, balance, rendering, determinism, splits."""

from __future__ import annotations

import itertools
import json
import math
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from mixllm.data import scenes
from mixllm.data.scenes import (
    BACKGROUNDS,
    CELL,
    COLOURS,
    GRADIENT_AMPLITUDE,
    GRID,
    IMAGE_SIZE,
    MIN_GAP,
    QUESTION_TYPES,
    SHAPES,
    Scene,
    Shape,
    caption,
    generate_scene,
    generate_split,
    questions,
    render_scene,
    scene_records,
    split_of,
    write_scenes,
)

N_SCENES = 2000


@pytest.fixture(scope="module")
def drawn():
    """2,000 scenes and their questions from one fixed seed."""
    rng = random.Random(0)
    out = []
    for _ in range(N_SCENES):
        scene = generate_scene(rng)
        out.append((scene, questions(scene, rng)))
    return out


def test_colours_are_far_apart():
    assert len(COLOURS) == 8
    for a, b in itertools.combinations(COLOURS.values(), 2):
        assert math.dist(a, b) >= 80, (a, b)
    for shape_rgb in COLOURS.values():
        for background in BACKGROUNDS.values():
            for offset in (-GRADIENT_AMPLITUDE, 0, GRADIENT_AMPLITUDE):  # both ends of a gradient
                assert math.dist(shape_rgb, [c + offset for c in background]) >= 75, (shape_rgb, background)


def test_layout_rules_hold_on_many_scenes(drawn):
    for scene, _ in drawn:
        assert 1 <= len(scene.shapes) <= 4
        cells = [s.cell for s in scene.shapes]
        assert len(set(cells)) == len(cells), "two centres share a grid cell"
        for s in scene.shapes:
            assert s.shape in SHAPES and s.colour in COLOURS
            assert 12 <= s.radius <= 30
            assert s.radius <= s.cx <= IMAGE_SIZE - 1 - s.radius and s.radius <= s.cy <= IMAGE_SIZE - 1 - s.radius
            assert 0 <= s.cell[0] < GRID and 0 <= s.cell[1] < GRID
        for a, b in itertools.combinations(scene.shapes, 2):
            assert math.dist((a.cx, a.cy), (b.cx, b.cy)) >= a.radius + b.radius + MIN_GAP


def test_every_answer_follows_from_the_scene(drawn):
    for scene, qas in drawn:
        shapes = scene.shapes
        types = [qa.type for qa in qas]
        assert len(set(types)) == len(types) and set(types) <= set(QUESTION_TYPES)
        for qa in qas:
            if qa.type == "colour":
                kind = qa.question.removeprefix("What colour is the ").removesuffix("?")
                matching = [s for s in shapes if s.shape == kind]
                assert len(matching) == 1 and qa.answer == matching[0].colour
            elif qa.type == "shape":
                colour = qa.question.removeprefix("What shape is the ").removesuffix(" object?")
                matching = [s for s in shapes if s.colour == colour]
                assert len(matching) == 1 and qa.answer == matching[0].shape
            elif qa.type == "count":
                assert qa.answer == str(len(shapes))
            elif qa.type == "position":
                subject = qa.question.removeprefix("Is the ").split(" on the ")[0].split(" at the ")[0]
                colour, kind = subject.split(" ")
                matching = [s for s in shapes if (s.colour, s.shape) == (colour, kind)]
                assert len(matching) == 1
                row, col = matching[0].cell
                side = {"left": col < 3, "right": col > 3, "top": row < 3, "bottom": row > 3}
                assert side[qa.answer], (qa, matching[0])
                assert (qa.answer in ("left", "right")) == ("left or the right" in qa.question)
            else:
                words = qa.question.removesuffix("?").split(" ")
                colour, kind = words[-2], words[-1]
                present = any((s.colour, s.shape) == (colour, kind) for s in shapes)
                assert qa.answer == ("yes" if present else "no")
                if not present:  # a near miss: that kind or that colour is in the scene
                    assert any(s.shape == kind or s.colour == colour for s in shapes)


def test_answers_are_balanced_and_most_scenes_get_every_type(drawn):
    answers = {t: Counter() for t in QUESTION_TYPES}
    full = 0
    for _, qas in drawn:
        full += len(qas) == len(QUESTION_TYPES)
        for qa in qas:
            answers[qa.type][qa.answer] += 1
    assert full / N_SCENES >= 0.9
    counts = answers["count"]
    assert set(counts) == {"1", "2", "3", "4"}
    assert all(0.15 <= counts[k] / N_SCENES <= 0.35 for k in counts), counts
    assert 0.40 <= answers["yesno"]["yes"] / N_SCENES <= 0.60, answers["yesno"]
    position = answers["position"]
    assert 0.4 <= position["left"] / (position["left"] + position["right"]) <= 0.6, position
    assert 0.4 <= position["top"] / (position["top"] + position["bottom"]) <= 0.6, position
    assert 0.4 <= (position["left"] + position["right"]) / sum(position.values()) <= 0.6, position
    assert set(answers["colour"]) == set(COLOURS) and set(answers["shape"]) == set(SHAPES)


def test_rendered_image_shows_each_shape_where_the_scene_says(drawn):
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    for scene, _ in drawn[:60]:
        image = render_scene(scene)
        assert image.size == (IMAGE_SIZE, IMAGE_SIZE) and image.mode == "RGB"
        pixels = np.asarray(image)  # (H, W, 3)
        for s in scene.shapes:  # the centre (inside every kind, the centroid for triangle and star)
            assert tuple(pixels[s.cy, s.cx]) == s.rgb, (s, tuple(pixels[s.cy, s.cx]))
        # shape colours appear only inside the bounding circles (+1 px for rounded vertices)
        inside = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
        for s in scene.shapes:
            inside |= (xs - s.cx) ** 2 + (ys - s.cy) ** 2 <= (s.radius + 1) ** 2
        coloured = np.zeros_like(inside)
        for rgb in COLOURS.values():
            coloured |= (pixels == np.array(rgb, dtype=np.uint8)).all(-1)
        assert not (coloured & ~inside).any()


def test_every_kind_is_drawn_in_its_colour_at_its_centre():
    for kind, colour in zip(SHAPES, ("red", "blue", "green", "yellow", "purple")):
        for radius in (12, 30):
            scene = Scene((Shape(kind, colour, 100, 120, radius),), background="beige", gradient="diagonal")
            image = render_scene(scene)
            assert image.getpixel((100, 120)) == COLOURS[colour]
            assert image.getpixel((100 + radius + 2, 120)) != COLOURS[colour]  # outside the bounding circle


def test_caption_lists_shapes_in_reading_order_with_position_words():
    scene = Scene(
        (Shape("star", "blue", 200, 200, 15), Shape("circle", "red", 20, 20, 15), Shape("cross", "orange", 112, 112, 15)),
        background="silver",
    )
    assert caption(scene) == (
        "Three shapes: a red circle at the top left, an orange cross in the centre and a blue star at the bottom right."
    )
    assert caption(Scene((Shape("square", "green", 20, 112, 12),), "silver")) == "One shape: a green square on the left."
    assert caption(Scene((Shape("square", "green", 112, 20, 12),), "silver")) == "One shape: a green square at the top."


def test_near_miss_and_uniqueness_conditions():
    # two red circles: no colour question (circle is not unique), no position question (pair not unique)
    scene = Scene((Shape("circle", "red", 20, 20, 12), Shape("circle", "red", 200, 200, 12)), "silver")
    for seed in range(20):
        qas = {qa.type: qa for qa in questions(scene, random.Random(seed))}
        assert set(qas) == {"count", "yesno"} and qas["count"].answer == "2"
        if qas["yesno"].answer == "no":
            assert "red circle" not in qas["yesno"].question


def test_qa_record_is_a_llava_conversation():
    scene = generate_scene(random.Random(3))
    captions, qa = scene_records(scene, "train-000001", "images/train/train-000001.png", random.Random(0))
    assert captions["conversations"][0]["value"].startswith("<image>\n")
    assert captions["conversations"][1]["value"] == caption(scene)
    turns = qa["conversations"]
    assert [t["from"] for t in turns] == ["human", "gpt"] * len(qa["question_types"])
    assert turns[0]["value"].startswith("<image>\n")
    assert sum("<image>" in t["value"] for t in turns) == 1
    expected = {q.type: (q.question, q.answer) for q in questions(scene, random.Random(0))}
    asked = {t: (turns[2 * i]["value"].removeprefix("<image>\n"), turns[2 * i + 1]["value"]) for i, t in enumerate(qa["question_types"])}
    assert set(asked) == set(expected)


def test_splits_are_disjoint_and_independent_of_other_splits_sizes():
    signatures = {}
    for split, n in (("train", 2000), ("val", 300), ("test", 300)):
        chosen = generate_split(split, n, seed=0)
        assert all(split_of(s) == split for s in chosen)
        signatures[split] = {s.signature() for s in chosen}
    assert not signatures["train"] & signatures["val"]
    assert not signatures["train"] & signatures["test"]
    assert not signatures["val"] & signatures["test"]
    assert generate_split("val", 20, seed=0)[:10] == generate_split("val", 10, seed=0)
    count_answers = Counter(len(s.shapes) for s in generate_split("test", 300, seed=0))
    assert all(count_answers[k] >= 45 for k in (1, 2, 3, 4)), count_answers  # rejection keeps counts balanced


def _snapshot(folder):
    files = {p.name: p.read_bytes() for p in sorted(folder.glob("*.json")) if p.name != "manifest.json"}
    pixels = {p.name: np.asarray(Image.open(p)).tobytes() for p in sorted(folder.glob("images/*/*.png"))}
    return files, pixels


COUNTS = {"train": 12, "val": 4, "test": 4}


def test_write_scenes_is_deterministic_and_seed_dependent(tmp_path):
    a = write_scenes(tmp_path / "a", COUNTS, seed=0, progress=False)
    b = write_scenes(tmp_path / "b", COUNTS, seed=0, progress=False)
    c = write_scenes(tmp_path / "c", COUNTS, seed=1, progress=False)
    assert a["content_hash"] == b["content_hash"] != c["content_hash"]
    files_a, pixels_a = _snapshot(tmp_path / "a")
    assert (files_a, pixels_a) == _snapshot(tmp_path / "b")
    files_c, pixels_c = _snapshot(tmp_path / "c")
    assert files_a["train_qa.json"] != files_c["train_qa.json"] and pixels_a != pixels_c
    assert len(pixels_a) == sum(COUNTS.values())
    assert sorted(files_a) == sorted(f"{s}_{k}.json" for s in COUNTS for k in ("captions", "qa"))
    records = json.loads(files_a["train_qa.json"])
    assert [r["id"] for r in records] == [f"train-{i:06d}" for i in range(1, 13)]
    assert all((tmp_path / "a" / r["image"]).is_file() for r in records)
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["counts"] == COUNTS and manifest["seed"] == 0 and manifest["version"] == scenes.GENERATOR_VERSION


def test_write_scenes_reuses_a_complete_dataset_and_redoes_an_incomplete_one(tmp_path, monkeypatch):
    first = write_scenes(tmp_path, COUNTS, seed=0, progress=False)
    calls = []
    real_render = scenes.render_scene
    monkeypatch.setattr(scenes, "render_scene", lambda *a, **k: calls.append(1) or real_render(*a, **k))
    assert write_scenes(tmp_path, COUNTS, seed=0, progress=False) == first and not calls
    (tmp_path / "images" / "val" / "val-000002.png").unlink()
    assert write_scenes(tmp_path, COUNTS, seed=0, progress=False)["content_hash"] == first["content_hash"]
    assert len(calls) == sum(COUNTS.values())
    smaller = write_scenes(tmp_path, {"train": 5}, seed=0, progress=False)  # other counts: rewritten
    assert smaller["counts"] == {"train": 5} and len(list((tmp_path / "images" / "train").glob("*.png"))) == 5


def test_write_scenes_rejects_bad_counts(tmp_path):
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        write_scenes(tmp_path, {"valid": 3}, progress=False)
    with pytest.raises(ValueError, match=r"counts\['train'\] must be an int >= 0, got -1"):
        write_scenes(tmp_path, {"train": -1}, progress=False)


def test_render_scales_to_other_sizes():
    scene = Scene((Shape("circle", "pink", 112, 112, 20),), "dark grey")
    image = render_scene(scene, size=112)
    assert image.size == (112, 112) and image.getpixel((56, 56)) == COLOURS["pink"]
    assert CELL * GRID == IMAGE_SIZE
