"""LLaVA conversation loader: round trip of written scenes, every skip reason, strict mode, file errors, load_image."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from mixllm.data.llava import (
    EMPTY_ANSWER,
    MALFORMED,
    MISSING_IMAGE,
    NO_IMAGE_TAG,
    TOO_LONG,
    UNREADABLE_IMAGE,
    load_image,
    load_llava_conversations,
)
from mixllm.data.scenes import write_scenes
from mixllm.errors import DataError


def _png_bytes(colour=(200, 30, 30), size=(8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _turns(*values):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def _good(record_id, image="ok.png", **extra):
    return {"id": record_id, "image": image, "conversations": _turns("<image>\nWhat is it?", "a red square"), **extra}


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "ok.png").write_bytes(_png_bytes())
    data = _png_bytes()
    (tmp_path / "half.png").write_bytes(data[: len(data) // 2])  # truncated
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    return tmp_path


def _write(folder, records, name="data.json"):
    path = folder / name
    path.write_text(json.dumps(records))
    return path


def test_round_trip_of_written_scenes(tmp_path):
    write_scenes(tmp_path, {"train": 6, "val": 2}, seed=0, progress=False)
    for kind in ("qa", "captions"):
        raw = json.loads((tmp_path / f"train_{kind}.json").read_text())
        conversations, report = load_llava_conversations(tmp_path / f"train_{kind}.json")
        assert report.kept == report.total == 6 and not report.counts
        assert report.summary() == "kept 6 of 6 records"
        for record, conv in zip(raw, conversations):
            values = [t["value"] for t in record["conversations"]]
            assert conv.id == record["id"]
            assert conv.image == tmp_path / record["image"] and conv.image.is_file()
            assert conv.turns == list(zip(values[::2], values[1::2]))
            assert conv.turns[0][0].startswith("<image>\n")
            assert conv.question_types == record.get("question_types")
            if kind == "qa":
                assert len(conv.question_types) == len(conv.turns) >= 2


def test_each_bad_record_is_skipped_with_its_reason(folder):
    records = [
        _good("good1"),
        "not a dict",  # malformed, named by index
        {"image": "ok.png", "conversations": _turns("<image>\nq", "a")},  # no id
        _good("empty-conv", conversations=[]),
        _good("starts-gpt", conversations=[{"from": "gpt", "value": "<image>\nq"}, {"from": "human", "value": "a"}]),
        _good("odd", conversations=_turns("<image>\nq", "a", "q2")),
        _good("non-string", conversations=_turns("<image>\nq", 3)),
        _good("bad-types", question_types=["colour", "count"]),  # two labels for one turn
        _good("no-tag", conversations=_turns("What is it?", "a")),
        _good("two-tags", conversations=_turns("<image><image>\nq", "a")),
        _good("late-tag", conversations=_turns("<image>\nq", "a", "<image>\nq2", "b")),
        _good("empty", conversations=_turns("<image>\nq", "a", "q2", "  ")),
        {"id": "no-image-key", "conversations": _turns("<image>\nq", "a")},
        _good("no-file", image="nowhere.png"),
        _good("truncated", image="half.png"),
        _good("zero-bytes", image="empty.png"),
        _good("text-file", image="text.png"),
        _good(7, question_types=["colour"]),  # integer ids are fine
    ]
    conversations, report = load_llava_conversations(_write(folder, records))
    assert [c.id for c in conversations] == ["good1", "7"]
    assert conversations[1].question_types == ["colour"]
    assert report.total == len(records) and report.kept == 2
    assert report.counts == {MALFORMED: 7, NO_IMAGE_TAG: 3, EMPTY_ANSWER: 1, MISSING_IMAGE: 2, UNREADABLE_IMAGE: 3}
    assert report.examples[MALFORMED] == ["#1", "#2", "empty-conv", "starts-gpt", "odd"]  # first five only
    assert report.examples[NO_IMAGE_TAG] == ["no-tag", "two-tags", "late-tag"]
    assert report.examples[MISSING_IMAGE] == ["no-image-key", "no-file"]
    assert report.examples[UNREADABLE_IMAGE] == ["truncated", "zero-bytes", "text-file"]
    summary = report.summary()
    assert summary.startswith(f"kept 2 of {len(records)} records; skipped 7 malformed (ids #1, #2, empty-conv, starts-gpt, odd, ...)")
    assert "3 unreadable image (ids truncated, zero-bytes, text-file)" in summary


def test_check_images_false_only_checks_existence(folder):
    records = [_good("truncated", image="half.png"), _good("no-file", image="nowhere.png")]
    conversations, report = load_llava_conversations(_write(folder, records), check_images=False)
    assert [c.id for c in conversations] == ["truncated"] and report.counts == {MISSING_IMAGE: 1}


def test_strict_raises_naming_file_reasons_and_ids(folder):
    path = _write(folder, [_good("a"), _good("b", image="half.png"), _good("c", conversations=_turns("q", "x"))])
    with pytest.raises(DataError) as err:
        load_llava_conversations(path, strict=True)
    message = str(err.value)
    assert str(path) in message and "1 unreadable image (ids b)" in message and "1 no <image> tag (ids c)" in message
    assert len(load_llava_conversations(_write(folder, [_good("a")], "clean.json"), strict=True)[0]) == 1


def test_too_long_records_are_dropped_not_truncated(folder):
    records = [_good("short"), _good("long", conversations=_turns("<image>\nq1", "a1", "q2", "a2", "q3", "a3"))]
    conversations, report = load_llava_conversations(_write(folder, records), max_length=2, length_fn=lambda c: len(c.turns))
    assert [c.id for c in conversations] == ["short"] and report.counts == {TOO_LONG: 1}
    assert report.examples[TOO_LONG] == ["long"]
    for max_length, length_fn in ((None, lambda c: len(c.turns)), (2, None)):  # either one missing: no length check
        assert load_llava_conversations(_write(folder, records), max_length=max_length, length_fn=length_fn)[1].kept == 2


def test_image_paths_resolve_against_image_folder_or_absolute(folder, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("json")
    path = _write(elsewhere, [_good("rel"), _good("abs", image=str(folder / "ok.png"))])
    conversations, report = load_llava_conversations(path, image_folder=folder)
    assert [c.image for c in conversations] == [folder / "ok.png", folder / "ok.png"]
    assert load_llava_conversations(path)[1].counts == {MISSING_IMAGE: 1}  # default folder: the JSON's


def test_custom_image_token_and_jsonl(folder):
    record = _good("x", conversations=_turns("<img> what?", "a"))
    (folder / "data.jsonl").write_text(json.dumps(record) + "\n\n" + json.dumps(_good("y")) + "\n")
    conversations, report = load_llava_conversations(folder / "data.jsonl", image_token="<img>")
    assert [c.id for c in conversations] == ["x"] and report.counts == {NO_IMAGE_TAG: 1}


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "conversation file not found"),
        ("{not json", "not valid JSON (line 1"),
        ('{"id": "a"}', "expected a JSON list of records at the top level, got a dict"),
    ],
)
def test_file_level_problems_name_the_file(tmp_path, content, expected):
    path = tmp_path / "data.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match="data.json") as err:
        load_llava_conversations(path)
    assert expected in str(err.value)


def test_load_image_gives_rgb_or_a_clear_error(folder):
    image = load_image(folder / "ok.png")
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (200, 30, 30)
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(folder / "clear.png")
    assert load_image(folder / "clear.png").getpixel((0, 0)) == (255, 255, 255)  # transparency onto white
    for name, expected in (("half.png", "not a readable image"), ("empty.png", "not a readable image"), ("gone.png", "not found")):
        with pytest.raises(DataError, match=expected) as err:
            load_image(folder / name)
        assert name in str(err.value)
