"""Load a user's own interaction data (CSV or parquet) into an :class:`InteractionDataset`.

Two tables:

- **interactions**: ``user_id, item_id, timestamp`` and optionally ``rating``. Timestamps are
  integers (epoch seconds or any increasing integer), floats (ordered at microsecond resolution)
  or date-time strings.
- **items**: ``item_id, text`` and optionally ``image_path`` (relative paths are resolved against
  the items file's folder; empty = no image). ``text`` is what the teacher and the item text
  encoder read, so render it the way :func:`mixllm.data.item_text` does if you can.

Every problem is a :class:`~mixllm.errors.DataError` whose message names the file, the column and
the row: for a CSV "line N" counts the header as line 1 (as an editor shows it); for parquet
"row N" is 0-based. Ids are compared as text, and become integers when every id is an integer.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow

from mixllm.data.dataset import MIN_INTERACTIONS_PER_USER, InteractionDataset
from mixllm.errors import DataError

log = logging.getLogger(__name__)

INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp")
ITEM_COLUMNS = ("item_id", "text")
_INTEGER_ID = re.compile(r"^-?\d+$")
_SUFFIXES = (".csv", ".parquet", ".pq")


def load_user_dataset(
    interactions: str | Path,
    items: str | Path,
    name: str | None = None,
    drop_short_users: bool = False,
) -> InteractionDataset:
    """Read, validate and index a user's interactions and items.

    Args:
        interactions: path to the interactions table (``.csv`` or ``.parquet``).
        items: path to the items table (``.csv`` or ``.parquet``).
        name: dataset name for reports and caches (default: the interactions file's folder name).
        drop_short_users: drop users with fewer than 3 distinct items (logged) instead of raising.
            Leave-one-out needs a training history, a validation and a test target per user.

    Raises:
        DataError: naming the file, column and row of the first problem found.
    """
    interactions_path, items_path = Path(interactions), Path(items)
    inter = _read_table(interactions_path, INTERACTION_COLUMNS)
    item_table = _read_table(items_path, ITEM_COLUMNS)

    _require_non_null(interactions_path, inter, INTERACTION_COLUMNS)
    _require_non_null(items_path, item_table, ITEM_COLUMNS)
    inter["user_id"] = _as_text_ids(inter["user_id"])
    inter["item_id"] = _as_text_ids(inter["item_id"])
    item_table["item_id"] = _as_text_ids(item_table["item_id"])

    _check_item_text(items_path, item_table)
    _check_unique_items(items_path, item_table)
    _check_known_items(interactions_path, inter, items_path, item_table)
    inter["timestamp"] = _parse_timestamps(interactions_path, inter["timestamp"])
    if "rating" in inter:
        inter["rating"] = _parse_ratings(interactions_path, inter["rating"])
    if "image_path" in item_table:
        item_table["image_path"] = _resolve_image_paths(items_path, item_table["image_path"])
    inter = _check_history_lengths(interactions_path, inter, drop_short_users)

    # Integer-looking ids become integers, consistently across both tables.
    for column in ("user_id",):
        inter[column] = _maybe_int_ids(inter[column])
    all_item_ids = pd.concat([inter["item_id"], item_table["item_id"]])
    if all_item_ids.map(lambda v: bool(_INTEGER_ID.match(v))).all():
        inter["item_id"] = inter["item_id"].astype(np.int64)
        item_table["item_id"] = item_table["item_id"].astype(np.int64)

    dataset = InteractionDataset.from_frames(
        name=name or interactions_path.resolve().parent.name,
        interactions=inter,
        items=item_table,
        source=f"{interactions_path} + {items_path}",
    )
    log.info(
        "loaded %s: %d users, %d items, %d interactions",
        dataset.name, dataset.num_users, dataset.num_items, dataset.num_interactions,
    )  # fmt: skip
    return dataset


def find_user_dataset_files(folder: str | Path) -> tuple[Path, Path]:
    """``(interactions, items)`` paths in a folder holding ``interactions.{csv,parquet}`` and
    ``items.{csv,parquet}``."""
    folder = Path(folder)
    found = []
    for stem in ("interactions", "items"):
        candidates = [folder / f"{stem}{suffix}" for suffix in _SUFFIXES if (folder / f"{stem}{suffix}").is_file()]
        if not candidates:
            raise DataError(f"{folder}: no {stem}.csv or {stem}.parquet in this folder")
        if len(candidates) > 1:
            raise DataError(f"{folder}: both {candidates[0].name} and {candidates[1].name}; keep one")
        found.append(candidates[0])
    return found[0], found[1]


# --- reading ---------------------------------------------------------------------------------------
def _read_table(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            frame = pd.read_csv(path, dtype={"user_id": str, "item_id": str}, skipinitialspace=True)
        elif suffix in (".parquet", ".pq"):
            frame = pd.read_parquet(path)
        else:
            raise DataError(f"{path}: unsupported file type {suffix!r}; use .csv or .parquet")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, pyarrow.ArrowException) as err:
        raise DataError(f"{path}: cannot be read as {suffix[1:]}: {str(err).splitlines()[0]}") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(
            f"{path}: missing column {', '.join(repr(c) for c in missing)} "
            f"(found: {', '.join(frame.columns) or 'no columns'})"
        )
    if frame.empty:
        raise DataError(f"{path}: has a header but no rows")
    frame.attrs["path"] = str(path)
    return frame.reset_index(drop=True)


def _where(path: Path, row: int) -> str:
    """Human location of 0-based data row ``row``: editor line for CSV, 0-based row for parquet."""
    return f"line {row + 2}" if path.suffix.lower() == ".csv" else f"row {row}"


def _require_non_null(path: Path, frame: pd.DataFrame, columns: tuple[str, ...]) -> None:
    for column in columns:
        null = frame[column].isna().to_numpy()
        if null.any():
            first = int(np.flatnonzero(null)[0])
            raise DataError(
                f"{path}: column '{column}' is empty at {_where(path, first)} ({int(null.sum())} empty row(s))"
            )


def _as_text_ids(ids: pd.Series) -> pd.Series:
    """Ids as stripped text; integral floats (1.0) lose their ``.0`` so 1, "1" and 1.0 match."""
    if pd.api.types.is_float_dtype(ids) and np.all(np.mod(ids.to_numpy(), 1) == 0):
        ids = ids.astype(np.int64)
    return ids.astype(str).str.strip()


def _maybe_int_ids(ids: pd.Series) -> pd.Series:
    return ids.astype(np.int64) if ids.map(lambda v: bool(_INTEGER_ID.match(v))).all() else ids


# --- checks ----------------------------------------------------------------------------------------
def _check_item_text(path: Path, items: pd.DataFrame) -> None:
    blank = (items["text"].astype(str).str.strip() == "").to_numpy()
    if blank.any():
        first = int(np.flatnonzero(blank)[0])
        raise DataError(f"{path}: column 'text' is blank at {_where(path, first)} (item_id {items['item_id'][first]!r})")


def _check_unique_items(path: Path, items: pd.DataFrame) -> None:
    duplicated = items["item_id"].duplicated(keep="first").to_numpy()
    if duplicated.any():
        row = int(np.flatnonzero(duplicated)[0])
        item_id = items["item_id"][row]
        first = int(np.flatnonzero((items["item_id"] == item_id).to_numpy())[0])
        raise DataError(
            f"{path}: column 'item_id' has duplicate id {item_id!r} at {_where(path, row)} "
            f"(first at {_where(path, first)}; {int(duplicated.sum())} duplicate row(s))"
        )


def _check_known_items(path: Path, inter: pd.DataFrame, items_path: Path, items: pd.DataFrame) -> None:
    unknown = (~inter["item_id"].isin(set(items["item_id"]))).to_numpy()
    if unknown.any():
        row = int(np.flatnonzero(unknown)[0])
        raise DataError(
            f"{path}: column 'item_id' at {_where(path, row)} refers to unknown item {inter['item_id'][row]!r} "
            f"(not in {items_path}; {int(unknown.sum())} such row(s))"
        )


def _parse_timestamps(path: Path, values: pd.Series) -> np.ndarray:
    if pd.api.types.is_bool_dtype(values):
        raise DataError(f"{path}: column 'timestamp' holds booleans; expected numbers or date-times")
    if pd.api.types.is_integer_dtype(values):
        return values.to_numpy(dtype=np.int64)
    if pd.api.types.is_float_dtype(values):
        floats = values.to_numpy(dtype=np.float64)
        bad = ~np.isfinite(floats)
        if bad.any():
            raise DataError(f"{path}: column 'timestamp' is not finite at {_where(path, int(np.flatnonzero(bad)[0]))}")
        if np.all(np.mod(floats, 1) == 0):
            return floats.astype(np.int64)
        return np.round(floats * 1e6).astype(np.int64)  # keeps order at microsecond resolution
    if pd.api.types.is_datetime64_any_dtype(values):
        parsed = values
    else:
        as_text = values.astype(str).str.strip()
        integer = as_text.map(lambda v: bool(_INTEGER_ID.match(v))).to_numpy()
        if integer.all():
            return as_text.astype(np.int64).to_numpy()
        if integer[0]:  # numbers from the first row on: every row must be one
            row = int(np.flatnonzero(~integer)[0])
            raise DataError(
                f"{path}: column 'timestamp' at {_where(path, row)} is neither a number nor a date-time: "
                f"{as_text[row]!r} (the first row holds a number)"
            )
        parsed = pd.to_datetime(as_text, errors="coerce", format="mixed")
        bad = parsed.isna().to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"{path}: column 'timestamp' at {_where(path, row)} is neither a number nor a date-time: "
                f"{as_text[row]!r}"
            )
    if getattr(parsed.dt, "tz", None) is not None:
        parsed = parsed.dt.tz_convert("UTC").dt.tz_localize(None)
    return parsed.astype("datetime64[ns]").astype(np.int64).to_numpy()


def _parse_ratings(path: Path, values: pd.Series) -> np.ndarray:
    numbers = pd.to_numeric(values, errors="coerce")
    bad = (numbers.isna() & values.notna()).to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(f"{path}: column 'rating' at {_where(path, row)} is not a number: {values[row]!r}")
    return numbers.to_numpy(dtype=np.float64)


def _resolve_image_paths(path: Path, values: pd.Series) -> list[str | None]:
    resolved: list[str | None] = []
    for row, value in enumerate(values):
        if value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() == "":
            resolved.append(None)
            continue
        image = Path(str(value).strip())
        if not image.is_absolute():
            image = path.resolve().parent / image
        if not image.is_file():
            raise DataError(f"{path}: column 'image_path' at {_where(path, row)}: no such file {str(image)!r}")
        resolved.append(str(image))
    return resolved


def _check_history_lengths(path: Path, inter: pd.DataFrame, drop_short_users: bool) -> pd.DataFrame:
    distinct = inter.drop_duplicates(["user_id", "item_id"]).groupby("user_id", sort=False).size()
    short = distinct[distinct < MIN_INTERACTIONS_PER_USER]
    if short.empty:
        return inter
    if drop_short_users:
        log.warning(
            "%s: dropped %d users with fewer than %d distinct items (leave-one-out needs a training history)",
            path, len(short), MIN_INTERACTIONS_PER_USER,
        )  # fmt: skip
        kept = inter[~inter["user_id"].isin(set(short.index))].reset_index(drop=True)
        if kept.empty:
            raise DataError(f"{path}: no user has {MIN_INTERACTIONS_PER_USER} or more distinct items")
        return kept
    user_id = short.index[0]
    rows = np.flatnonzero((inter["user_id"] == user_id).to_numpy())
    raise DataError(
        f"{path}: column 'user_id': user {user_id!r} has {int(short.iloc[0])} distinct item(s) "
        f"(at {', '.join(_where(path, int(r)) for r in rows[:5])}), so its training history would be empty; "
        f"leave-one-out needs at least {MIN_INTERACTIONS_PER_USER} per user ({len(short)} user(s) are short). "
        "Remove them, or load with drop_short_users=True"
    )
