"""The student's options trained through the recipe: user-history tokens, score fusion (evaluated
through the protocol interface) and cold-item training (tiny random Llama, synthetic data, a tiny
stored SASRec; seconds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixllm.baselines.sasrec import SASRec, SASRecConfig
from mixllm.data import leave_one_out, make_synthetic_dataset
from mixllm.data.evaluation import make_batch
from mixllm.features import sasrec_checkpoint_dir
from mixllm.ranking import ItemCatalog, MixLLMRanker, ProtocolRanker
from mixllm.retrieval import FaissRetriever
from training.ranker_build import build_ranker, history_width, recipe_retriever
from training.ranker_recipe import RankerRecipe
from training.ranking_lists import ListCollator, RankerDataModule, build_training_lists, build_validation_lists
from training.rankers import train_ranker
from training.recipe import RecipeError

DATASET = make_synthetic_dataset(seed=0)
SPLIT = leave_one_out(DATASET)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A cache root holding a tiny SASRec for seed 0 and a random 12-wide item feature table."""
    root = tmp_path_factory.mktemp("home")
    torch.manual_seed(0)
    sasrec = SASRec(SASRecConfig(num_items=DATASET.num_items, hidden_size=8, max_history=7))
    sasrec.save_pretrained(sasrec_checkpoint_dir(DATASET.name, 0, root), provenance={"dataset_fingerprint": DATASET.fingerprint()})
    np.save(root / "features.npy", np.random.default_rng(0).normal(size=(DATASET.num_items, 12)).astype(np.float32))
    return root


def _recipe(home, tmp_path, **overrides) -> RankerRecipe:
    fields = {
        "cache_dir": str(home), "output_dir": str(tmp_path / "student"), "alpha": 0.0, "teacher_scores": None,
        "teacher_checkpoint": None, "item_features": str(home / "features.npy"), "item_id_embedding": False,
        "user": {"num_tokens": 2, "max_history": 6, "hidden_dim": 16, "num_heads": 2}, "fusion": True,
    }  # fmt: skip
    return RankerRecipe.from_yaml("student_tiny.yaml", **{**fields, **overrides})


def test_fused_lists_store_the_retrievers_score_of_every_candidate(home, tmp_path):
    recipe = _recipe(home, tmp_path, negative_pool=6)
    retriever, name = recipe_retriever(recipe, DATASET)
    assert isinstance(retriever, FaissRetriever) and name == "sasrec:synthetic:seed0"
    lists = build_training_lists(SPLIT, recipe, history_width(recipe), retriever, name, scored=True)
    assert lists.histories.shape[1] == 6  # the user encoder's window, longer than H = 4
    for row in (0, 5, len(lists) - 1):  # recompute from the full history before the target
        seq = SPLIT.train_sequence(lists.users[row]).tolist()
        t = seq.index(int(lists.candidates[row, lists.target_index[row]]))
        history = torch.full((1, 7), -1)
        past = seq[max(0, t - 7) : t]
        history[0, 7 - len(past) :] = torch.tensor(past)
        expected = retriever.candidate_scores(history, torch.from_numpy(lists.candidates[row : row + 1]))[0]
        torch.testing.assert_close(torch.from_numpy(lists.retriever_scores[row]), expected)
    with pytest.raises(RecipeError, match="^fusion: .*need the retriever"):
        build_training_lists(SPLIT, recipe, scored=True)


