"""Lightning training of the rankers on a tiny synthetic dataset and a tiny random Llama (CPU, seconds)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mixllm.data import leave_one_out, make_synthetic_dataset
from mixllm.errors import MixLLMError
from mixllm.loading import tiny_language_model
from mixllm.ranking import ItemCatalog, MixLLMRanker
from training import ranker_build, ranking_lists, teacher_scores
from training.ranker_recipe import RankerRecipe
from training.rankers import ranking_loss, train_ranker
from training.recipe import CONFIG_DIR, RecipeError, parse_overrides

REPO = Path(__file__).resolve().parents[1]


def _recipe(name: str, tmp_path: Path, **overrides) -> RankerRecipe:
    """A packaged tiny recipe writing its outputs and caches (candidate lists) under tmp_path."""
    return RankerRecipe.from_yaml(name, output_dir=str(tmp_path / name.split("_")[0]), cache_dir=str(tmp_path / "cache"), **overrides)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    return train_ranker(_recipe("teacher_tiny.yaml", tmp_path_factory.mktemp("teacher"), max_steps=2))


def test_loss_ce_kl_and_labels_only_ablation():
    scores = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    target = torch.tensor([0, 1])
    ce = torch.nn.functional.cross_entropy(scores, target)
    assert torch.allclose(ranking_loss(scores, target)[0], ce)
    assert torch.allclose(ranking_loss(scores, target, scores * 3, temperature=2.0, alpha=0.0)[0], ce)  # alpha 0: labels only
    loss, parts = ranking_loss(scores, target, scores.clone(), temperature=2.0, alpha=0.7)
    assert parts["kl"].abs() < 1e-6 and torch.allclose(loss, 0.3 * ce)  # the teacher agrees: KL term vanishes
    _, parts = ranking_loss(scores, target, -scores, temperature=2.0, alpha=0.7)
    assert parts["kl"] > 0.1


def test_two_teachers_average_their_kl_and_confidence_weights_each_list():
    generator = torch.Generator().manual_seed(1)
    scores, a, b = (torch.randn(5, 6, generator=generator) for _ in range(3))
    target = torch.tensor([0, 3, 5, 1, 2])
    kl_a = ranking_loss(scores, target, a, temperature=2.0, alpha=1.0)[1]["kl"]
    kl_b = ranking_loss(scores, target, b, temperature=2.0, alpha=1.0)[1]["kl"]
    torch.testing.assert_close(ranking_loss(scores, target, [a, b], temperature=2.0, alpha=1.0)[1]["kl"], (kl_a + kl_b) / 2)
    # confidence: by hand, per list KL times the teacher's probability of the target over its batch mean
    student, teacher = (x.div(2.0).log_softmax(-1) for x in (scores, a))
    per_list = (teacher.exp() * (teacher - student)).sum(-1) * 4.0
    confidence = a.softmax(-1)[torch.arange(5), target]
    expected = (per_list * confidence / confidence.mean()).mean()
    got = ranking_loss(scores, target, a, temperature=2.0, alpha=1.0, weighting="confidence")[1]["kl"]
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, kl_a)  # the weighting changes the loss
    # a teacher that is equally confident on every list is the uniform loss
    flat = torch.zeros(5, 6)
    torch.testing.assert_close(ranking_loss(scores, target, flat, 2.0, 1.0, "confidence")[0], ranking_loss(scores, target, flat, 2.0, 1.0)[0])


@pytest.mark.parametrize("shift", [-50.0, -1.0, 0.5, 7.0, 100.0])
def test_listwise_losses_are_invariant_to_a_shift_shared_by_all_candidates(shift):
    """CE and the distillation KL depend on scores only through softmax, and softmax(s + c) = softmax(s):
    adding a constant to every candidate (a score-head bias) changes neither the loss nor the
    gradient w.r.t. the scores. Why the score head has no bias (mixllm.ranking.SCORE_HEAD_RULE).

    Tolerance: log_softmax subtracts the row max, so the shifted scores differ from the unshifted by
    the rounding of s + c, at most |s + c| * 2^-24 ~ 6e-6 for |s + c| <= 105 in float32, which the
    loss carries through a softmax of Lipschitz constant 1: 1e-4 bounds it with room to spare, and a
    bias that did matter (e.g. applied to one candidate only) changes the loss by ~|c| / C >> 1e-4."""
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 10, generator=generator) * 2
    teacher = torch.randn(6, 10, generator=generator) * 2
    target = torch.randint(0, 10, (6,), generator=generator)
    for scores_of_teacher, alpha in ((None, 0.0), (teacher, 0.5), (teacher, 1.0)):
        base = scores.clone().requires_grad_(True)
        moved = (scores + shift).requires_grad_(True)
        loss, parts = ranking_loss(base, target, scores_of_teacher, temperature=2.0, alpha=alpha)
        loss_moved, parts_moved = ranking_loss(moved, target, scores_of_teacher, temperature=2.0, alpha=alpha)
        assert torch.allclose(loss, loss_moved, atol=1e-4), (alpha, loss, loss_moved)
        for name in parts:
            assert torch.allclose(parts[name], parts_moved[name], atol=1e-4), name
        loss.backward()
        loss_moved.backward()
        assert torch.allclose(base.grad, moved.grad, atol=1e-5)
        assert torch.all(base.grad.sum(-1).abs() < 1e-6)  # the gradient a shared bias would get: zero
        if scores_of_teacher is not None:  # shifting the teacher's scores does not change the KL either
            _, shifted_teacher = ranking_loss(scores, target, scores_of_teacher + shift, temperature=2.0, alpha=alpha)
            assert torch.allclose(shifted_teacher["kl"], parts["kl"], atol=1e-4)
    # The check is not vacuous: shifting one candidate only does change the loss.
    one = scores.clone()
    one[:, 0] += shift
    assert (ranking_loss(one, target)[0] - ranking_loss(scores, target)[0]).abs() > 1e-3


def test_training_lists_are_seeded_shuffled_and_unseen_negatives():
    recipe = RankerRecipe.from_yaml("teacher_tiny.yaml", limit_train_users=None, targets_per_user=3)
    split = leave_one_out(make_synthetic_dataset(seed=0))
    lists = ranking_lists.build_training_lists(split, recipe)
    again = ranking_lists.build_training_lists(split, recipe)
    assert lists.equals(again) and lists.key == again.key
    assert len(set(lists.target_index.tolist())) > 1  # the target is not always in column 0
    for row in range(len(lists)):
        user, cands = lists.users[row], lists.candidates[row]
        target = cands[lists.target_index[row]]
        seq = split.train_sequence(user).tolist()
        history = [i for i in lists.histories[row] if i >= 0]
        assert target in seq and seq[seq.index(target) - len(history) : seq.index(target)] == history
        negatives = set(cands.tolist()) - {int(target)}
        assert len(negatives) == recipe.num_negatives and not negatives & set(split.interacted_items(user).tolist())
    other = ranking_lists.build_training_lists(split, recipe.replace(seed=1))
    assert other.key != lists.key


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"alpha": 1.5}, "alpha"),
        ({"temperature": 0}, "temperature"),
        ({"lora": {"rank": 0}}, "lora.rank"),
        ({"lora": {"target_modules": "q_proj"}}, "lora.target_modules"),
        ({"lora": {"rank": 2, "bogus": 1}}, "lora.bogus"),
        ({"lora": {"rank": 2}, "freeze_language_model": False}, "lora"),
        ({"lora": "big"}, "lora"),
        ({"item": {"feature_dim": 8}}, "item.feature_dim"),
        ({"item": {"projector": "conv"}}, "item.projector"),
        ({"user": {"item_dim": 8}}, "user.item_dim"),
        ({"user": {"num_tokens": 0}}, "user.num_tokens"),
        ({"fine_tuning": "lora"}, "fine_tuning"),
        ({"targets_per_user": 0}, "targets_per_user"),
        ({"negative_pool": 2}, "negative_pool"),
        ({"hard_negatives": 1.5}, "hard_negatives"),
        ({"teacher": "gpt"}, "teacher"),
        ({"teacher_weighting": "loud"}, "teacher_weighting"),
        ({"batch_size": 0}, "batch_size"),
        ({"val_protocol": "full"}, "val_protocol"),
        ({"teacher_scores": None}, "teacher_scores"),
        ({"item_features": "minilm+ids"}, "item_features"),
        ({"no_such_key": 1}, "no_such_key"),
        ({"num_workers": -1}, "num_workers"),
        ({"max_time_s": 0}, "max_time_s"),
        ({"max_time_s": True}, "max_time_s"),
    ],
)
def test_recipe_errors_name_the_field(overrides, field):
    with pytest.raises(RecipeError) as err:
        RankerRecipe.from_yaml("student_tiny.yaml", **overrides)
    assert err.value.field == field and str(err.value).startswith(f"{field}:")
    assert isinstance(err.value, MixLLMError)


def test_teacher_recipe_rejects_alpha():
    with pytest.raises(RecipeError, match="^alpha:"):
        RankerRecipe.from_yaml("teacher_tiny.yaml", alpha=0.5)


@pytest.mark.parametrize("name", ["teacher.yaml", "student.yaml", "student_labels.yaml", "teacher_tiny.yaml", "student_tiny.yaml",
                                  "student_user.yaml", "student_gpu.yaml", "student_gpu_hard.yaml"])
def test_packaged_recipes_parse(name):
    recipe = RankerRecipe.from_yaml(name)
    assert recipe.role == name.split("_")[0].split(".")[0]


def test_teacher_checkpoint_reloads_to_identical_scores(teacher_run, tmp_path):
    assert teacher_run.global_step == 2 and teacher_run.lightning_checkpoint.is_file()
    info = (teacher_run.ranker_dir / ranker_build.RUN_INFO_NAME).read_text()
    assert '"role": "teacher"' in info and '"fingerprint"' in info and '"seed": 0' in info
    live = teacher_run.ranker.eval()
    reloaded = MixLLMRanker.from_pretrained(teacher_run.ranker_dir, live.catalog)
    split = leave_one_out(make_synthetic_dataset(seed=0))
    lists = ranking_lists.build_validation_lists(split, RankerRecipe.from_yaml("teacher_tiny.yaml", cache_dir=str(tmp_path)))
    requests = [lists.request(i) for i in range(3)]
    with torch.no_grad():
        expected, got = live.score(requests), reloaded.score(requests)
    for a, b in zip(expected, got):
        torch.testing.assert_close(a, b)
    # full fine-tuning trained the LLM: the checkpoint differs from the fresh random base
    fresh, _ = tiny_language_model(0)
    assert not torch.equal(fresh.model.layers[0].mlp.up_proj.weight, reloaded.model.language_model.model.layers[0].mlp.up_proj.weight)


def test_student_distils_from_stored_scores_without_running_the_teacher(teacher_run, tmp_path, monkeypatch):
    scores_path = tmp_path / "teacher_scores.pt"
    recipe = _recipe("student_tiny.yaml", tmp_path, teacher_scores=str(scores_path),
                     teacher_checkpoint=str(teacher_run.ranker_dir), fast_dev_run=1)
    first = train_ranker(recipe)  # scores the lists once and stores them
    assert scores_path.is_file() and "train/kl" in first.metrics and "val/hr@1" in first.metrics
    stored = torch.load(scores_path, weights_only=True)
    split = leave_one_out(make_synthetic_dataset(seed=0))
    lists = ranking_lists.build_training_lists(split, recipe)
    assert stored["key"] == lists.key and torch.equal(stored["candidates"], torch.from_numpy(lists.candidates))
    teacher = MixLLMRanker.from_pretrained(teacher_run.ranker_dir, ItemCatalog(texts=split.dataset.item_texts))
    torch.testing.assert_close(teacher_scores.score_lists_with_teacher(teacher, lists, progress=False)[:4], stored["scores"][:4])

    def boom(*args, **kwargs):
        raise AssertionError("the teacher ran during student training")

    monkeypatch.setattr(teacher_scores, "score_lists_with_teacher", boom)
    monkeypatch.setattr(MixLLMRanker, "from_pretrained", boom)
    seen = []
    original = ranking_lists.ListCollator.__call__

    def spy(self, rows):
        batch = original(self, rows)
        seen.append(batch["teacher_scores"])
        return batch

    monkeypatch.setattr(ranking_lists.ListCollator, "__call__", spy)
    second = train_ranker(recipe)
    assert second.global_step == 1
    train_scores = [s for s in seen if s is not None]
    assert train_scores  # every training batch carries rows of the stored scores, nothing recomputed
    assert all(any(torch.equal(row, ref) for ref in stored["scores"]) for batch in train_scores for row in batch)

    # stored scores of other lists are refused, naming the field
    with pytest.raises(RecipeError, match="^teacher_scores:"):
        train_ranker(recipe.replace(seed=1))


def test_labels_only_student_needs_no_teacher(tmp_path):
    result = train_ranker(_recipe("student_tiny.yaml", tmp_path, alpha=0.0, teacher_scores=None, teacher_checkpoint=None,
                                  fast_dev_run=1))
    assert "train/kl" not in result.metrics and result.global_step == 1


def test_resume_from_lightning_checkpoint(tmp_path):
    recipe = _recipe("student_tiny.yaml", tmp_path, alpha=0.0, teacher_scores=None, max_steps=2, max_epochs=5)
    first = train_ranker(recipe)
    assert first.global_step == 2
    ckpt = torch.load(first.lightning_checkpoint, weights_only=False)
    assert all(not k.startswith("ranker.model.language_model.") for k in ckpt["state_dict"])  # frozen LLM referenced
    resumed = train_ranker(recipe.replace(max_steps=4), resume=first.lightning_checkpoint)
    assert resumed.global_step == 4
    with pytest.raises(RecipeError, match="^resume:"):
        train_ranker(recipe, resume=tmp_path / "missing.ckpt")


def test_a_wall_clock_budget_stops_the_run_and_still_writes_the_ranker(tmp_path):
    recipe = _recipe("student_tiny.yaml", tmp_path, alpha=0.0, teacher_scores=None, max_epochs=50, max_time_s=0.001)
    result = train_ranker(recipe)
    assert 1 <= result.global_step <= 3  # 50 epochs would be hundreds of steps
    record = json.loads((result.ranker_dir / "training_run.json").read_text())
    assert record["global_step"] == result.global_step and record["recipe"]["max_time_s"] == 0.001


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_two_cpu_processes_through_the_cli(tmp_path):
    raw = yaml.safe_load((CONFIG_DIR / "teacher_tiny.yaml").read_text())
    raw.update(strategy="ddp", devices=2, accelerator="cpu", max_steps=2, output_dir=str(tmp_path / "ddp"), cache_dir=str(tmp_path / "cache"))
    config = tmp_path / "teacher_ddp.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "mixllm", "train", "teacher", "--config", str(config)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ranker checkpoint:" in proc.stdout
    info = yaml.safe_load((tmp_path / "ddp" / "ranker" / ranker_build.RUN_INFO_NAME).read_text())
    assert info["world_size"] == 2 and info["global_step"] == 2


def test_cli_rejects_a_recipe_of_the_other_role(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mixllm", "train", "student", "--config", "teacher_tiny.yaml"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("mixllm: error: role:")


def test_item_features_sasrec_checkpoint_and_concatenation(tmp_path):
    from mixllm.baselines.sasrec import SASRec, SASRecConfig

    dataset = make_synthetic_dataset(seed=0)
    torch.manual_seed(0)
    sasrec = SASRec(SASRecConfig(num_items=dataset.num_items, hidden_size=8, max_history=5))
    home = tmp_path / "home"
    folder = home / "checkpoints" / f"sasrec-{dataset.name}-seed0"
    sasrec.save_pretrained(folder, provenance={"dataset_fingerprint": dataset.fingerprint()})
    table = sasrec.item_embeddings().detach()
    by_name = ranker_build.load_item_features(RankerRecipe(role="student", alpha=0.0, item_features="sasrec", cache_dir=str(home)), dataset)
    by_path = ranker_build.load_item_features(RankerRecipe(role="student", alpha=0.0, item_features=str(folder)), dataset)
    assert torch.equal(by_name, table) and torch.equal(by_path, table)
    ids_npy = tmp_path / "extra.npy"
    import numpy as np

    extra = np.arange(dataset.num_items * 3, dtype=np.float32).reshape(dataset.num_items, 3)
    np.save(ids_npy, extra)
    both = ranker_build.load_item_features(RankerRecipe(role="student", alpha=0.0, item_features=f"sasrec+{ids_npy}", cache_dir=str(home)), dataset)
    assert both.shape == (dataset.num_items, 11) and torch.equal(both[:, 8:], torch.from_numpy(extra))
    np.save(ids_npy, extra[:-1])
    with pytest.raises(RecipeError, match=r"^item_features: .*extra.npy has shape \(49, 3\); expected \(50, F\)"):
        ranker_build.load_item_features(RankerRecipe(role="student", alpha=0.0, item_features=str(ids_npy)), dataset)
    other = make_synthetic_dataset(seed=1)  # same name, other data: the stored SASRec must be refused
    with pytest.raises(RecipeError, match="trained on another version"):
        ranker_build.load_item_features(RankerRecipe(role="student", alpha=0.0, item_features="sasrec", cache_dir=str(home)), other)


def test_set_overrides_are_read_as_yaml_values_and_checked():
    values = parse_overrides(["lr=1e-4", "item_features=minilm", "teacher_scores=null", "lora.target_modules=[q_proj, v_proj]"])
    assert values == {"lr": 1e-4, "item_features": "minilm", "teacher_scores": None, "lora.target_modules": ["q_proj", "v_proj"]}
    recipe = RankerRecipe.from_yaml("student.yaml", **parse_overrides(["item_features=sasrec", "output_dir=runs/x"]))
    assert (recipe.item_features, recipe.output_dir, recipe.alpha) == ("sasrec", "runs/x", 0.5)
    with pytest.raises(RecipeError, match="^--set: expected FIELD=VALUE"):
        parse_overrides(["lr"])
    with pytest.raises(RecipeError, match="^bogus: unknown key"):
        RankerRecipe.from_yaml("student.yaml", **parse_overrides(["bogus=1"]))
    with pytest.raises(RecipeError, match="^config: .*not supported"):
        RankerRecipe.from_yaml("student.yaml", lr="fast")
