"""The serving layer's durable state: the item catalog and the interaction events, in one SQLite file.

Everything a replica must not lose lives here; a replica holds only caches rebuilt from it. The
:class:`Store` is the only code that opens the database file: the services call its methods and
never issue SQL themselves.

Durability. The file runs in WAL mode and every write method is one transaction that is committed
before the method returns, so a write the server has acknowledged survives ``kill -9`` of the
process at any moment (SQLite rolls an interrupted transaction back when the file is next opened).
``synchronous="FULL"`` (the default) also fsyncs the write-ahead log at every commit, so an
acknowledged write survives an OS crash or power loss as well. ``synchronous="NORMAL"`` in WAL mode
still survives a process kill, but an OS crash may roll back the last few commits (the file stays
consistent); it saves one fsync per write.

Concurrency. Each thread gets its own connection (``threading.local``): in WAL mode readers never
block each other or the writer, and the sqlite3 module releases the GIL while SQLite works, so the
services' worker threads read in parallel instead of queueing on one lock (a thread's connection
lives until :meth:`Store.close`, so use the store from a pool of threads, not from one-off threads).
Several processes (the replicas of one host) may open the same file. Every write starts with
``BEGIN IMMEDIATE``, which takes SQLite's single write lock before reading anything, so the
read-modify-write steps inside it (next catalog version, next free row, next event sequence number)
cannot interleave with another writer. A writer that finds the lock held waits up to ``busy_timeout_s`` before failing. Open the
store after forking worker processes, never before: SQLite connections must not cross a fork.

Schema (version :data:`SCHEMA_VERSION`)::

    meta(key PRIMARY KEY, value)        schema_version, catalog_version, feature_dim, seed (JSON)
    items(row INTEGER PRIMARY KEY,      dense 0-based row, stable for the life of the item id
          item_id TEXT UNIQUE, text, features BLOB (float32 little-endian), feature_dim,
          deleted 0/1, version)         index on version
    events(seq INTEGER PRIMARY KEY,     1, 2, 3, ... in insertion order; events are never deleted
           user_id, item_row -> items.row, timestamp REAL)
                                        index on (user_id, timestamp, seq, item_row)
    users(user_id PRIMARY KEY)          created by a user's first event

The catalog version is a counter in ``meta``, bumped inside every item write; the item written takes
the new value as its ``version``. Seeding counts as one write: every seeded item gets version 1. A
replica that has applied everything up to version ``v`` calls :meth:`Store.catalog_changes` with
``v`` to get exactly the items written since (deletions included, as tombstones).

Items are never removed: :meth:`Store.delete_item` sets a tombstone, so an item's row (the row of
the services' in-memory tensor cache) is never reused by another id, and re-creating a deleted id
revives its old row.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mixllm.errors import DataError, MixLLMError

if TYPE_CHECKING:  # mixllm.data imports torch; the store must not
    from mixllm.data.dataset import InteractionDataset

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
"""Bumped when the tables change incompatibly; a file written by another version is refused."""

SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")
FEATURE_DTYPE = np.dtype("<f4")
"""Features are stored as little-endian float32 bytes: what goes in comes back bit for bit."""
_IN_CHUNK = 500  # ids per ``IN (...)`` query, well under SQLite's bound-parameter limit

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS items (
    row INTEGER PRIMARY KEY,
    item_id TEXT NOT NULL UNIQUE,
    text TEXT NOT NULL,
    features BLOB,
    feature_dim INTEGER,
    deleted INTEGER NOT NULL DEFAULT 0,
    version INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS items_version ON items (version);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    user_id TEXT NOT NULL,
    item_row INTEGER NOT NULL REFERENCES items (row),
    timestamp REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS events_user_time ON events (user_id, timestamp, seq, item_row);
CREATE TABLE IF NOT EXISTS users (
    user_id TEXT PRIMARY KEY
) WITHOUT ROWID;
"""


class StoreError(MixLLMError):
    """The database file cannot be used: not a SQLite file, another schema version, or closed."""