def test_user_tokens_and_gate_train_and_score_through_the_protocol_interface(home, tmp_path):
    result = train_ranker(_recipe(home, tmp_path, max_steps=3))
    ranker = result.ranker.eval()
    assert ranker.model.config.user.item_dim == 12 and ranker.model.config.user.num_tokens == 2
    assert ranker.fusion_gate is not None and float(ranker.fusion_gate.detach()) != 0.0  # the gate left 0: it trained
    assert ranker.max_history == 4 and ranker.max_request_history == 6
    reloaded = MixLLMRanker.from_pretrained(result.ranker_dir, ranker.catalog)
    assert float(reloaded.fusion_gate.detach()) == float(ranker.fusion_gate.detach())

    retriever = FaissRetriever(SASRec.from_pretrained(sasrec_checkpoint_dir(DATASET.name, 0, home)))
    with pytest.raises(Exception, match="retriever"):
        ProtocolRanker(reloaded, "fused")
    wrapped = ProtocolRanker(reloaded, "fused", retriever=retriever)
    assert wrapped.max_history == 7  # the evaluator supplies what SASRec reads
    users = np.arange(6)
    candidates = np.stack([np.roll(np.arange(10), u) for u in users])
    batch = make_batch(SPLIT, "test", users, wrapped.max_history, candidates)
    fused = wrapped.score(batch)
    sasrec_scores = retriever.candidate_scores(batch.history, batch.candidates)
    unfused = reloaded.unfused(fused, sasrec_scores)  # the fusion-off view of the same forward
    with torch.no_grad():
        reloaded.fusion_gate.zero_()
        alone = wrapped.score(batch)
    torch.testing.assert_close(fused, alone + float(ranker.fusion_gate.detach()) * sasrec_scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unfused, alone, atol=1e-5, rtol=1e-5)
    reloaded.fusion_gate = None
    assert reloaded.unfused(fused, sasrec_scores) is fused  # a ranker without fusion: its scores are its own


def test_cold_item_training_zeroes_only_the_sasrec_part_of_some_item_tokens(home, tmp_path):
    spec = f"{home / 'features.npy'}+sasrec"  # 12 feature columns, then SASRec's 8
    recipe = _recipe(home, tmp_path, item_features=spec, user=None, fusion=False, cold_item_rate=0.4, negative_pool=None)
    ranker = build_ranker(recipe, DATASET)
    table = ranker.catalog.features
    assert table.shape[1] == 20
    lists = build_training_lists(SPLIT, recipe)
    data = RankerDataModule(ranker, recipe, lists, build_validation_lists(SPLIT, recipe))
    rows = list(range(16))
    batch = data.train_collate(rows)
    got = batch["inputs"].item_features
    warm = ListCollator(ranker, lists, None, recipe)(rows)["inputs"].item_features  # the same lists, no cold columns
    assert got.shape == warm.shape and got.shape[0] > 16 * 5  # every candidate and the histories (short ones too)
    torch.testing.assert_close(got[:, :12], warm[:, :12])  # the text part is never touched
    cold = (got[:, 12:] == 0).all(1) & (warm[:, 12:] != 0).any(1)
    assert torch.equal(got[~cold], warm[~cold])  # every other token is its catalog row
    assert 0.2 < cold.float().mean() < 0.6  # about cold_item_rate of ~130 tokens
    again = data.train_collate(rows)["inputs"].item_features
    assert torch.equal(again, got)  # seeded: the same batch of the same epoch drops the same tokens
    data.set_epoch(1)
    assert not torch.equal(data.train_collate(rows)["inputs"].item_features, got)
    val = data.val_collate(rows[:4])["inputs"].item_features
    assert not (val[:, 12:] == 0).all(1).any()  # validation reads warm items
    with pytest.raises(RecipeError, match="^cold_item_rate: zeroes the SASRec part"):
        _recipe(home, tmp_path, item_features=str(home / "features.npy"), cold_item_rate=0.4)


def test_worker_processes_build_the_same_batches_and_follow_the_trainers_epoch(home, tmp_path):
    """Workers copy the collator when an epoch's iterator starts, which Lightning does before
    on_train_epoch_start for the first epoch it runs (also on resume): the data module sets the epoch
    from the trainer when the loader is made."""
    from types import SimpleNamespace

    def first_batches(num_workers: int, epoch: int):
        recipe = _recipe(home, tmp_path, user=None, fusion=False, negative_pool=8, num_workers=num_workers, batch_size=8)
        ranker = build_ranker(recipe, DATASET)
        lists = build_training_lists(SPLIT, recipe)
        data = RankerDataModule(ranker, recipe, lists, build_validation_lists(SPLIT, recipe))
        data.trainer = SimpleNamespace(current_epoch=epoch)
        batches = []
        for batch in data.train_dataloader():
            batches.append((batch["inputs"].item_features, batch["target_index"]))
            if len(batches) == 2:
                return batches

    in_process = first_batches(0, 1)
    for (features, target), (features_w, target_w) in zip(in_process, first_batches(2, 1)):
        assert torch.equal(features, features_w) and torch.equal(target, target_w)
    epoch0 = first_batches(0, 0)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(in_process, epoch0))  # epoch 1 drew other negatives


