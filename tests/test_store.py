"""The serving store: seeding, stable rows, catalog versions, histories, validation, and kill -9."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from mixllm.errors import DataError
from serving.store import Store, StoreError, seed_from_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "store.db") as opened:
        yield opened


def _catalog(num_items: int = 5, dim: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [(f"item-{k}", f"text {k}", rng.standard_normal(dim).astype(np.float32)) for k in range(num_items)]


def _run_children(tmp_path: Path, body: str, args_per_child: list[list[str]]) -> list[str]:
    """Run one Python script per argument list, started together behind a file barrier; their stdouts."""
    script = tmp_path / "child.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, sys, time
            from pathlib import Path
            import numpy as np
            from serving.store import Store

            barrier, count, path = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
            args = sys.argv[4:]
            store = Store(path)
            (barrier / str(os.getpid())).touch()
            deadline = time.monotonic() + 30
            while len(list(barrier.iterdir())) < count:
                if time.monotonic() > deadline:  # a sibling died before the barrier: fail, do not hang
                    sys.exit(f"barrier: {len(list(barrier.iterdir()))} of {count} children arrived in 30 s")
                time.sleep(0.001)
            """
        )
        + textwrap.dedent(body)
    )
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(barrier), str(len(args_per_child)), str(tmp_path / "store.db"), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env,
        )  # fmt: skip
        for args in args_per_child
    ]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        outs.append(out)
    return outs


# --- seeding ---------------------------------------------------------------------------------------
def test_seed_gives_rows_in_order_and_is_idempotent(store):
    items = _catalog()
    events = [("u1", "item-3", 10.0), ("u2", "item-0", 11.0), ("u1", "item-1", 12.0)]
    assert not store.is_seeded() and store.seed_info() is None
    assert store.seed(items, events, source="tiny abc123")
    assert [(it.row, it.item_id, it.text, it.deleted) for it in store.items()] == [
        (k, f"item-{k}", f"text {k}", False) for k in range(5)
    ]
    assert store.seed(items, events, source="again") is False
    assert (store.num_items(), store.num_events(), store.num_users()) == (5, 3, 2)
    assert store.seed_info()["source"] == "tiny abc123" and store.is_seeded()
    assert store.history("u1") == ["item-3", "item-1"]


def test_racing_processes_seed_exactly_once(tmp_path):
    body = """
        items = [(f"i{k}", f"text {k}", np.full(8, k, dtype=np.float32)) for k in range(300)]
        events = [(f"u{k % 17}", f"i{k % 300}", float(k)) for k in range(3000)]
        print(store.seed(items, events, source=args[0]))
    """
    outs = _run_children(tmp_path, body, [[f"child-{n}"] for n in range(3)])
    assert sorted(out.strip() for out in outs) == ["False", "False", "True"]
    with Store(tmp_path / "store.db") as store:
        assert (store.num_items(), store.num_events(), store.num_users(), store.catalog_version()) == (300, 3000, 17, 1)
        assert [it.row for it in store.items()] == list(range(300))
        winner = next(n for n, out in enumerate(outs) if out.strip() == "True")
        assert store.seed_info()["source"] == f"child-{winner}"


def test_seed_from_dataset_keeps_item_rows_and_user_sequences(store):
    from mixllm.data import make_synthetic_dataset

    dataset = make_synthetic_dataset(num_users=6, num_items=20, max_length=10, seed=3)  # first two events of a user tie in time
    features = np.random.default_rng(0).standard_normal((20, 5)).astype(np.float32)
    assert seed_from_dataset(store, dataset, features) and not seed_from_dataset(store, dataset, features)
    assert [(it.row, it.item_id) for it in store.items()] == [(k, str(i)) for k, i in enumerate(dataset.items["item_id"])]
    assert store.get_item(str(dataset.items["item_id"][7])).features.tobytes() == features[7].tobytes()
    assert store.seed_info()["source"] == f"synthetic {dataset.fingerprint()}"
    ids = dataset.items["item_id"].astype(str).to_numpy()
    for user_idx, user_id in enumerate(dataset.user_ids):
        assert store.history(str(user_id)) == ids[dataset.user_sequence(user_idx)].tolist()


def test_seed_refuses_a_store_written_before_seeding(store):
    store.upsert_item("early", "text")
    with pytest.raises(StoreError, match="already holds 1 items"):
        store.seed(_catalog(), [], source="late")
    assert not store.is_seeded()


