"""Baselines: popularity counts, SASRec's causality/padding/export, its Lightning training, the command."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from mixllm.baselines import PopularityRanker, SASRec, SASRecConfig, TextSimilarityRanker, load_item_embeddings
from mixllm.baselines.sasrec import training_windows
from mixllm.data import FULL_RANKING, PAD, RankingBatch, evaluate, leave_one_out, make_synthetic_dataset


def batch(history, candidates=None):
    return RankingBatch(
        users=torch.arange(len(history)),
        history=torch.tensor(history),
        candidates=None if candidates is None else torch.tensor(candidates),
    )


# --- popularity -----------------------------------------------------------------------------------
def test_popularity_counts_training_split_only():
    split = leave_one_out(make_synthetic_dataset(num_users=12, num_items=30, seed=0))
    ranker = PopularityRanker.fit(split)
    expected = np.zeros(30)
    for user in range(split.num_users):
        np.add.at(expected, split.train_sequence(user), 1)
    np.testing.assert_array_equal(ranker.item_counts.numpy(), expected)
    scores = ranker.score(batch([[PAD], [PAD]], [[0, 1, 2], [3, 4, 5]]))
    assert scores.tolist() == [expected[[0, 1, 2]].tolist(), expected[[3, 4, 5]].tolist()]
    assert ranker.score_all(batch([[PAD]])).shape == (1, 30)


# --- SASRec model ---------------------------------------------------------------------------------
def tiny_sasrec(num_items=20, max_history=8, seed=0):
    torch.manual_seed(seed)
    return SASRec(SASRecConfig(num_items=num_items, hidden_size=16, num_blocks=2, num_heads=2, max_history=max_history,
                               ffn_size=32, dropout=0.0)).eval()  # fmt: skip


def test_sasrec_is_causal():
    model = tiny_sasrec()
    history = torch.tensor([[3, 5, 7, 9, 11, 13, 15, 17]])
    changed = history.clone()
    changed[0, 5] = 2
    with torch.no_grad():
        a, b = model(history), model(changed)
    torch.testing.assert_close(a[:, :5], b[:, :5])  # positions before the change do not see it
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_sasrec_padding_does_not_change_the_user():
    model = tiny_sasrec()
    with torch.no_grad():
        short = model.user_vectors(torch.tensor([[4, 9, 2]]))
        padded = model.user_vectors(torch.tensor([[PAD, PAD, PAD, PAD, PAD, 4, 9, 2]]))
        # Items beyond max_history are cut from the front: the most recent max_history items decide.
        long = model.user_vectors(torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 3, 4, 5, 6, 7, 4, 9, 2]]))
        recent = model.user_vectors(torch.tensor([[3, 4, 5, 6, 7, 4, 9, 2]]))
    torch.testing.assert_close(short, padded)
    torch.testing.assert_close(long, recent)
    assert not torch.isnan(padded).any()


def test_sasrec_scores_are_dot_products_with_exported_embeddings(tmp_path):
    model = tiny_sasrec()
    b = batch([[PAD, 1, 2, 3], [4, 5, 6, 7]], [[0, 5, 9], [19, 1, 2]])
    with torch.no_grad():
        full = model.score_all(b)  # (2, 20)
        cand = model.score(b)  # (2, 3)
        user = model.user_vectors(b.history)
    assert full.shape == (2, 20) and cand.shape == (2, 3)
    torch.testing.assert_close(cand, full.gather(1, b.candidates))
    embeddings = model.item_embeddings()
    assert embeddings.shape == (20, 16)
    torch.testing.assert_close(full, user @ embeddings.T)

    model.save_pretrained(tmp_path / "ckpt", provenance={"seed": 0})
    torch.testing.assert_close(load_item_embeddings(tmp_path / "ckpt"), embeddings.detach())
    again = SASRec.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(again.score(b), cand)
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["provenance"] == {"seed": 0}
    # a checkpoint written before H had one name (config "max_len") loads to the same model
    stored = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    stored["config"]["max_len"] = stored["config"].pop("max_history")
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(stored))
    legacy = SASRec.from_pretrained(tmp_path / "ckpt")
    assert legacy.config.max_history == model.config.max_history == legacy.max_history
    with torch.no_grad():
        torch.testing.assert_close(legacy.score(b), cand)


def test_sasrec_config_is_validated():
    with pytest.raises(ValueError, match="num_heads"):
        SASRecConfig(num_items=5, hidden_size=10, num_heads=3)
    with pytest.raises(ValueError, match="dropout"):
        SASRecConfig(num_items=5, dropout=1.0)


def test_training_windows_cover_every_next_item_once():
    sequences = [np.arange(10, 23), np.array([1, 2]), np.array([7])]  # lengths 13, 2, 1
    inputs, targets = training_windows(sequences, max_history=5)
    assert inputs.shape == targets.shape and inputs.shape[1] == 5
    pairs = [(i, t) for row_i, row_t in zip(inputs, targets) for i, t in zip(row_i, row_t) if t != PAD]
    expected = [(a, b) for seq in sequences for a, b in zip(seq[:-1], seq[1:])]
    assert sorted(pairs) == sorted((int(a), int(b)) for a, b in expected)
    assert ((inputs == PAD) == (targets == PAD)).all()
    for row_i, row_t in zip(inputs, targets):  # left padding only
        real = np.flatnonzero(row_t != PAD)
        assert real.tolist() == list(range(5 - len(real), 5))


# --- text similarity ---------------------------------------------------------------------------------
def test_text_similarity_prefers_items_like_the_history():
    embeddings = torch.eye(4)
    embeddings[3] = torch.tensor([1.0, 1.0, 0.0, 0.0])  # item 3 resembles items 0 and 1
    ranker = TextSimilarityRanker(embeddings, max_history=3)
    scores = ranker.score(batch([[PAD, 0, 1]], [[2, 3]]))
    assert scores[0, 1] > scores[0, 0]
    torch.testing.assert_close(scores, ranker.score_all(batch([[PAD, 0, 1]])).gather(1, torch.tensor([[2, 3]])))


# --- training -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from training.sasrec import SASRecTrainConfig, train_sasrec

    split = leave_one_out(make_synthetic_dataset(num_users=40, num_items=30, min_length=8, max_length=20,
                                                 pattern="next-item", seed=0))  # fmt: skip
    config = replace(SASRecTrainConfig.from_yaml("sasrec_tiny.yaml"), max_epochs=15, patience=15)
    cache = tmp_path_factory.mktemp("candidates")
    model, info = train_sasrec(split, config, seed=0, cache_dir=cache, progress_bar=False)
    return split, config, cache, model, info


def test_sasrec_learns_a_sequential_pattern_popularity_cannot(trained):
    split, _, cache, model, info = trained
    assert 0 <= info["best_epoch"] < 15 and info["history"] and info["time_to_best_s"] <= info["train_time_s"]
    sasrec = evaluate(model, split, FULL_RANKING, "test")["ndcg@10"]
    popularity = evaluate(PopularityRanker.fit(split), split, FULL_RANKING, "test")["ndcg@10"]
    assert sasrec > 2 * popularity
    assert sasrec > 0.3


def test_sasrec_training_is_deterministic(trained):
    from training.sasrec import train_sasrec

    split, config, cache, model, info = trained
    again, info_again = train_sasrec(split, replace(config, max_epochs=2), seed=0, cache_dir=cache, progress_bar=False)
    first_two = [h["score"] for h in info["history"][:2]]
    assert [h["score"] for h in info_again["history"]] == first_two


def test_train_config_yaml_mirrors_dataclass(tmp_path):
    from mixllm.errors import MixLLMError
    from training.sasrec import CONFIG_DIR, SASRecTrainConfig

    import yaml

    fields = set(SASRecTrainConfig.__dataclass_fields__)
    for recipe in ("sasrec.yaml", "sasrec_tiny.yaml"):
        assert set(yaml.safe_load((CONFIG_DIR / recipe).read_text())) == fields
    (tmp_path / "bad.yaml").write_text("hidden_size: 64\nlearning_rate: 0.1\n")
    with pytest.raises(MixLLMError, match="unknown key"):
        SASRecTrainConfig.from_yaml(tmp_path / "bad.yaml")
    (tmp_path / "bad2.yaml").write_text("monitor_metric: hr@1\n")
    with pytest.raises(MixLLMError, match="monitor_metric"):
        SASRecTrainConfig.from_yaml(tmp_path / "bad2.yaml")


def test_eval_baselines_command_writes_report(tmp_path, monkeypatch):
    from mixllm.cli import main

    split_dir = tmp_path / "shop"
    split_dir.mkdir()
    ds = make_synthetic_dataset(num_users=30, num_items=150, min_length=5, max_length=12, pattern="next-item", seed=1)
    frame = ds.interactions.assign(user_id=lambda f: ds.user_ids[f["user_idx"]],
                                   item_id=lambda f: ds.items["item_id"].to_numpy()[f["item_idx"]])  # fmt: skip
    frame[["user_id", "item_id", "timestamp", "rating"]].to_csv(split_dir / "interactions.csv", index=False)
    ds.items[["item_id", "text"]].to_csv(split_dir / "items.csv", index=False)
    out = tmp_path / "report.json"
    code = main(["eval", "baselines", "--dataset", str(split_dir), "--seed", "0", "1", "--models", "popularity",
                 "sasrec", "--config", "sasrec_tiny.yaml", "--output", str(out), "--cache-dir", str(tmp_path / "c"),
                 "--checkpoint-dir", str(tmp_path / "ckpt")])  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    assert {(r["model"], r["seed"]) for r in report["runs"]} == {(m, s) for m in ("popularity", "sasrec") for s in (0, 1)}
    stats = report["summary"]["sasrec"]["test"]["full"]["ndcg@10"]
    assert stats["n"] == 2 and len(stats["values"]) == 2
    for run in report["runs"]:
        assert set(run["metrics"]) == {"valid", "test"}
        assert set(run["metrics"]["test"]) == {"sampled-20", "sampled-100", "full"}
        assert run["eval_time_s"] > 0
    # Both models were scored on the same candidate lists.
    digests = {r["seed"]: [] for r in report["runs"]}
    for run in report["runs"]:
        digests[run["seed"]].append(run["candidate_digests"])
    assert all(a == b for a, b in digests.values())
    assert (tmp_path / "ckpt" / "sasrec-shop-seed1" / "item_embeddings.safetensors").is_file()
    markdown = out.with_suffix(".md").read_text()
    assert "| SASRec |" in markdown and "±" in markdown