def test_sasrec_as_the_teacher_needs_no_llm_teacher_and_distils_its_scores(home, tmp_path, monkeypatch):
    import training.rankers as loop

    recipe = _recipe(home, tmp_path, user=None, fusion=False, alpha=1.0, teacher="sasrec", teacher_weighting="confidence",
                     max_steps=2)  # fmt: skip
    assert recipe.teacher_scores is None and recipe.needs_retriever_scores and not recipe.uses_llm_teacher
    seen = []
    original = loop.ranking_loss

    def spy(scores, target, teachers, *args):
        seen.append(teachers)
        return original(scores, target, teachers, *args)

    monkeypatch.setattr(loop, "ranking_loss", spy)
    result = train_ranker(recipe)
    assert result.global_step == 2 and "train/kl" in result.metrics
    assert seen and all(len(t) == 1 and t[0].shape[1] == 5 for t in seen)  # SASRec's scores of the 5 candidates


def test_fusion_fit_finds_the_closed_form_optima():
    """Two candidates; three lists want candidate 0 and one wants candidate 1, so the optimal fused
    margin of candidate 0 is log 3 (f'(m) = sigmoid(m) - 3/4)."""
    from training.fit_fusion import fit_fusion_weights

    target = torch.tensor([0, 0, 0, 1])
    # the ranker says nothing (s = 0) and SASRec's margin is 1: the gate is log 3, the scale stays 1
    scale, gate = fit_fusion_weights(torch.zeros(4, 2), torch.tensor([[1.0, 0.0]] * 4), target)
    assert abs(gate - float(np.log(3))) < 1e-6 and abs(scale - 1.0) < 1e-9
    scale, gate = fit_fusion_weights(torch.zeros(4, 2), torch.tensor([[1.0, 0.0]] * 4), torch.tensor([0, 1, 0, 1]))
    assert abs(gate) < 1e-9  # balanced: the ranker alone
    # an over-confident ranker (margin 4) and an uninformative SASRec: the scale shrinks it to log 3
    scores = torch.tensor([[4.0, 0.0]] * 4)
    scale, gate = fit_fusion_weights(scores, torch.zeros(4, 2), target)
    assert abs(scale - float(np.log(3)) / 4) < 1e-6 and abs(gate) < 1e-9
    assert fit_fusion_weights(scores, torch.zeros(4, 2), target, fit_scale=False) == (1.0, 0.0)  # gate only: nothing to fit
    # both informative, different lists: the joint optimum beats the best gate with the scale held at 1
    g = torch.Generator().manual_seed(0)
    s, r = torch.randn(64, 5, generator=g) * 3, torch.randn(64, 5, generator=g)
    t = (s / 3 + r + 0.5 * torch.randn(64, 5, generator=g)).argmax(-1)
    from training.fit_fusion import listwise_ce

    joint, gate_only = fit_fusion_weights(s, r, t), fit_fusion_weights(s, r, t, fit_scale=False)
    assert gate_only[0] == 1.0
    assert listwise_ce(joint[0] * s + joint[1] * r, t) < listwise_ce(s + gate_only[1] * r, t)
    for ds, dg in ((0.01, 0), (-0.01, 0), (0, 0.01), (0, -0.01)):  # a local (hence, convex, global) minimum
        assert listwise_ce((joint[0] + ds) * s + (joint[1] + dg) * r, t) >= listwise_ce(joint[0] * s + joint[1] * r, t)


