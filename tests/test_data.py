"""Datasets, item text, the user-data loader's validation, and the leave-one-out split (no leakage)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mixllm.data import (
    PAD,
    InteractionDataset,
    item_text,
    leave_one_out,
    load_dataset,
    load_movielens_100k,
    load_user_dataset,
    make_synthetic_dataset,
)
from mixllm.data.movielens import GENRES
from mixllm.errors import DataError


# --- item text ------------------------------------------------------------------------------------
def test_item_text_format():
    assert item_text("Toy Story (1995)", ["Animation", "Children's", "Comedy"]) == (
        "Toy Story (1995); genres: Animation, Children's, Comedy"
    )
    assert item_text("  Heat (1995) ", []) == "Heat (1995); genres: none"


# --- dataset container ---------------------------------------------------------------------------
def test_interactions_sorted_by_time_with_ties_broken_by_item_id():
    interactions = pd.DataFrame(
        {
            "user_id": [7, 7, 7, 7, 3, 3, 3],
            "item_id": ["c", "a", "b", "d", "a", "b", "c"],
            "timestamp": [5, 9, 5, 1, 2, 2, 2],
        }
    )
    items = pd.DataFrame({"item_id": ["d", "c", "b", "a"], "text": ["D", "C", "B", "A"]})  # idx: d=0 c=1 b=2 a=3
    shuffled = interactions.sample(frac=1.0, random_state=0)
    for frame in (interactions, shuffled):
        ds = InteractionDataset.from_frames("t", frame, items)
        assert list(ds.user_ids) == [3, 7]
        # user 3: all at t=2 -> a, b, c by id; user 7: d(1), then b, c tie at 5 -> b, c; then a(9)
        assert [ds.items["item_id"][i] for i in ds.user_sequence(0)] == ["a", "b", "c"]
        assert [ds.items["item_id"][i] for i in ds.user_sequence(1)] == ["d", "b", "c", "a"]


def test_repeated_pairs_keep_earliest():
    interactions = pd.DataFrame({"user_id": [1] * 5, "item_id": [1, 2, 1, 3, 4], "timestamp": [1, 2, 3, 4, 5]})
    items = pd.DataFrame({"item_id": [1, 2, 3, 4], "text": list("abcd")})
    ds = InteractionDataset.from_frames("t", interactions, items)
    assert ds.user_sequence(0).tolist() == [0, 1, 2, 3]


# --- leave-one-out ---------------------------------------------------------------------------------
def assert_no_leakage(ds: InteractionDataset) -> None:
    split = leave_one_out(ds)
    frame = ds.interactions
    train = split.train_interactions()
    assert len(train) == ds.num_interactions - 2 * ds.num_users
    train_pairs = set(zip(train["user_idx"], train["item_idx"]))
    for user in range(ds.num_users):
        full = ds.user_sequence(user)
        valid, test = split.valid_targets[user], split.test_targets[user]
        train_seq = split.train_sequence(user)
        assert train_seq.tolist() + [valid, test] == full.tolist()
        # Neither target (nor anything after the validation target) is in the training split.
        assert (user, valid) not in train_pairs and (user, test) not in train_pairs
        assert valid not in train_seq and test not in train_seq
        times = frame.loc[frame["user_idx"] == user, "timestamp"].to_numpy()
        assert times[: len(train_seq)].max() <= times[-2] <= times[-1]
        # The history before each target holds only earlier interactions.
        valid_hist = split.histories("valid", 1000, np.array([user]))[0]
        test_hist = split.histories("test", 1000, np.array([user]))[0]
        assert valid_hist[valid_hist != PAD].tolist() == train_seq.tolist()
        assert test_hist[test_hist != PAD].tolist() == train_seq.tolist() + [valid]
        assert split.sequence_before("test", user).tolist() == train_seq.tolist() + [valid]
    # Training item counts come from the training split only.
    assert split.train_item_counts().sum() == len(train)


def test_leave_one_out_has_no_leakage():
    assert_no_leakage(make_synthetic_dataset(num_users=30, num_items=40, seed=3))


def test_histories_keep_last_h_left_padded():
    ds = make_synthetic_dataset(num_users=4, num_items=30, min_length=6, max_length=6, seed=1)
    split = leave_one_out(ds)
    seq = ds.user_sequence(0)
    assert split.histories("valid", 3)[0].tolist() == seq[1:4].tolist()
    assert split.histories("test", 3)[0].tolist() == seq[2:5].tolist()
    padded = split.histories("valid", 6)[0]
    assert padded.tolist() == [PAD, PAD] + seq[:4].tolist()
    assert split.histories("valid", 0).shape == (4, 0)
    assert split.histories("test", 10, np.array([2, 0])).shape == (2, 10)


def test_interaction_mask_covers_every_split():
    ds = make_synthetic_dataset(num_users=5, num_items=20, seed=2)
    split = leave_one_out(ds)
    mask = split.interaction_mask(np.arange(5))
    for user in range(5):
        assert set(np.flatnonzero(mask[user])) == set(ds.user_sequence(user).tolist())


# --- user data ------------------------------------------------------------------------------------
def write_user_data(folder, fmt="csv", interactions=None, items=None):
    folder.mkdir(parents=True, exist_ok=True)
    if interactions is None:
        interactions = pd.DataFrame(
            {
                "user_id": ["alice"] * 4 + ["bob"] * 3,
                "item_id": [10, 11, 12, 13, 12, 10, 14],
                "timestamp": [1, 2, 3, 4, 10, 11, 12],
                "rating": [5, 4, 3, 5, 2, 1, 4],
            }
        )
    if items is None:
        items = pd.DataFrame({"item_id": [10, 11, 12, 13, 14], "text": ["a; genres: x", "b", "c", "d", "e"]})
    paths = folder / f"interactions.{fmt}", folder / f"items.{fmt}"
    for frame, path in zip((interactions, items), paths):
        frame.to_csv(path, index=False) if fmt == "csv" else frame.to_parquet(path, index=False)
    return paths


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_user_data_loads(tmp_path, fmt):
    ds = load_user_dataset(*write_user_data(tmp_path / "shop", fmt))
    assert (ds.name, ds.num_users, ds.num_items, ds.num_interactions) == ("shop", 2, 5, 7)
    assert list(ds.user_ids) == ["alice", "bob"]
    assert ds.items["item_id"].tolist() == [10, 11, 12, 13, 14]
    assert ds.user_sequence(1).tolist() == [2, 0, 4]  # bob: 12, 10, 14
    assert ds.interactions["rating"].tolist()[:2] == [5.0, 4.0]
    # The folder form used by the CLI gives the same dataset.
    same = load_dataset(tmp_path / "shop")
    assert same.fingerprint() == ds.fingerprint()
    assert_no_leakage(ds)


def test_user_data_datetime_strings_and_images(tmp_path):
    (tmp_path / "img.png").write_bytes(b"\x89PNG")
    interactions = pd.DataFrame(
        {"user_id": [1, 1, 1], "item_id": [2, 1, 3], "timestamp": ["2024-01-03", "2024-01-01 10:00", "2024-02-01"]}
    )
    items = pd.DataFrame({"item_id": [1, 2, 3], "text": ["a", "b", "c"], "image_path": ["img.png", None, ""]})
    ds = load_user_dataset(*write_user_data(tmp_path, "csv", interactions, items))
    assert ds.user_sequence(0).tolist() == [0, 1, 2]  # ordered by parsed time
    assert ds.items["image_path"][0] == str((tmp_path / "img.png").resolve())
    assert ds.items["image_path"][1] is None and ds.items["image_path"][2] is None


def expect_error(tmp_path, match, fmt="csv", **frames):
    paths = write_user_data(tmp_path, fmt, **frames)
    with pytest.raises(DataError, match=match) as info:
        load_user_dataset(*paths)
    return str(info.value)


def test_missing_column_is_named(tmp_path):
    bad = pd.DataFrame({"user_id": [1, 1, 1], "item_id": [10, 11, 12], "time": [1, 2, 3]})
    message = expect_error(tmp_path, "missing column 'timestamp'", interactions=bad)
    assert "interactions.csv" in message and "found: user_id, item_id, time" in message


def test_duplicate_item_id_names_rows(tmp_path):
    items = pd.DataFrame({"item_id": [10, 11, 12, 11], "text": list("abcd")})
    message = expect_error(tmp_path, "duplicate id '11'", items=items)
    assert "items.csv" in message and "line 5" in message and "first at line 3" in message


def test_unknown_item_names_row(tmp_path):
    inter = pd.DataFrame({"user_id": [1, 1, 1, 1], "item_id": [10, 11, 99, 12], "timestamp": [1, 2, 3, 4]})
    items = pd.DataFrame({"item_id": [10, 11, 12], "text": list("abc")})
    message = expect_error(tmp_path, "unknown item '99'", fmt="parquet", interactions=inter, items=items)
    assert "interactions.parquet" in message and "column 'item_id' at row 2" in message


def test_empty_history_names_user(tmp_path):
    inter = pd.DataFrame({"user_id": [1, 1, 1, 2, 2], "item_id": [10, 11, 12, 10, 11], "timestamp": [1, 2, 3, 4, 5]})
    items = pd.DataFrame({"item_id": [10, 11, 12], "text": list("abc")})
    message = expect_error(tmp_path, "user '2' has 2 distinct item", interactions=inter, items=items)
    assert "training history would be empty" in message and "line 5, line 6" in message
    ds = load_user_dataset(tmp_path / "interactions.csv", tmp_path / "items.csv", drop_short_users=True)
    assert ds.num_users == 1


@pytest.mark.parametrize(
    ("column", "value", "match"),
    [
        ("timestamp", "yesterday-ish", "column 'timestamp' at line 3 is neither a number nor a date-time"),
        ("rating", "great", "column 'rating' at line 3 is not a number"),
        ("user_id", None, "column 'user_id' is empty at line 3"),
    ],
)
def test_bad_values_name_column_and_row(tmp_path, column, value, match):
    inter = pd.DataFrame(
        {"user_id": [1, 1, 1], "item_id": [10, 11, 12], "timestamp": [1, 2, 3], "rating": [1, 2, 3]}, dtype=object
    )
    inter.loc[1, column] = value
    expect_error(tmp_path, match, interactions=inter)


def test_blank_text_missing_file_and_format(tmp_path):
    items = pd.DataFrame({"item_id": [10, 11, 12, 13, 14], "text": ["a", "b", "  ", "d", "e"]})
    expect_error(tmp_path, "column 'text' is (empty|blank) at line 4", items=items)
    with pytest.raises(DataError, match="nope.csv: file not found"):
        load_user_dataset(tmp_path / "nope.csv", tmp_path / "items.csv")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(DataError, match="unsupported file type '.json'"):
        load_user_dataset(tmp_path / "x.json", tmp_path / "items.csv")
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="broken.parquet: cannot be read"):
        load_user_dataset(tmp_path / "broken.parquet", tmp_path / "items.csv")
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("ml-1b")


def test_cli_reports_malformed_data_in_one_line(tmp_path, capsys):
    from mixllm.cli import main

    items = pd.DataFrame({"item_id": [10, 10, 12, 13, 14], "text": list("abcde")})
    write_user_data(tmp_path / "bad", items=items)
    code = main(["eval", "baselines", "--dataset", str(tmp_path / "bad"), "--output", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("mixllm: error: ") and "duplicate id '10'" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


# --- MovieLens ------------------------------------------------------------------------------------
def test_movielens_loader_on_a_miniature(tmp_path):
    ratings = pd.DataFrame(
        {"user_id": [5] * 3 + [2] * 3, "movie_id": [2, 1, 3, 3, 2, 1], "rating": [4, 5, 1, 2, 3, 4],
         "timestamp": [100, 100, 50, 7, 8, 9]}
    )  # fmt: skip
    items = pd.DataFrame({"movie_id": [3, 1, 2], "movie_title": ["C (1999)", "A (1995)", "B (1996)"]})
    for genre in GENRES:
        items[genre] = 0
    items.loc[items["movie_id"] == 1, ["Animation", "Comedy"]] = 1
    ratings.to_parquet(tmp_path / "ratings.parquet")
    items.to_parquet(tmp_path / "items.parquet")
    ds = load_movielens_100k(tmp_path)
    assert ds.items["item_id"].tolist() == [1, 2, 3]  # sorted by movie id: item_idx = movie_id - 1
    assert ds.item_texts == ["A (1995); genres: Animation, Comedy", "B (1996); genres: none", "C (1999); genres: none"]
    assert ds.user_sequence(1).tolist() == [2, 0, 1]  # user 5: movie 3 (t=50), then 1 and 2 tie at t=100
    with pytest.raises(DataError, match="not found"):
        load_movielens_100k(tmp_path / "missing")


@pytest.mark.integration
def test_real_movielens_100k():
    ds = load_movielens_100k()
    assert (ds.num_users, ds.num_items, ds.num_interactions) == (943, 1682, 100_000)
    assert ds.item_texts[0] == "Toy Story (1995); genres: Animation, Children's, Comedy"
    assert ds.user_lengths.min() >= 20
    assert_no_leakage(ds)
