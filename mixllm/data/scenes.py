"""Synthetic scenes of coloured shapes: the embedded default dataset for image question answering.

A scene is 1-4 shapes (:data:`SHAPES`) in 8 far-apart colours (:data:`COLOURS`) on a neutral
background (:data:`BACKGROUNDS`, flat or with a mild gradient), drawn with PIL at 224x224.
Every scene comes with a caption and up to five questions (:data:`QUESTION_TYPES`) whose answers
follow from the :class:`Scene` alone.

Layout rules (the tests check them on thousands of scenes):

- the image is the vision encoder's 7x7 grid of 32-px cells, and every shape's centre lies in a
  cell of its own;
- a shape's "radius" (12..30 px) is the radius of a circle that contains it; these bounding
  circles are at least :data:`MIN_GAP` px apart and lie inside the image, :data:`MARGIN` px from
  its border.

Splits: a scene's canonical signature (its shapes sorted, each as kind, colour and grid cell, and
its background) is hashed into one of 100 buckets: train owns buckets 0-79, val 80-89, test 90-99,
and each split's generator, seeded from ``(seed, split)``, redraws every scene outside its own
buckets. No val or test scene therefore equals a train scene, and each split depends only on
``(seed, split)``: asking for more training scenes leaves val and test as they were.

Typical use::

    from mixllm.data.scenes import write_scenes
    manifest = write_scenes("data/scenes", {"train": 8000, "val": 1000, "test": 1000}, seed=0)
    # data/scenes/{train,val,test}_{captions,qa}.json (LLaVA format) and data/scenes/images/<split>/*.png
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mixllm.provenance import atomic_write_text

log = logging.getLogger(__name__)

GENERATOR = "mixllm.data.scenes"
GENERATOR_VERSION = 1
"""Bump when scenes, rendering, captions or questions change, so cached datasets are rewritten."""

IMAGE_SIZE = 224
GRID = 7
"""The vision encoder's grid: 7x7 cells of ``IMAGE_SIZE // GRID`` = 32 px."""
CELL = IMAGE_SIZE // GRID
MIN_SHAPES, MAX_SHAPES = 1, 4
MIN_RADIUS, MAX_RADIUS = 12, 30
MIN_GAP = 4
"""Smallest distance in px between two shapes' bounding circles."""
MARGIN = 2
"""Smallest distance in px between a bounding circle and the image border."""
DUPLICATE_PROBABILITY = 0.15
"""Share of scenes whose kinds and colours are drawn with replacement (repeats possible); the
others have distinct kinds and distinct colours, so every question type can be asked."""
GRADIENT_AMPLITUDE = 12
"""A gradient background goes from ``colour - 12`` to ``colour + 12`` per channel."""

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 30),
    "green": (30, 160, 40),
    "blue": (30, 70, 220),
    "yellow": (250, 215, 0),
    "orange": (255, 130, 0),
    "purple": (135, 45, 175),
    "pink": (255, 105, 190),
    "brown": (135, 75, 20),
}
"""Shape colours, at least 80 apart (Euclidean RGB) from each other."""
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "light grey": (225, 225, 225),
    "silver": (200, 200, 200),
    "off-white": (242, 242, 238),
    "beige": (232, 222, 200),
    "ivory": (245, 242, 228),
    "pale blue": (212, 222, 234),
    "pale green": (216, 230, 216),
    "warm grey": (186, 180, 170),
    "slate": (112, 118, 126),
    "dark grey": (80, 80, 84),
}
"""Neutral backgrounds, at least 75 apart from every shape colour even at the ends of a gradient."""
GRADIENTS = ("flat", "horizontal", "vertical", "diagonal")
"""``horizontal``: darker on the left; ``vertical``: darker at the top; ``diagonal``: darker top left."""

QUESTION_TYPES = ("colour", "shape", "count", "position", "yesno")
CAPTION_PROMPTS = ("Describe the image briefly.", "What is in this picture?", "Give a short description of the image.")
SPLITS = ("train", "val", "test")
SPLIT_BUCKETS = {"train": range(0, 80), "val": range(80, 90), "test": range(90, 100)}
"""Which of the 100 signature-hash buckets each split owns (see the module docstring)."""
DEFAULT_COUNTS = {"train": 8000, "val": 1000, "test": 1000}

_ROWS = ("top", "middle", "bottom")
_COLS = ("left", "centre", "right")
_COUNT_WORDS = ("One shape", "Two shapes", "Three shapes", "Four shapes")
_MAX_PLACEMENT_TRIES = 1000
_SHAPE_TRIES = 50