@dataclass(frozen=True)
class Item:
    """One catalog entry as stored."""

    row: int
    """Stable dense index: 0..N-1 in seeding order, new ids take the next free row, a deleted item
    keeps its row and re-creating its id revives that row. The services' tensor cache row."""
    item_id: str
    """The caller's id (non-empty string)."""
    text: str
    """What the text encoders read."""
    features: np.ndarray | None
    """Optional collaborative vector, float32 ``(feature_dim,)``; None when the item has none."""
    deleted: bool
    """True for a tombstone (the item was deleted and not re-created since)."""
    version: int
    """The catalog version of this item's last write (upsert or delete)."""


@dataclass(frozen=True)
class Event:
    """One interaction of a user with an item."""

    user_id: str
    """The caller's user id; a user exists from their first event."""
    item_id: str
    """An item that was live when the event was stored."""
    timestamp: float
    """Seconds since the epoch."""
    seq: int = 0
    """Insertion order, assigned by the store (1, 2, 3, ... across all processes)."""


class Store:
    """The catalog and the events in one SQLite file; the only code that touches that file.

    Args:
        path: the database file, created with its tables if missing (parent directory included).
        synchronous: SQLite's ``PRAGMA synchronous``: ``"FULL"`` survives power loss, ``"NORMAL"``
            survives a process kill only (see the module docstring).
        busy_timeout_s: how long a write waits for another connection's write lock before failing.

    Raises:
        StoreError: the file is not a SQLite database or holds another schema version.
    """

    def __init__(self, path: str | Path, synchronous: str = "FULL", busy_timeout_s: float = 10.0) -> None:
        synchronous = str(synchronous).upper()
        if synchronous not in SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {SYNCHRONOUS_MODES}, got {synchronous!r}")
        if not busy_timeout_s >= 0:
            raise ValueError(f"busy_timeout_s must be >= 0, got {busy_timeout_s}")
        self.path = Path(path)
        self.synchronous = synchronous
        self.busy_timeout_s = float(busy_timeout_s)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._closed = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._create_schema()
        except sqlite3.DatabaseError as err:
            self.close()
            raise StoreError(f"{self.path}: cannot open as the serving store ({err})") from err

    # --- connections -----------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: no implicit transactions; every transaction below is explicit.
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
        conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    @property
    def _conn(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use."""
        if self._closed:
            raise StoreError(f"{self.path}: the store is closed")
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            with self._connections_lock:
                if self._closed:
                    conn.close()
                    raise StoreError(f"{self.path}: the store is closed")
                self._connections.append(conn)
            self._local.conn = conn
        return conn

    def close(self) -> None:
        """Close every thread's connection. Call once no thread uses the store any more."""
        with self._connections_lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: takes the write lock first, commits on success, rolls back on error."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: every query inside sees the same snapshot."""
        conn = self._conn
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    def _enable_wal(self, conn: sqlite3.Connection) -> str:
        """``PRAGMA journal_mode = WAL``, retried for up to ``busy_timeout_s``: when several processes open a
        new file at once, SQLite can answer "database is locked" here without waiting for the busy timeout."""
        deadline = time.monotonic() + self.busy_timeout_s
        while True:
            try:
                return conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)

    def _create_schema(self) -> None:
        conn = self._conn
        mode = self._enable_wal(conn)
        if mode.lower() != "wal":
            raise StoreError(f"{self.path}: SQLite refused WAL mode (journal_mode is {mode!r})")
        with self._write() as conn:
            # Statement by statement: executescript() would commit the transaction first.
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
            conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('catalog_version', 0)")
            found = _meta(conn, "schema_version")
            if found != SCHEMA_VERSION:
                raise StoreError(f"{self.path}: schema version {found}, this code reads version {SCHEMA_VERSION}")

    # --- seeding ---------------------------------------------------------------------------------
    def is_seeded(self) -> bool:
        """Whether :meth:`seed` has run on this file."""
        return _meta(self._conn, "seed") is not None

    def seed_info(self) -> dict | None:
        """``{"source", "seeded_at", "items", "events"}`` recorded by :meth:`seed`; None if never seeded."""
        raw = _meta(self._conn, "seed")
        return None if raw is None else json.loads(raw)

    def seed(
        self,
        items: Sequence[tuple[str, str, np.ndarray | None]],
        events: Sequence[tuple[str, str, float]],
        source: str,
    ) -> bool:
        """Fill an empty store in one transaction; a no-op returning False if it was seeded before.

        Items ``(item_id, text, features)`` get rows ``0..N-1`` in the given order and version 1;
        events ``(user_id, item_id, timestamp)`` are appended in the given order. When several
        processes race to seed the same file, exactly one seeds and the others return False.

        Raises:
            DataError: an invalid field (named with its value), a repeated item id, an event on an
                item not among ``items``, or features of two widths. Nothing is stored.
            StoreError: the store already holds items or events that were not seeded.
        """
        if self.is_seeded():  # the common restart: skip validating the data (checked again below, locked)
            return False
        rows: dict[str, int] = {}
        item_records = []
        feature_dim = None
        for row, (item_id, text, features) in enumerate(items):
            _check_id("item_id", item_id)
            if item_id in rows:
                raise DataError(f"seed: item_id {item_id!r} appears twice (rows {rows[item_id]} and {row})")
            blob, dim = _encode_features(item_id, text, features)
            if dim is not None:
                if feature_dim is not None and dim != feature_dim:
                    raise DataError(
                        f"seed: item_id {item_id!r} has features of width {dim}, earlier items have width {feature_dim}"
                    )
                feature_dim = dim
            rows[item_id] = row
            item_records.append((row, item_id, text, blob, dim))
        event_records = []
        for seq, (user_id, item_id, timestamp) in enumerate(events, start=1):
            _check_id("user_id", user_id)
            if item_id not in rows:
                raise DataError(f"seed: event {seq} (user_id {user_id!r}) refers to item_id {item_id!r}, not among the seeded items")
            event_records.append((seq, user_id, rows[item_id], _check_timestamp(timestamp)))

        start = time.perf_counter()
        with self._write() as conn:
            if _meta(conn, "seed") is not None:
                return False
            held = conn.execute("SELECT (SELECT COUNT(*) FROM items), (SELECT COUNT(*) FROM events)").fetchone()
            if held != (0, 0):
                raise StoreError(
                    f"{self.path}: cannot seed a store that already holds {held[0]} items and {held[1]} events"
                )
            version = _bump_catalog_version(conn)
            conn.executemany(_INSERT_ITEM, [(*record, version) for record in item_records])
            conn.executemany("INSERT INTO events (seq, user_id, item_row, timestamp) VALUES (?, ?, ?, ?)", event_records)
            conn.executemany("INSERT OR IGNORE INTO users (user_id) VALUES (?)", ((r[1],) for r in event_records))
            if feature_dim is not None:
                _set_meta(conn, "feature_dim", feature_dim)
            info = {"source": source, "seeded_at": time.time(), "items": len(item_records), "events": len(event_records)}
            _set_meta(conn, "seed", json.dumps(info))
        log.info(
            "seeded %s from %s: %d items, %d events in %.2f s",
            self.path, source, len(item_records), len(event_records), time.perf_counter() - start,
        )  # fmt: skip
        return True

    # --- catalog ---------------------------------------------------------------------------------
    def upsert_item(self, item_id: str, text: str, features: np.ndarray | None = None) -> tuple[Item, bool]:
        """Create or replace an item (PUT semantics: ``features=None`` leaves the item without features).

        Returns:
            ``(item, created)``: ``created`` is True for a new id and for a revived deleted one. A new
            id takes the next free row; an existing id (live or deleted) keeps its row.

        Raises:
            DataError: an empty id, a non-string text, non-finite features, or features whose width
                differs from the catalog's (fixed by the first features ever stored).
        """
        _check_id("item_id", item_id)
        blob, dim = _encode_features(item_id, text, features)
        with self._write() as conn:
            _check_feature_dim(conn, item_id, dim)
            found = conn.execute("SELECT row, deleted FROM items WHERE item_id = ?", (item_id,)).fetchone()
            version = _bump_catalog_version(conn)
            if found is None:
                row = conn.execute("SELECT COALESCE(MAX(row) + 1, 0) FROM items").fetchone()[0]
                conn.execute(_INSERT_ITEM, (row, item_id, text, blob, dim, version))
                created = True
            else:
                row, created = found[0], bool(found[1])
                conn.execute(
                    "UPDATE items SET text = ?, features = ?, feature_dim = ?, deleted = 0, version = ? WHERE row = ?",
                    (text, blob, dim, version, row),
                )
        return Item(row, item_id, text, _decode_features(blob), False, version), created

    def get_item(self, item_id: str) -> Item | None:
        """The live item with this id; None if unknown or deleted."""
        found = self._conn.execute(f"SELECT {_ITEM_COLUMNS} FROM items WHERE item_id = ? AND deleted = 0", (item_id,)).fetchone()
        return None if found is None else _item(found)

    def get_items(self, item_ids: Sequence[str]) -> dict[str, Item]:
        """``{item_id: Item}`` for the live items among ``item_ids`` (unknown and deleted ids are absent)."""
        ids = list(dict.fromkeys(item_ids))
        out: dict[str, Item] = {}
        with self._read() as conn:
            for start in range(0, len(ids), _IN_CHUNK):
                chunk = ids[start : start + _IN_CHUNK]
                marks = ", ".join("?" * len(chunk))
                query = f"SELECT {_ITEM_COLUMNS} FROM items WHERE item_id IN ({marks}) AND deleted = 0"
                out.update((found[1], _item(found)) for found in conn.execute(query, chunk))
        return out

    def delete_item(self, item_id: str) -> Item | None:
        """Tombstone a live item (its row, text and features are kept); None if unknown or already deleted."""
        with self._write() as conn:
            found = conn.execute("SELECT row FROM items WHERE item_id = ? AND deleted = 0", (item_id,)).fetchone()
            if found is None:
                return None
            version = _bump_catalog_version(conn)
            conn.execute("UPDATE items SET deleted = 1, version = ? WHERE row = ?", (version, found[0]))
            item = conn.execute(f"SELECT {_ITEM_COLUMNS} FROM items WHERE row = ?", (found[0],)).fetchone()
        return _item(item)

    def items(self, since_version: int = 0) -> list[Item]:
        """Every item, live and deleted, written after ``since_version``, ordered by row.

        ``items(0)`` is the whole catalog. To refresh a cache, prefer :meth:`catalog_changes`, which
        also says up to which version the answer goes.
        """
        return self.catalog_changes(since_version)[1]

    def catalog_changes(self, since_version: int = 0) -> tuple[int, list[Item]]:
        """``(catalog_version, items written after since_version)`` read from one snapshot.

        A replica that applies the items and remembers the returned version misses no write and
        sees none twice, however the reads interleave with other processes' writes.
        """
        with self._read() as conn:
            version = _meta(conn, "catalog_version")
            # Sorted here, not by ORDER BY row: that makes SQLite scan the whole table instead of
            # searching the version index, and a refresh usually asks for a handful of changes.
            found = conn.execute(f"SELECT {_ITEM_COLUMNS} FROM items WHERE version > ?", (int(since_version),)).fetchall()
        return version, [_item(f) for f in sorted(found)]

    def catalog_version(self) -> int:
        """The catalog's write counter: bumped by every upsert and delete, by any process on this file."""
        return _meta(self._conn, "catalog_version")

    def num_items(self, include_deleted: bool = False) -> int:
        """Live items, or every row ever allocated with ``include_deleted``."""
        where = "" if include_deleted else " WHERE deleted = 0"
        return self._conn.execute(f"SELECT COUNT(*) FROM items{where}").fetchone()[0]

    def feature_dim(self) -> int | None:
        """The width every item's features must have; None until the first features are stored."""
        return _meta(self._conn, "feature_dim")

    # --- events ----------------------------------------------------------------------------------
    def append_events(self, events: Sequence[tuple[str, str, float | None]]) -> list[Event]:
        """Store ``(user_id, item_id, timestamp)`` events (timestamp None = now) in one transaction.

        All or nothing: an invalid field, or an item that is unknown or deleted, stores none of the
        batch. A user id unseen before becomes a user.

        Returns:
            The stored events, in the given order, with their ``seq``.

        Raises:
            DataError: naming the first bad field and its value, or the first unknown/deleted item id.
        """
        now = time.time()
        checked = []
        for user_id, item_id, timestamp in events:
            _check_id("user_id", user_id)
            _check_id("item_id", item_id)
            checked.append((user_id, item_id, now if timestamp is None else _check_timestamp(timestamp)))
        if not checked:
            return []
        distinct = list(dict.fromkeys(item_id for _, item_id, _ in checked))
        with self._write() as conn:
            live: dict[str, int] = {}
            for start in range(0, len(distinct), _IN_CHUNK):
                chunk = distinct[start : start + _IN_CHUNK]
                marks = ", ".join("?" * len(chunk))
                query = f"SELECT item_id, row FROM items WHERE item_id IN ({marks}) AND deleted = 0"
                live.update(conn.execute(query, chunk))
            for item_id in distinct:
                if item_id not in live:
                    raise DataError(f"item_id {item_id!r} is not in the catalog (unknown or deleted); no event was stored")
            first = conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM events").fetchone()[0]
            stored = [Event(u, i, t, seq) for seq, (u, i, t) in enumerate(checked, start=first)]
            conn.executemany(
                "INSERT INTO events (seq, user_id, item_row, timestamp) VALUES (?, ?, ?, ?)",
                [(e.seq, e.user_id, live[e.item_id], e.timestamp) for e in stored],
            )
            conn.executemany("INSERT OR IGNORE INTO users (user_id) VALUES (?)", ((u,) for u in {e.user_id for e in stored}))
        return stored

    def history(self, user_id: str, limit: int | None = None) -> list[str]:
        """The user's item ids, oldest first, ordered by ``(timestamp, seq)``; one entry per event.

        Events on items that are deleted now are skipped; ``limit`` keeps the most recent ``limit``
        of the rest. An unknown user has an empty history.
        """
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise DataError(f"limit must be a non-negative integer or None, got {limit!r}")
        found = self._conn.execute(
            "SELECT items.item_id FROM events JOIN items ON items.row = events.item_row "
            "WHERE events.user_id = ? AND items.deleted = 0 ORDER BY events.timestamp DESC, events.seq DESC LIMIT ?",
            (user_id, -1 if limit is None else limit),
        ).fetchall()
        return [item_id for (item_id,) in reversed(found)]

    def seen(self, user_id: str) -> set[str]:
        """Every item id the user has an event on, deleted items included."""
        found = self._conn.execute(
            "SELECT DISTINCT items.item_id FROM events JOIN items ON items.row = events.item_row WHERE events.user_id = ?",
            (user_id,),
        )
        return {item_id for (item_id,) in found}

    def has_user(self, user_id: str) -> bool:
        """Whether the user has at least one event."""
        return self._conn.execute("SELECT 1 FROM users WHERE user_id = ?", (user_id,)).fetchone() is not None

    def num_users(self) -> int:
        return self._conn.execute("SELECT COUNT(*) FROM users").fetchone()[0]

    def num_events(self) -> int:
        return self._conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]


