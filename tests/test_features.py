"""mixllm.features (item feature specs, tables, the SASRec checkpoint convention, column layouts) and
the one way a padded history becomes a request (RankingRequest.from_padded, ProtocolRanker)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mixllm.data import PAD, make_synthetic_dataset
from mixllm.data.evaluation import RankingBatch
from mixllm.errors import DataError
from mixllm.features import (
    MINILM_DIM,
    FeatureLayout,
    item_feature_table,
    load_feature_table,
    load_sasrec,
    parse_feature_spec,
    sasrec_checkpoint_dir,
    sasrec_item_features,
)
from mixllm.ranking import CATALOG_FEATURES_NAME, ProtocolRanker, RankingRequest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def dataset():
    return make_synthetic_dataset(seed=0)


def _save_sasrec(dataset, folder: Path, hidden: int = 8):
    from mixllm.baselines.sasrec import SASRec, SASRecConfig

    torch.manual_seed(0)
    model = SASRec(SASRecConfig(num_items=dataset.num_items, hidden_size=hidden, max_history=5))
    model.save_pretrained(folder, provenance={"dataset_fingerprint": dataset.fingerprint()})
    return model.item_embeddings().detach()


# --- specs and tables ----------------------------------------------------------------------------
def test_spec_parsing():
    assert parse_feature_spec("minilm+sasrec") == ["minilm", "sasrec"]
    assert parse_feature_spec("sasrec+/a/b.npy") == ["sasrec", "/a/b.npy"]
    assert parse_feature_spec("ids") == []
    for bad in ("", "minilm+", "+sasrec", "minilm++sasrec"):
        with pytest.raises(DataError, match="'\\+'-joined"):
            parse_feature_spec(bad)
    with pytest.raises(DataError, match="'ids' cannot be combined"):
        parse_feature_spec("ids+minilm")


def test_ids_means_no_table(dataset):
    assert item_feature_table("ids", dataset) is None


def test_sasrec_checkpoint_dir_convention(tmp_path, monkeypatch):
    assert sasrec_checkpoint_dir("ml-100k", 3, tmp_path) == tmp_path / "checkpoints" / "sasrec-ml-100k-seed3"
    monkeypatch.setenv("MIXLLM_HOME", str(tmp_path / "home"))
    assert sasrec_checkpoint_dir("ml-100k", 0) == tmp_path / "home" / "checkpoints" / "sasrec-ml-100k-seed0"


def test_sasrec_features_come_from_the_conventional_folder_and_concatenate_in_spec_order(tmp_path, dataset):
    table = _save_sasrec(dataset, sasrec_checkpoint_dir(dataset.name, 2, tmp_path))
    assert torch.equal(sasrec_item_features(dataset, 2, tmp_path), table)
    extra = np.arange(dataset.num_items * 3, dtype=np.float32).reshape(dataset.num_items, 3)
    np.save(tmp_path / "extra.npy", extra)
    both = item_feature_table(f"{tmp_path / 'extra.npy'}+sasrec", dataset, seed=2, cache_dir=tmp_path)
    assert both.shape == (dataset.num_items, 11) and both.dtype == torch.float32
    assert torch.equal(both[:, :3], torch.from_numpy(extra)) and torch.equal(both[:, 3:], table)


def test_load_sasrec_says_how_to_train_a_missing_one_and_refuses_other_data(tmp_path, dataset):
    with pytest.raises(DataError, match=r"no SASRec checkpoint .*seed 4.*`mixllm eval baselines .*--seed 4"):
        load_sasrec(dataset, 4, tmp_path)
    _save_sasrec(dataset, sasrec_checkpoint_dir(dataset.name, 4, tmp_path))
    assert load_sasrec(dataset, 4, tmp_path).config.hidden_size == 8
    other = make_synthetic_dataset(seed=1)  # same name, other interactions
    assert other.name == dataset.name
    with pytest.raises(DataError, match="trained on another version"):
        load_sasrec(other, 4, tmp_path)


def test_table_formats_load_alike(tmp_path, dataset):
    table = torch.randn(dataset.num_items, 5)
    np.save(tmp_path / "t.npy", table.numpy())
    torch.save(table, tmp_path / "t.pt")
    save_file({"anything": table}, tmp_path / "t.safetensors")
    for name in ("t.npy", "t.pt", "t.safetensors"):
        assert torch.equal(load_feature_table(tmp_path / name, dataset.num_items), table), name
    sasrec = _save_sasrec(dataset, tmp_path / "sasrec_folder")
    assert torch.equal(load_feature_table(tmp_path / "sasrec_folder", dataset.num_items), sasrec)


def test_table_errors_name_the_path_and_the_shape(tmp_path, dataset):
    n = dataset.num_items
    np.save(tmp_path / "short.npy", np.zeros((n - 1, 3), dtype=np.float32))
    with pytest.raises(DataError, match=rf"short\.npy has shape \({n - 1}, 3\); expected \({n}, F\)"):
        load_feature_table(tmp_path / "short.npy", n)
    np.save(tmp_path / "flat.npy", np.zeros(n, dtype=np.float32))
    with pytest.raises(DataError, match=rf"flat\.npy has shape \({n},\)"):
        load_feature_table(tmp_path / "flat.npy", n)
    bad = np.zeros((n, 2), dtype=np.float32)
    bad[3, 1] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(DataError, match=r"nan\.npy holds NaN"):
        load_feature_table(tmp_path / "nan.npy", n)
    save_file({"a": torch.zeros(n, 2), "b": torch.zeros(n, 2)}, tmp_path / "two.safetensors")
    with pytest.raises(DataError, match=r"two\.safetensors holds \['a', 'b'\]"):
        load_feature_table(tmp_path / "two.safetensors", n)
    torch.save({"features": torch.zeros(n, 2)}, tmp_path / "dict.pt")
    with pytest.raises(DataError, match=r"dict\.pt holds a dict"):
        load_feature_table(tmp_path / "dict.pt", n)
    with pytest.raises(DataError, match=r"minlm: no such file"):  # a typo of a named part
        item_feature_table("minlm", dataset)
    assert load_feature_table(tmp_path / "short.npy", None).shape == (n - 1, 3)  # None: any row count


# --- layouts -------------------------------------------------------------------------------------
def test_layout_from_spec():
    layout = FeatureLayout.from_spec("minilm+sasrec", 448)
    assert layout.parts == [("minilm", 0, MINILM_DIM), ("sasrec", MINILM_DIM, 448)] and layout.width == 448
    assert layout.slice("sasrec") == slice(384, 448) and layout.names == ["minilm", "sasrec"]
    assert FeatureLayout.from_spec("sasrec+minilm", 448).parts == [("sasrec", 0, 64), ("minilm", 64, 448)]
    assert FeatureLayout.from_spec("minilm", 384).parts == [("minilm", 0, 384)]
    assert FeatureLayout.from_spec("ids", 0).parts == [] and FeatureLayout.from_spec("ids", 0).width == 0
    with pytest.raises(KeyError, match="'sasrec'"):
        FeatureLayout.from_spec("minilm", 384).slice("sasrec")
    for spec, width in (("minilm", 448), ("minilm+sasrec", 384), ("ids", 8), ("sasrec+sasrec", 128)):
        with pytest.raises(DataError, match=repr(spec).replace("+", r"\+")):
            FeatureLayout.from_spec(spec, width)


def test_layout_reads_a_path_parts_width_only_when_needed(tmp_path):
    np.save(tmp_path / "extra.npy", np.zeros((7, 3), dtype=np.float32))
    extra = str(tmp_path / "extra.npy")
    layout = FeatureLayout.from_spec(f"minilm+{extra}+sasrec", 384 + 3 + 8)
    assert layout.parts == [("minilm", 0, 384), (extra, 384, 387), ("sasrec", 387, 395)]
    gone = str(tmp_path / "moved_away.npy")  # one unknown width: it takes the rest, nothing is read
    assert FeatureLayout.from_spec(f"minilm+{gone}", 390).slice(gone) == slice(384, 390)


def test_layout_from_the_committed_checkpoints():
    student = REPO / "checkpoints" / "student"
    layout = FeatureLayout.from_checkpoint(student)
    assert layout.parts == [("minilm", 0, 384), ("sasrec", 384, 448)]
    stored = load_file(str(student / CATALOG_FEATURES_NAME))["features"]
    assert stored.shape[1] == layout.width
    # The MiniLM columns are unit-norm sentence embeddings; the SASRec ones are not.
    norms = stored[:, layout.slice("minilm")].norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-3)
    assert FeatureLayout.from_checkpoint(REPO / "checkpoints" / "teacher").parts == []


def test_layout_from_checkpoint_errors(tmp_path):
    with pytest.raises(DataError, match="mixllm_config.json is missing"):
        FeatureLayout.from_checkpoint(tmp_path)
    (tmp_path / "mixllm_config.json").write_text(json.dumps({"config": {"item": {"feature_dim": 400}}}))
    (tmp_path / "training_run.json").write_text(json.dumps({"recipe": {"item_features": "minilm+sasrec"}}))
    assert FeatureLayout.from_checkpoint(tmp_path).slice("sasrec") == slice(384, 400)
    (tmp_path / "training_run.json").write_text(json.dumps({"recipe": {"item_features": "minilm"}}))
    with pytest.raises(DataError, match=r"training_run.json: item features 'minilm' .* width 400"):
        FeatureLayout.from_checkpoint(tmp_path)


# --- padded history -> request -------------------------------------------------------------------
def test_from_padded_drops_pad_and_keeps_the_most_recent():
    row = np.array([PAD, PAD, 7, 3, 9, 4])  # left-padded, most recent last
    assert RankingRequest.from_padded(row, [1, 2]) == RankingRequest([7, 3, 9, 4], [1, 2])
    assert RankingRequest.from_padded(row, np.array([1, 2]), max_history=2) == RankingRequest([9, 4], [1, 2])
    assert RankingRequest.from_padded(row, [1], max_history=10).history == [7, 3, 9, 4]
    assert RankingRequest.from_padded(row, [1], max_history=0).history == []
    assert RankingRequest.from_padded(torch.full((3,), PAD), torch.tensor([5])) == RankingRequest([], [5])
    request = RankingRequest.from_padded(torch.tensor([PAD, 8]), torch.tensor([5, 6]))
    assert all(type(i) is int for i in (*request.history, *request.candidates))  # plain ints, JSON-ready


class _SumRanker:
    """Stands in for a MixLLMRanker: scores a candidate as 100 * candidate + sum(history)."""

    max_history = 2
    max_request_history = 2  # no user tokens: it reads what its item tokens read
    fusion_gate = None

    def __init__(self):
        self.batches = []

    def eval(self):
        return self

    def score(self, requests):
        self.batches.append(len(requests))
        return [torch.tensor([100.0 * c + sum(r.history) for c in r.candidates]) for r in requests]


def test_protocol_ranker_builds_requests_with_from_padded_and_keeps_row_order():
    stub = _SumRanker()
    ranker = ProtocolRanker(stub, "stub", batch_size=2)
    history = torch.tensor([[PAD, PAD, 5], [1, 2, 3], [PAD, 4, 6]])
    candidates = torch.tensor([[1, 2], [3, 4], [5, 6]])
    batch = RankingBatch(users=torch.arange(3), history=history, candidates=candidates)
    assert ranker.requests(batch)[1] == RankingRequest([2, 3], [3, 4])  # the 2 most recent
    scores = ranker.score(batch)
    assert scores.shape == (3, 2) and stub.batches == [2, 1]
    assert scores.tolist() == [[105.0, 205.0], [305.0, 405.0], [510.0, 610.0]]