@dataclass(frozen=True)
class Shape:
    """One shape; coordinates are pixels of the 224x224 image."""

    shape: str
    """One of :data:`SHAPES`."""
    colour: str
    """One of :data:`COLOURS`."""
    cx: int
    """Centre, x (0 = left)."""
    cy: int
    """Centre, y (0 = top)."""
    radius: int
    """Radius of the circle that contains the shape."""

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLOURS[self.colour]

    @property
    def cell(self) -> tuple[int, int]:
        """``(row, col)`` of the centre in the 7x7 grid."""
        return self.cy // CELL, self.cx // CELL

    @property
    def position(self) -> str:
        """Where the centre is, by thirds of the image: "at the top left", "on the right", "in the centre"..."""
        row, col = _ROWS[self.cy * 3 // IMAGE_SIZE], _COLS[self.cx * 3 // IMAGE_SIZE]
        if row == "middle":
            return "in the centre" if col == "centre" else f"on the {col}"
        return f"at the {row}" if col == "centre" else f"at the {row} {col}"


@dataclass(frozen=True)
class Scene:
    """Shapes on a background; everything :func:`render_scene` draws and every answer comes from."""

    shapes: tuple[Shape, ...]
    """1 to 4 shapes, in the order they were placed."""
    background: str
    """One of :data:`BACKGROUNDS`."""
    gradient: str = "flat"
    """One of :data:`GRADIENTS`."""

    def signature(self) -> tuple:
        """Canonical identity for split disjointness: sorted ``(shape, colour, row, col)`` and the
        background. Sizes, exact positions and the gradient are ignored, so scenes that differ only
        in those count as equal."""
        return (tuple(sorted((s.shape, s.colour, *s.cell) for s in self.shapes)), self.background)


@dataclass(frozen=True)
class QA:
    """One question about a scene and its answer."""

    type: str
    """One of :data:`QUESTION_TYPES`."""
    question: str
    answer: str


# --- generation ------------------------------------------------------------------------------------
def generate_scene(rng: random.Random) -> Scene:
    """Draw a scene: 1-4 shapes (uniform), placed by rejection sampling under the layout rules."""
    n = rng.randint(MIN_SHAPES, MAX_SHAPES)
    if rng.random() < DUPLICATE_PROBABILITY:
        kinds = [rng.choice(SHAPES) for _ in range(n)]
        colours = [rng.choice(tuple(COLOURS)) for _ in range(n)]
    else:
        kinds = rng.sample(SHAPES, n)
        colours = rng.sample(tuple(COLOURS), n)
    shapes = _place(rng, kinds, colours)
    return Scene(shapes, background=rng.choice(tuple(BACKGROUNDS)), gradient=rng.choice(GRADIENTS))


def _place(rng: random.Random, kinds: list[str], colours: list[str]) -> tuple[Shape, ...]:
    for _ in range(_MAX_PLACEMENT_TRIES):
        placed: list[Shape] = []
        for kind, colour in zip(kinds, colours):
            for _ in range(_SHAPE_TRIES):
                radius = rng.randint(MIN_RADIUS, MAX_RADIUS)
                low, high = radius + MARGIN, IMAGE_SIZE - 1 - MARGIN - radius
                shape = Shape(kind, colour, rng.randint(low, high), rng.randint(low, high), radius)
                if all(_apart(shape, other) for other in placed):
                    placed.append(shape)
                    break
            else:
                break  # this shape found no room: start the scene again
        if len(placed) == len(kinds):
            return tuple(placed)
    raise RuntimeError(f"could not place {len(kinds)} shapes in {_MAX_PLACEMENT_TRIES} tries")  # never seen


def _apart(a: Shape, b: Shape) -> bool:
    """Different grid cells, and bounding circles at least MIN_GAP apart (exact integer test)."""
    reach = a.radius + b.radius + MIN_GAP
    return a.cell != b.cell and (a.cx - b.cx) ** 2 + (a.cy - b.cy) ** 2 >= reach**2


def split_of(scene: Scene) -> str:
    """The split whose signature buckets hold ``scene`` (see :data:`SPLIT_BUCKETS`)."""
    digest = hashlib.sha256(json.dumps(scene.signature()).encode()).digest()
    bucket = int.from_bytes(digest[:8], "big") % 100
    return next(split for split, buckets in SPLIT_BUCKETS.items() if bucket in buckets)


def derived_rng(seed: int, *keys: str | int) -> random.Random:
    """A ``random.Random`` seeded from ``(seed, *keys)`` by sha256: independent streams per split
    and per scene, the same on every machine and Python run."""
    digest = hashlib.sha256(json.dumps([GENERATOR, seed, *keys]).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def generate_split(split: str, n: int, seed: int = 0) -> list[Scene]:
    """The first ``n`` scenes of ``split``: drawn from ``derived_rng(seed, split)``, keeping only
    scenes whose signature belongs to the split. Scene ``i`` is the same whatever ``n`` is."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = derived_rng(seed, split)
    scenes: list[Scene] = []
    while len(scenes) < n:
        scene = generate_scene(rng)
        if split_of(scene) == split:
            scenes.append(scene)
    return scenes


# --- rendering ---------------------------------------------------------------------------------------
def _unit_polygon(radii: list[float], start_deg: float = -90.0) -> tuple[tuple[float, float], ...]:
    """Vertices at the given radii, evenly spaced clockwise (y down) from ``start_deg``; rounded so
    the rendered pixels do not depend on the last bit of a platform's sin/cos."""
    step = 360.0 / len(radii)
    return tuple(
        (round(r * math.cos(math.radians(start_deg + i * step)), 6), round(r * math.sin(math.radians(start_deg + i * step)), 6))
        for i, r in enumerate(radii)
    )


_TRIANGLE = _unit_polygon([1.0, 1.0, 1.0])  # upward, centroid at the centre
_STAR = _unit_polygon([1.0, 0.45] * 5)
_CROSS_HALF_WIDTH = 0.3
_CROSS_ARM = math.sqrt(1.0 - _CROSS_HALF_WIDTH**2)  # arm corners on the bounding circle
_CROSS = tuple(
    (round(x, 6), round(y, 6))
    for x, y in (
        (-_CROSS_HALF_WIDTH, -_CROSS_ARM), (_CROSS_HALF_WIDTH, -_CROSS_ARM), (_CROSS_HALF_WIDTH, -_CROSS_HALF_WIDTH),
        (_CROSS_ARM, -_CROSS_HALF_WIDTH), (_CROSS_ARM, _CROSS_HALF_WIDTH), (_CROSS_HALF_WIDTH, _CROSS_HALF_WIDTH),
        (_CROSS_HALF_WIDTH, _CROSS_ARM), (-_CROSS_HALF_WIDTH, _CROSS_ARM), (-_CROSS_HALF_WIDTH, _CROSS_HALF_WIDTH),
        (-_CROSS_ARM, _CROSS_HALF_WIDTH), (-_CROSS_ARM, -_CROSS_HALF_WIDTH), (-_CROSS_HALF_WIDTH, -_CROSS_HALF_WIDTH),
    )
)  # fmt: skip
_SQUARE_HALF_SIDE = 1.0 / math.sqrt(2.0)  # corners on the bounding circle


@lru_cache(maxsize=len(BACKGROUNDS) * len(GRADIENTS))
def _background(name: str, gradient: str, size: int) -> Image.Image:
    """The background image, integer arithmetic only (identical pixels on every platform)."""
    ramp = (2 * np.arange(size, dtype=np.int64) - (size - 1)) * GRADIENT_AMPLITUDE // max(size - 1, 1)  # (S,) -A..A
    offset = {
        "flat": np.zeros((size, size), dtype=np.int64),
        "horizontal": np.broadcast_to(ramp[None, :], (size, size)),
        "vertical": np.broadcast_to(ramp[:, None], (size, size)),
        "diagonal": (ramp[None, :] + ramp[:, None]) // 2,
    }[gradient]  # (S, S)
    pixels = np.asarray(BACKGROUNDS[name], dtype=np.int64)[None, None, :] + offset[..., None]  # (S, S, 3)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))  # (S, S, 3) uint8 -> RGB


def render_scene(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw ``scene`` as a ``size`` x ``size`` RGB image (coordinates scaled from 224).

    Vertices are rounded to whole pixels, so a shape stays within half a pixel of its bounding circle.
    """
    image = _background(scene.background, scene.gradient, size).copy()
    draw = ImageDraw.Draw(image)
    scale = size / IMAGE_SIZE
    for s in scene.shapes:
        cx, cy, r = s.cx * scale, s.cy * scale, s.radius * scale
        if s.shape == "circle":
            draw.ellipse([round(cx - r), round(cy - r), round(cx + r), round(cy + r)], fill=s.rgb)
        elif s.shape == "square":
            h = math.floor(r * _SQUARE_HALF_SIDE)  # PIL would truncate a float corner outwards
            draw.rectangle([round(cx) - h, round(cy) - h, round(cx) + h, round(cy) + h], fill=s.rgb)
        else:
            unit = {"triangle": _TRIANGLE, "star": _STAR, "cross": _CROSS}[s.shape]
            draw.polygon([(round(cx + r * x), round(cy + r * y)) for x, y in unit], fill=s.rgb)
    return image


# --- text ----------------------------------------------------------------------------------------------
def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def caption(scene: Scene) -> str:
    """E.g. "Two shapes: a red circle at the top left and a blue star at the bottom right."
    Shapes are listed in reading order (by grid row, then column)."""
    parts = [f"{_a(s.colour)} {s.shape} {s.position}" for s in sorted(scene.shapes, key=lambda s: (s.cell, s.cx))]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{_COUNT_WORDS[len(parts) - 1]}: {listed}."


def questions(scene: Scene, rng: random.Random) -> list[QA]:
    """At most one question per type, in :data:`QUESTION_TYPES` order; every type whose condition
    holds is asked (all five in most scenes).

    - colour: about a shape kind that occurs once; answer its colour name.
    - shape: about a colour that occurs once; answer the shape name.
    - count: answer a digit "1".."4".
    - position: about a shape that is the only one of its colour and kind, on the axis where its
      centre is clearly on one side (not in the middle column for left/right, not in the middle row
      for top/bottom); the answer is drawn uniformly from the sides available, then the shape.
    - yesno: "yes" (a present colour and kind) or "no" (a near miss: a present kind in another
      colour, or a present colour on another kind, that is absent) with probability 1/2 each.
    """
    shapes = scene.shapes
    kinds = Counter(s.shape for s in shapes)
    colours = Counter(s.colour for s in shapes)
    pairs = Counter((s.colour, s.shape) for s in shapes)
    out: list[QA] = []

    unique_kind = [s for s in shapes if kinds[s.shape] == 1]
    if unique_kind:
        s = rng.choice(unique_kind)
        out.append(QA("colour", f"What colour is the {s.shape}?", s.colour))
    unique_colour = [s for s in shapes if colours[s.colour] == 1]
    if unique_colour:
        s = rng.choice(unique_colour)
        out.append(QA("shape", f"What shape is the {s.colour} object?", s.shape))
    out.append(QA("count", "How many shapes are there?", str(len(shapes))))

    sides: dict[str, list[Shape]] = {side: [] for side in ("left", "right", "top", "bottom")}
    middle = GRID // 2
    for s in shapes:
        if pairs[(s.colour, s.shape)] != 1:
            continue
        row, col = s.cell
        if col != middle:
            sides["left" if col < middle else "right"].append(s)
        if row != middle:
            sides["top" if row < middle else "bottom"].append(s)
    available = [side for side, members in sides.items() if members]
    if available:
        side = rng.choice(available)
        s = rng.choice(sides[side])
        axis = "on the left or the right" if side in ("left", "right") else "at the top or the bottom"
        out.append(QA("position", f"Is the {s.colour} {s.shape} {axis}?", side))

    if rng.random() < 0.5:
        colour, kind = rng.choice(sorted(pairs))
        answer = "yes"
    else:
        near = {(c, s.shape) for s in shapes for c in COLOURS} | {(s.colour, k) for s in shapes for k in SHAPES}
        colour, kind = rng.choice(sorted(near - set(pairs)))
        answer = "no"
    out.append(QA("yesno", f"Is there {_a(colour)} {kind}?", answer))
    return out


def scene_records(scene: Scene, scene_id: str, image: str, rng: random.Random) -> tuple[dict, dict]:
    """The caption record and the question record of one scene, in LLaVA's conversation format.

    The QA record has all of :func:`questions` in shuffled order as one multi-turn conversation
    (``<image>`` only at the start of the first human turn) and ``"question_types"``, one per
    human turn.
    """
    prompt = rng.choice(CAPTION_PROMPTS)
    captions = {
        "id": scene_id,
        "image": image,
        "conversations": [{"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": caption(scene)}],
    }
    qas = questions(scene, rng)
    rng.shuffle(qas)
    turns = []
    for i, qa in enumerate(qas):
        turns += [{"from": "human", "value": ("<image>\n" if i == 0 else "") + qa.question}, {"from": "gpt", "value": qa.answer}]
    qa_record = {"id": scene_id, "image": image, "conversations": turns, "question_types": [qa.type for qa in qas]}
    return captions, qa_record


# --- writing -------------------------------------------------------------------------------------------
def write_scenes(
    out_dir: str | Path,
    counts: dict[str, int] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Write a scene dataset and return its manifest; reuse it if ``out_dir`` already holds it.

    Writes, for each split in ``counts``: ``images/{split}/{split}-000001.png`` ...,
    ``{split}_captions.json`` and ``{split}_qa.json`` (LLaVA format, image paths relative to
    ``out_dir``; see :func:`scene_records`), then ``manifest.json`` (generator, version, seed,
    counts, image size, files and ``content_hash``: sha256 over every image's pixels and every JSON
    file). The manifest is written last, so an interrupted run is redone, not reused.

    Args:
        counts: scenes per split, keys from :data:`SPLITS` (default :data:`DEFAULT_COUNTS`).
        seed: the same seed and counts give byte-identical JSON and identical pixels.
        progress: show a tqdm bar.
    """
    from tqdm.auto import tqdm

    counts = dict(DEFAULT_COUNTS if counts is None else counts)
    for split, n in counts.items():
        if split not in SPLITS:
            raise ValueError(f"counts: unknown split {split!r}; use {', '.join(SPLITS)}")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"counts[{split!r}] must be an int >= 0, got {n!r}")
    counts = {split: counts[split] for split in SPLITS if split in counts}
    out = Path(out_dir)
    manifest_path = out / "manifest.json"
    wanted = {"generator": GENERATOR, "version": GENERATOR_VERSION, "seed": seed, "counts": counts, "image_size": IMAGE_SIZE}
    files = {s: {"captions": f"{s}_captions.json", "qa": f"{s}_qa.json", "images": f"images/{s}"} for s in counts}

    cached = _read_manifest(manifest_path)
    if cached is not None and all(cached.get(k) == v for k, v in wanted.items()) and _complete(out, counts):
        log.info("reusing scene dataset %s (%s)", out, _count_text(counts))
        return cached
    manifest_path.unlink(missing_ok=True)

    digest = hashlib.sha256()
    with tqdm(total=sum(counts.values()), desc="writing scenes", unit="scene", disable=not progress) as bar:
        for split, n in counts.items():
            image_dir = out / "images" / split
            image_dir.mkdir(parents=True, exist_ok=True)
            for stale in image_dir.glob(f"{split}-*.png"):
                stale.unlink()
            caption_records, qa_records = [], []
            for i, scene in enumerate(generate_split(split, n, seed), start=1):
                scene_id = _scene_id(split, i, n)
                image = render_scene(scene)
                digest.update(image.tobytes())
                image.save(image_dir / f"{scene_id}.png", format="PNG", optimize=False)
                cap, qa = scene_records(scene, scene_id, f"images/{split}/{scene_id}.png", derived_rng(seed, split, i))
                caption_records.append(cap)
                qa_records.append(qa)
                bar.update()
            for kind, records in (("captions", caption_records), ("qa", qa_records)):
                text = json.dumps(records, indent=1, ensure_ascii=False) + "\n"
                digest.update(text.encode("utf-8"))
                atomic_write_text(out / files[split][kind], text)
    manifest = {**wanted, "files": files, "content_hash": digest.hexdigest()}
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")
    log.info("wrote scene dataset %s (%s)", out, _count_text(counts))
    return manifest


def _scene_id(split: str, index: int, n: int) -> str:
    return f"{split}-{index:0{max(6, len(str(n)))}d}"


def parse_scene_id(scene_id: str) -> tuple[str, int]:
    """``(split, index)`` of a scene id (or image stem) that :func:`write_scenes` wrote: "val-000042" ->
    ("val", 41), the index into :func:`generate_split`'s list. ValueError for anything else."""
    split, _, number = str(scene_id).rpartition("-")
    if split not in SPLITS or not number.isdigit() or int(number) < 1:
        raise ValueError(f"{scene_id!r} is not a built-in scene id (<split>-<number>, split one of {SPLITS})")
    return split, int(number) - 1


def _count_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {split}" for split, n in counts.items())


def _read_manifest(path: Path) -> dict | None:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _complete(out: Path, counts: dict[str, int]) -> bool:
    """Every JSON file and image a manifest with these counts promises is there."""
    for split, n in counts.items():
        if not (out / f"{split}_captions.json").is_file() or not (out / f"{split}_qa.json").is_file():
            return False
        if not all((out / "images" / split / f"{_scene_id(split, i, n)}.png").is_file() for i in range(1, n + 1)):
            return False
    return True