def seed_from_dataset(
    store: Store, dataset: InteractionDataset, features: np.ndarray | None = None, source: str | None = None
) -> bool:
    """Seed ``store`` with a dataset (e.g. MovieLens-100K) unless it was seeded before.

    Item ``item_idx`` gets row ``item_idx``; item and user ids become strings (``str(id)``); the
    interactions go in the dataset's order, so each user's :meth:`Store.history` is the dataset's
    time order with the same tie-break.

    Args:
        features: optional ``(num_items, feature_dim)`` item vectors, row ``item_idx``.
        source: provenance recorded in the store; default ``"<name> <data fingerprint>"``.

    Returns:
        What :meth:`Store.seed` returns: False when the store was already seeded.
    """
    if store.is_seeded():
        return False
    if features is not None and (np.ndim(features) != 2 or len(features) != dataset.num_items):
        raise DataError(
            f"{dataset.name}: features must have shape (num_items={dataset.num_items}, feature_dim), "
            f"got {np.shape(features)}"
        )
    item_ids = [str(item_id) for item_id in dataset.items["item_id"]]
    items = [
        (item_id, text, None if features is None else features[row])
        for row, (item_id, text) in enumerate(zip(item_ids, dataset.items["text"]))
    ]
    frame = dataset.interactions
    user_ids = [str(user_id) for user_id in dataset.user_ids]
    events = [
        (user_ids[u], item_ids[i], float(t))
        for u, i, t in zip(frame["user_idx"].tolist(), frame["item_idx"].tolist(), frame["timestamp"].tolist())
    ]
    return store.seed(items, events, source=source or f"{dataset.name} {dataset.fingerprint()}")


