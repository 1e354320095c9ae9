"""Load image conversations in LLaVA's format, skipping (or, with ``strict``, refusing) bad records.

LLaVA's pretraining and instruction sets, and :func:`mixllm.data.scenes.write_scenes`, use a JSON
list of records (``.jsonl``, one record a line, is read too)::

    [{"id": "000001", "image": "images/000001.png",
      "conversations": [{"from": "human", "value": "<image>\\nWhat colour is the star?"},
                        {"from": "gpt", "value": "red"},
                        {"from": "human", "value": "How many shapes are there?"},
                        {"from": "gpt", "value": "2"}]},
     ...]

Unknown keys are ignored, except ``"question_types"`` (one label per human turn), which is kept.

A bad record is skipped with one reason, the first that applies, checked in this order:

- ``"malformed"``: not an object; no ``id`` (a string or an integer); ``conversations`` not a
  non-empty list of ``{"from", "value"}`` objects alternating human, gpt, human, gpt, ... with
  string values; ``image`` not a string; ``question_types`` not one string per human turn;
- ``"no <image> tag"``: the first human turn lacks exactly one image token, or another turn has one;
- ``"empty answer"``: a gpt value is empty or whitespace;
- ``"missing image"``: no ``image`` key, or no such file;
- ``"unreadable image"``: PIL cannot open and verify it, or it is 0 pixels wide or high;
- ``"too long"``: ``length_fn(conversation) > max_length``. Over-long samples are dropped, never
  truncated: truncation could cut image tokens and break the merge of image features.

Records without an id are named ``#<index>`` (0-based position in the file) in reports.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from mixllm.errors import DataError

log = logging.getLogger(__name__)

MALFORMED = "malformed"
NO_IMAGE_TAG = "no <image> tag"
EMPTY_ANSWER = "empty answer"
MISSING_IMAGE = "missing image"
UNREADABLE_IMAGE = "unreadable image"
TOO_LONG = "too long"
REASONS = (MALFORMED, NO_IMAGE_TAG, EMPTY_ANSWER, MISSING_IMAGE, UNREADABLE_IMAGE, TOO_LONG)
"""Why a record is skipped, in the order they are checked."""
MAX_EXAMPLES = 5
"""Ids kept per reason in a :class:`SkipReport`."""

_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
"""What PIL raises on a file it cannot read (UnidentifiedImageError is an OSError)."""


@dataclass
class Conversation:
    """One image and its dialogue."""

    id: str
    """The record's id (integers become strings)."""
    image: Path
    """The image file: ``image_folder / record["image"]`` (an absolute path stays as it is)."""
    turns: list[tuple[str, str]]
    """``(human value, gpt value)`` pairs in order; the first human value still holds the image token."""
    question_types: list[str] | None = None
    """One label per turn when the record has ``"question_types"`` (scene QA), else None."""