def test_fused_checkpoint_has_the_validation_optimal_gate_and_scores_through_the_retriever(home, tmp_path):
    from training.fit_fusion import fuse_checkpoint, listwise_ce

    import shutil

    from safetensors.torch import load_file, save_file

    from mixllm.errors import MixLLMError

    trained = train_ranker(_recipe(home, tmp_path, user=None, fusion=False, max_steps=2)).ranker_dir
    sasrec = SASRec.from_pretrained(sasrec_checkpoint_dir(DATASET.name, 0, home))
    # the same ranker with its scores negated: the fitted scale flips sign, so exactly one of the two is
    # refused (a ranker worth a negative weight is not fused) and the other fits |scale| and the same gate
    flipped = tmp_path / "flipped"
    shutil.copytree(trained, flipped)
    head = load_file(flipped / "ranker_head.safetensors")
    save_file({k: -v if k == "weight" else v for k, v in head.items()}, flipped / "ranker_head.safetensors")
    records = {}
    for source in (trained, flipped):
        try:
            records[source] = fuse_checkpoint(source, tmp_path / f"fused-{source.parent.name}-{source.name}", sasrec, SPLIT,
                                              cache_dir=str(home))  # fmt: skip
        except MixLLMError as error:
            assert "<= 0" in str(error) and not (tmp_path / f"fused-{source.parent.name}-{source.name}").exists()
    assert len(records) == 1, "exactly one sign of the ranker's scores earns a positive weight"
    source, record = next(iter(records.items()))
    other = flipped if source == trained else trained
    with pytest.raises(MixLLMError, match="<= 0"):
        fuse_checkpoint(other, tmp_path / "refused", sasrec, SPLIT, cache_dir=str(home))
    gate, scale = record["gate"], record["score_scale"]
    assert scale > 0 and record["fused"]["ce"] <= record["ranker_alone"]["ce"] + 1e-9
    assert record["fused"]["ce"] <= record["sasrec_alone"]["ce"] + 1e-9
    trained, fused_dir = source, tmp_path / f"fused-{source.parent.name}-{source.name}"
    fused = MixLLMRanker.from_pretrained(fused_dir, ItemCatalog(texts=DATASET.item_texts))
    assert float(fused.fusion_gate.detach()) == pytest.approx(gate, abs=1e-6)
    # the fused checkpoint's validation CE is the fitted optimum: no nearby gate does better
    retriever = FaissRetriever(sasrec)
    wrapped = ProtocolRanker(fused, "fused", retriever=retriever)
    from mixllm.data import PROTOCOLS, get_candidates

    lists = get_candidates(SPLIT, PROTOCOLS["sampled-20"], "valid", 0, home / "candidates")
    users = np.arange(SPLIT.num_users)
    batch = make_batch(SPLIT, "valid", users, wrapped.max_history, lists.candidates[users])
    target = torch.from_numpy(lists.target_index[users])
    with torch.no_grad():
        at_gate = wrapped.score(batch)
        sasrec_scores = retriever.candidate_scores(batch.history[:, -retriever.max_history :], batch.candidates)
    assert listwise_ce(at_gate, target) == pytest.approx(record["fused"]["ce"], abs=1e-5)
    scaled_ranker = at_gate - gate * sasrec_scores  # the ranker alone, its head scaled by the fitted scale
    for delta in (-0.05, 0.05):
        assert listwise_ce(at_gate + delta * sasrec_scores, target) >= listwise_ce(at_gate, target) - 1e-9
        assert listwise_ce(at_gate + delta * scaled_ranker, target) >= listwise_ce(at_gate, target) - 1e-9
    # the scale lives in the score head: the same ranker unfused gives the original scores times the scale
    original = ProtocolRanker(MixLLMRanker.from_pretrained(trained, ItemCatalog(texts=DATASET.item_texts)), "alone")
    with torch.no_grad():
        assert torch.allclose(original.score(batch) * scale, scaled_ranker, atol=1e-4)
    with pytest.raises(Exception, match="already fused"):
        fuse_checkpoint(fused_dir, tmp_path / "again", sasrec, SPLIT, cache_dir=str(home))