# --- catalog ---------------------------------------------------------------------------------------
def test_upsert_keeps_rows_stable_and_bumps_versions(store):
    store.seed(_catalog(3), [], source="s")  # rows 0..2, version 1
    new, created = store.upsert_item("new", "first text")
    assert (new.row, new.version, created) == (3, 2, True)
    updated, created = store.upsert_item("item-1", "replaced")
    assert (updated.row, updated.version, updated.text, updated.features, created) == (1, 3, "replaced", None, False)
    gone = store.delete_item("new")
    assert (gone.row, gone.deleted, gone.version) == (3, True, 4)
    assert store.get_item("new") is None and store.delete_item("new") is None
    another, _ = store.upsert_item("another", "t")
    assert another.row == 4  # a tombstoned row is never handed to another id
    revived, created = store.upsert_item("new", "second text")
    assert (revived.row, revived.deleted, revived.version, created) == (3, False, 6, True)
    assert store.get_item("new") == revived
    assert store.catalog_version() == 6
    assert (store.num_items(), store.num_items(include_deleted=True)) == (5, 5)


def test_items_since_version_returns_exactly_the_changes(store):
    store.seed(_catalog(4), [], source="s")
    version = store.catalog_version()
    store.upsert_item("item-2", "changed")
    store.delete_item("item-0")
    store.upsert_item("added", "t")
    store.delete_item("added")
    changes = store.items(since_version=version)
    assert [(it.item_id, it.row, it.deleted) for it in changes] == [("item-0", 0, True), ("item-2", 2, False), ("added", 4, True)]
    latest, nothing = store.catalog_changes(since_version=store.catalog_version())
    assert nothing == [] and latest == version + 4
    assert len(store.items(0)) == 5 and store.get_items(["item-0", "item-2", "added", "unknown"]).keys() == {"item-2"}


def test_replica_sees_another_store_objects_writes(tmp_path):
    with Store(tmp_path / "store.db") as writer, Store(tmp_path / "store.db") as replica:
        writer.seed(_catalog(2), [], source="s")
        version, catalog = replica.catalog_changes(0)
        assert version == 1 and len(catalog) == 2
        writer.upsert_item("fresh", "t")
        writer.delete_item("item-1")
        assert replica.catalog_version() == 3
        assert [(it.item_id, it.deleted) for it in replica.items(version)] == [("item-1", True), ("fresh", False)]
        replica.upsert_item("from-replica", "t")  # either side writes; the counter is shared
        assert writer.catalog_version() == 4 and writer.get_item("from-replica").row == 3


def test_opening_retries_wal_mode_while_another_opener_holds_the_file(tmp_path):
    """Processes opening one new file at once: SQLite can answer "database is locked" to the WAL switch
    without waiting (seen as 1 in ~15 openings of 3 processes at once). Opening retries it for
    busy_timeout_s; with no time to wait, the error names the file."""
    import sqlite3

    class Locked(Store):
        def __init__(self, *args, **kwargs):
            self.refusals = 2
            super().__init__(*args, **kwargs)

        def _connect(self):
            conn = super()._connect()
            store = self

            class Once:  # the first journal_mode switches are refused, as the racing opener sees them
                def execute(self, sql, *args):
                    if sql.startswith("PRAGMA journal_mode") and store.refusals:
                        store.refusals -= 1
                        raise sqlite3.OperationalError("database is locked")
                    return conn.execute(sql, *args)

                def __getattr__(self, name):
                    return getattr(conn, name)

            return Once()

    with Locked(tmp_path / "a.db", busy_timeout_s=5.0) as store:
        assert store.refusals == 0  # both refusals were met, and waited out
        assert store.catalog_version() == 0
    with pytest.raises(StoreError, match=r"b\.db: cannot open as the serving store \(database is locked"):
        Locked(tmp_path / "b.db", busy_timeout_s=0.0)


def test_concurrent_threads_and_processes_get_distinct_rows_and_versions(tmp_path):
    body = """
        import threading
        def work(thread):
            for k in range(15):
                store.upsert_item(f"{args[0]}-{thread}-{k}", "t")
                store.append_events([(f"user-{args[0]}", f"{args[0]}-{thread}-{k}", None)])
        threads = [threading.Thread(target=work, args=(t,)) for t in range(2)]
        for t in threads: t.start()
        for t in threads: t.join()
    """
    _run_children(tmp_path, body, [["a"], ["b"]])
    with Store(tmp_path / "store.db") as store:
        items = store.items()
        assert sorted(it.row for it in items) == list(range(60))
        assert sorted(it.version for it in items) == list(range(1, 61)) and store.catalog_version() == 60
        assert store.num_events() == 60 and store.num_users() == 2
        assert len(store.history("user-a")) == len(store.history("user-b")) == 30