@dataclass
class SkipReport:
    """What a load kept and skipped, and why."""

    counts: dict[str, int] = field(default_factory=dict)
    """Reason -> number of records skipped for it (reasons from :data:`REASONS`)."""
    examples: dict[str, list[str]] = field(default_factory=dict)
    """Reason -> the first :data:`MAX_EXAMPLES` ids skipped for it."""
    total: int = 0
    """Records in the file."""
    kept: int = 0
    """Records loaded."""

    @property
    def skipped(self) -> int:
        return self.total - self.kept

    def add(self, reason: str, record_id: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(record_id)

    def summary(self) -> str:
        """One line: "kept 980 of 1000 records; skipped 12 missing image (ids a, b), 8 too long (ids c)"."""
        text = f"kept {self.kept} of {self.total} records"
        if not self.counts:
            return text
        parts = []
        for reason in sorted(self.counts, key=lambda r: REASONS.index(r) if r in REASONS else len(REASONS)):
            n, ids = self.counts[reason], self.examples.get(reason, [])
            more = ", ..." if n > len(ids) else ""
            parts.append(f"{n} {reason} (ids {', '.join(ids)}{more})")
        return f"{text}; skipped {', '.join(parts)}"


class _Skip(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


def load_llava_conversations(
    json_path: str | Path,
    image_folder: str | Path | None = None,
    strict: bool = False,
    image_token: str = "<image>",
    max_length: int | None = None,
    length_fn: Callable[[Conversation], int] | None = None,
    check_images: bool = True,
) -> tuple[list[Conversation], SkipReport]:
    """Read a LLaVA conversation file; bad records are skipped and counted (see the module docstring).

    Args:
        image_folder: what relative ``image`` paths are relative to (default: the file's folder).
        strict: raise :class:`DataError` if any record is bad, instead of skipping it.
        image_token: the tag the first human turn must hold exactly once.
        max_length, length_fn: when both are given, records with ``length_fn(conversation) > max_length``
            (e.g. tokens after expanding the image token) are dropped; with either one None, no
            length check.
        check_images: open each image with PIL and ``verify()`` it (PNG chunk checksums; a JPEG is
            only parsed up to its header). False checks only that the file exists.

    Returns:
        The kept conversations in file order, and the :class:`SkipReport` (also logged).

    Raises:
        DataError: the file is missing, is not JSON, or is not a list of records; with ``strict``,
            any bad record (the message gives the count per reason and the first ids).
    """
    path = Path(json_path)
    records = _read_records(path)
    folder = Path(image_folder) if image_folder is not None else path.parent
    report = SkipReport(total=len(records))
    image_checks: dict[Path, bool] = {}  # a picture shared by many records is verified once
    conversations = []
    for index, record in enumerate(records):
        try:
            conversation = _parse(record, folder, image_token)
            if not conversation.image.is_file():
                raise _Skip(MISSING_IMAGE)
            if check_images:
                if conversation.image not in image_checks:
                    image_checks[conversation.image] = _readable(conversation.image)
                if not image_checks[conversation.image]:
                    raise _Skip(UNREADABLE_IMAGE)
            if max_length is not None and length_fn is not None and length_fn(conversation) > max_length:
                raise _Skip(TOO_LONG)
        except _Skip as skip:
            report.add(skip.reason, _record_id(record, index))
            continue
        conversations.append(conversation)
    report.kept = len(conversations)
    if strict and report.counts:
        raise DataError(f"{path}: {report.summary()} (strict: every record must be valid)")
    (log.warning if report.counts else log.info)("%s: %s", path, report.summary())
    return conversations, report


def load_image(path: str | Path) -> Image.Image:
    """The image at ``path`` as RGB (transparency composited onto white), fully decoded.

    Raises:
        DataError: naming the file when it is missing, not an image, truncated or empty.
    """
    from mixllm.image_processing import to_rgb

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    try:
        with Image.open(path) as image:
            image.load()
            if image.width == 0 or image.height == 0:
                raise DataError(f"{path}: image is empty ({image.width}x{image.height})")
            return to_rgb(image).copy()
    except _IMAGE_ERRORS as err:
        raise DataError(f"{path}: not a readable image ({err})") from err


def _read_records(path: Path) -> list:
    if not path.is_file():
        raise DataError(f"{path}: conversation file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err})") from err
    if path.suffix == ".jsonl":
        records = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}: line {line_number} is not valid JSON ({err.msg})") from err
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from err
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records at the top level, got a {type(records).__name__}")
    return records


def _record_id(record: object, index: int) -> str:
    record_id = record.get("id") if isinstance(record, dict) else None
    if isinstance(record_id, bool) or not isinstance(record_id, (str, int)) or str(record_id) == "":
        return f"#{index}"
    return str(record_id)


def _parse(record: object, folder: Path, image_token: str) -> Conversation:
    """The record as a :class:`Conversation`, or :class:`_Skip` with the first reason that applies
    among malformed, no tag, empty answer and no ``image`` key (files are checked by the caller)."""
    if not isinstance(record, dict):
        raise _Skip(MALFORMED)
    record_id = record.get("id")
    if isinstance(record_id, bool) or not isinstance(record_id, (str, int)) or str(record_id) == "":
        raise _Skip(MALFORMED)
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns or len(turns) % 2:
        raise _Skip(MALFORMED)
    for i, turn in enumerate(turns):
        expected = "human" if i % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != expected or not isinstance(turn.get("value"), str):
            raise _Skip(MALFORMED)
    pairs = [(turns[i]["value"], turns[i + 1]["value"]) for i in range(0, len(turns), 2)]
    question_types = record.get("question_types")
    if question_types is not None and (
        not isinstance(question_types, list)
        or len(question_types) != len(pairs)
        or not all(isinstance(t, str) for t in question_types)
    ):
        raise _Skip(MALFORMED)
    image = record.get("image")
    if image is not None and not isinstance(image, str):
        raise _Skip(MALFORMED)

    values = [value for pair in pairs for value in pair]
    if values[0].count(image_token) != 1 or any(image_token in value for value in values[1:]):
        raise _Skip(NO_IMAGE_TAG)
    if any(not answer.strip() for _, answer in pairs):
        raise _Skip(EMPTY_ANSWER)
    if not image:
        raise _Skip(MISSING_IMAGE)
    return Conversation(id=str(record_id), image=folder / image, turns=pairs, question_types=question_types)


def _readable(path: Path) -> bool:
    """PIL opens the file, it has pixels, and ``verify()`` finds nothing wrong."""
    try:
        with Image.open(path) as image:
            if image.width == 0 or image.height == 0:
                return False
            image.verify()
    except _IMAGE_ERRORS:
        return False
    return True