# --- helpers ---------------------------------------------------------------------------------------
_ITEM_COLUMNS = "row, item_id, text, features, deleted, version"
_INSERT_ITEM = "INSERT INTO items (row, item_id, text, features, feature_dim, deleted, version) VALUES (?, ?, ?, ?, ?, 0, ?)"


def _item(found: tuple) -> Item:
    row, item_id, text, blob, deleted, version = found
    return Item(row=row, item_id=item_id, text=text, features=_decode_features(blob), deleted=bool(deleted), version=version)


def _meta(conn: sqlite3.Connection, key: str):
    found = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if found is None else found[0]


def _set_meta(conn: sqlite3.Connection, key: str, value) -> None:
    conn.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value))


def _bump_catalog_version(conn: sqlite3.Connection) -> int:
    """Increment the catalog version inside the caller's write transaction; returns the new value."""
    conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'catalog_version'")
    return _meta(conn, "catalog_version")


def _check_feature_dim(conn: sqlite3.Connection, item_id: str, dim: int | None) -> None:
    """Refuse features of another width than the catalog's; the first features stored fix the width."""
    if dim is None:
        return
    expected = _meta(conn, "feature_dim")
    if expected is None:
        _set_meta(conn, "feature_dim", dim)
    elif dim != expected:
        raise DataError(f"features of item_id {item_id!r} have width {dim}, the catalog's items have width {expected}")