# --- events ----------------------------------------------------------------------------------------
def test_history_orders_by_time_then_insertion_keeps_most_recent_and_skips_deleted(store):
    store.seed([(f"m{k}", "t", None) for k in range(6)], [], source="s")
    store.append_events([("u", "m0", 30.0), ("u", "m1", 10.0), ("u", "m2", 20.0)])
    store.append_events([("u", "m3", 20.0), ("u", "m4", 10.0), ("other", "m5", 1.0)])
    assert store.history("u") == ["m1", "m4", "m2", "m3", "m0"]  # ties keep insertion order
    assert store.history("u", limit=2) == ["m3", "m0"]
    assert store.history("u", limit=0) == [] and store.history("nobody") == []
    store.delete_item("m2")
    assert store.history("u") == ["m1", "m4", "m3", "m0"]
    assert store.history("u", limit=3) == ["m4", "m3", "m0"]  # the limit counts live items
    store.upsert_item("m2", "back")
    assert store.history("u") == ["m1", "m4", "m2", "m3", "m0"]


def test_seen_has_every_item_with_an_event_deleted_ones_included(store):
    store.seed([(f"m{k}", "t", None) for k in range(4)], [("u", "m0", 1.0), ("u", "m1", 2.0), ("u", "m0", 3.0)], source="s")
    store.delete_item("m1")
    assert store.seen("u") == {"m0", "m1"} and store.seen("nobody") == set()
    assert store.has_user("u") and not store.has_user("nobody")


def test_append_events_is_all_or_nothing(store):
    store.seed([("a", "t", None), ("b", "t", None)], [], source="s")
    store.delete_item("b")
    with pytest.raises(DataError, match="item_id 'b'"):
        store.append_events([("new-user", "a", 1.0), ("new-user", "b", 2.0), ("new-user", "zzz", 3.0)])
    assert store.num_events() == 0 and not store.has_user("new-user")
    stored = store.append_events([("new-user", "a", 1.0), ("new-user", "a", None)])
    assert [e.seq for e in stored] == [1, 2] and abs(stored[1].timestamp - time.time()) < 60
    assert store.append_events([]) == []


# --- validation ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "write, field, value",
    [
        (lambda s: s.upsert_item("", "t"), "item_id", "''"),
        (lambda s: s.upsert_item("  ", "t"), "item_id", "'  '"),
        (lambda s: s.upsert_item(7, "t"), "item_id", "7"),
        (lambda s: s.upsert_item("x", None), "text", "None"),
        (lambda s: s.upsert_item("x", "t", np.array([1.0, np.nan])), "features", "nan"),
        (lambda s: s.upsert_item("x", "t", np.array([1.0, -np.inf])), "features", "-inf"),
        (lambda s: s.upsert_item("x", "t", np.array([1e39])), "features", "1e+39"),
        (lambda s: s.upsert_item("x", "t", np.zeros((2, 2))), "features", "(2, 2)"),
        (lambda s: s.append_events([("", "a", 1.0)]), "user_id", "''"),
        (lambda s: s.append_events([("u", "a", float("nan"))]), "timestamp", "nan"),
        (lambda s: s.append_events([("u", "a", float("inf"))]), "timestamp", "inf"),
        (lambda s: s.append_events([("u", "a", "yesterday")]), "timestamp", "'yesterday'"),
        (lambda s: s.append_events([("u", "missing", 1.0)]), "item_id", "'missing'"),
        (lambda s: s.seed([("d", "t", None), ("d", "t", None)], [], "s"), "item_id", "'d'"),
        (lambda s: s.seed([("d", "t", None)], [("u", "e", 1.0)], "s"), "item_id", "'e'"),
        (lambda s: s.history("u", limit=-1), "limit", "-1"),
    ],
)
def test_data_errors_name_the_field_and_the_value(store, write, field, value):
    store.upsert_item("a", "t")
    with pytest.raises(DataError) as err:
        write(store)
    assert field in str(err.value) and value in str(err.value)


def test_features_round_trip_bit_exactly(tmp_path):
    rng = np.random.default_rng(1)
    special = np.array([0.0, -0.0, 1e-45, -3.4028235e38, np.float32(1) / 3], dtype=np.float32)  # incl. a subnormal
    features = np.concatenate([rng.standard_normal(443).astype(np.float32), special])
    with Store(tmp_path / "store.db") as store:
        store.seed([("seeded", "t", features)], [], source="s")
        store.upsert_item("upserted", "t", features[::-1])
    with Store(tmp_path / "store.db") as store:  # copies of the same float32 bytes: exact equality holds
        got = store.get_items(["seeded", "upserted"])
        assert got["seeded"].features.dtype == np.float32
        assert got["seeded"].features.tobytes() == features.tobytes()
        assert got["upserted"].features.tobytes() == features[::-1].tobytes()


def test_features_of_another_width_are_refused(store):
    store.upsert_item("a", "t", np.zeros(4, dtype=np.float32))
    with pytest.raises(DataError, match=r"item_id 'b'.* width 3.* width 4"):
        store.upsert_item("b", "t", np.zeros(3, dtype=np.float32))
    assert store.get_item("b") is None and store.catalog_version() == 1
    store.upsert_item("c", "no features")  # an item without features is always fine
    with Store(store.path.with_name("other.db")) as other, pytest.raises(DataError, match=r"'y'.* width 2.* width 3"):
        other.seed([("x", "t", np.zeros(3)), ("y", "t", np.zeros(2))], [], "s")


def test_a_file_that_is_not_a_database_is_refused(tmp_path):
    path = tmp_path / "notes.db"
    path.write_text("not a database, just text " * 100)
    with pytest.raises(StoreError, match="notes.db"):
        Store(path)


# --- durability ------------------------------------------------------------------------------------
CRASH_WRITER = """
import sys
import numpy as np
from serving.store import Store

path, tag = sys.argv[1], sys.argv[2]
store = Store(path)
rng = np.random.default_rng(int(tag[1:]))
print("ready", flush=True)
k = 0
while True:
    item_id = f"{tag}-{k}"
    features = rng.standard_normal(16).astype(np.float32)
    item, _ = store.upsert_item(item_id, f"text {k}", features)
    print("item", item_id, item.row, item.version, features.tobytes().hex(), flush=True)
    (event,) = store.append_events([(f"user-{tag}", item_id, float(k))])
    print("event", item_id, event.seq, flush=True)
    if k % 5 == 4:
        gone = store.delete_item(f"{tag}-{k - 2}")
        print("delete", gone.item_id, gone.version, flush=True)
    k += 1
"""


def test_kill_9_keeps_every_acknowledged_write(tmp_path):
    """A writer prints a line after each committed write; SIGKILL at a random moment loses none of them."""
    script = tmp_path / "writer.py"
    script.write_text(CRASH_WRITER)
    path = tmp_path / "store.db"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rng = random.Random(0)
    rows_so_far: set[int] = set()
    for round_ in range(3):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(path), f"r{round_}"], stdout=subprocess.PIPE, text=True, cwd=REPO, env=env
        )
        try:
            assert proc.stdout.readline() == "ready\n"
            time.sleep(rng.uniform(0.2, 1.0))
        finally:
            proc.kill()  # SIGKILL: no cleanup, no close, possibly in the middle of a transaction
        output = proc.stdout.read()
        proc.wait()
        acknowledged = [line.split() for line in output.split("\n")[:-1]]  # a cut-off last line is not counted
        events = [a for a in acknowledged if a[0] == "event"]
        assert events, f"round {round_}: the writer acknowledged no event before the kill"

        with Store(path) as store:
            catalog = {item.item_id: item for item in store.items()}
            assert sorted(item.row for item in catalog.values()) == list(range(len(catalog)))
            for kind, item_id, *rest in acknowledged:
                item = catalog[item_id]
                if kind == "item":
                    assert item.row == int(rest[0]) and item.version >= int(rest[1])
                    assert item.features.tobytes().hex() == rest[2]
                    rows_so_far.add(item.row)
                elif kind == "delete":
                    assert item.deleted and item.version >= int(rest[0])
            assert {item_id for _, item_id, _ in events} <= store.seen(f"user-r{round_}")
            assert store.num_events() >= max(int(seq) for _, _, seq in events)
            assert store.catalog_version() >= max(int(a[3]) for a in acknowledged if a[0] == "item")
    assert len(rows_so_far) >= 3  # rows kept growing on the same file across rounds