def _check_id(field: str, value: object) -> None:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{field} must be a non-empty string, got {value!r}")


def _check_timestamp(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise DataError(f"timestamp must be a number of seconds since the epoch, got {value!r}")
    if not math.isfinite(value):
        raise DataError(f"timestamp must be finite, got {value!r}")
    return float(value)


def _encode_features(item_id: str, text: object, features: np.ndarray | None) -> tuple[bytes | None, int | None]:
    """Check an item's text and features; return the features as float32 bytes and their width."""
    if not isinstance(text, str):
        raise DataError(f"text of item_id {item_id!r} must be a string, got {text!r}")
    if features is None:
        return None, None
    array = np.asarray(features)
    numeric = np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
    if array.ndim != 1 or array.size == 0 or not numeric:
        raise DataError(
            f"features of item_id {item_id!r} must be a non-empty 1-D numeric vector, got dtype {array.dtype} shape {array.shape}"
        )
    with np.errstate(over="ignore"):  # values beyond float32's range become inf and are refused below
        stored = array.astype(FEATURE_DTYPE)
    bad = np.flatnonzero(~np.isfinite(stored))  # catches inf/nan and values beyond float32's range
    if len(bad):
        raise DataError(
            f"features of item_id {item_id!r} must be finite float32 values, got {array[bad[0]]} at index {bad[0]} "
            f"({len(bad)} such values)"
        )
    return stored.tobytes(), len(stored)


def _decode_features(blob: bytes | None) -> np.ndarray | None:
    return None if blob is None else np.frombuffer(blob, dtype=FEATURE_DTYPE).astype(np.float32)
