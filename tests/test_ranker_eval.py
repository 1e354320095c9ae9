"""``mixllm eval ranker`` (training/ranker_eval.py) on a tiny folder dataset, tiny SASRec and tiny rankers (CPU)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from mixllm import cli
from mixllm.data import PROTOCOLS, leave_one_out, load_dataset, make_synthetic_dataset
from mixllm.data.evaluation import Ranker, RankingBatch, make_batch
from mixllm.errors import MixLLMError
from mixllm.ranking import ItemCatalog, MixLLMRanker, ProtocolRanker
from mixllm.stats import mean_std
from training import ranker_eval
from mixllm.retrieval import FaissRetriever
from training.ranker_eval import full_ranking_metrics, per_user_metrics
from training.ranker_build import load_or_train_sasrec
from training.ranker_recipe import RankerRecipe
from training.rankers import train_ranker

DATASET_NAME = "tinyrank"
NUM_ITEMS = 160  # sampled-100 needs 99 never-interacted negatives per user
NUM_USERS = 24
SEED = 0


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A folder dataset, its tiny SASRec in the cache, a tiny teacher, a distilled and a labels-only student."""
    from training.sasrec import SASRecTrainConfig, train_sasrec

    root = tmp_path_factory.mktemp("ranker_eval")
    folder = root / DATASET_NAME
    folder.mkdir()
    synthetic = make_synthetic_dataset(num_users=NUM_USERS, num_items=NUM_ITEMS, pattern="next-item", seed=SEED)
    inter, items = synthetic.interactions, synthetic.items
    item_ids = items["item_id"].to_numpy()
    inter_frame = inter.assign(user_id=synthetic.user_ids[inter["user_idx"].to_numpy()],
                               item_id=item_ids[inter["item_idx"].to_numpy()])[["user_id", "item_id", "timestamp", "rating"]]
    inter_frame.to_csv(folder / "interactions.csv", index=False)
    items[["item_id", "text"]].to_csv(folder / "items.csv", index=False)
    dataset = load_dataset(folder)
    assert dataset.name == DATASET_NAME and dataset.num_items == NUM_ITEMS and dataset.num_users == NUM_USERS

    cache = root / "cache"
    split = leave_one_out(dataset)
    sasrec, _ = train_sasrec(split, SASRecTrainConfig.from_yaml("sasrec_tiny.yaml"), SEED, progress_bar=False)
    sasrec_dir = cache / "checkpoints" / f"sasrec-{DATASET_NAME}-seed{SEED}"
    sasrec.save_pretrained(sasrec_dir, provenance={"dataset": DATASET_NAME, "dataset_fingerprint": dataset.fingerprint(),
                                                   "seed": SEED})

    def recipe(name: str, out: str, **overrides) -> RankerRecipe:
        return RankerRecipe.from_yaml(name, dataset=str(folder), cache_dir=str(cache), output_dir=str(root / out),
                                      progress_bar=False, max_steps=2, **overrides)

    teacher = train_ranker(recipe("teacher_tiny.yaml", "teacher")).ranker_dir
    student = train_ranker(recipe("student_tiny.yaml", "student", teacher_checkpoint=str(teacher),
                                  teacher_scores=str(root / "teacher_scores.pt"))).ranker_dir
    # A different history length (3 vs 4): the side-by-side speed run must give each model its own H.
    labels = train_ranker(recipe("student_tiny.yaml", "labels", alpha=0.0, teacher_scores=None, teacher_checkpoint=None,
                                 max_history=3)).ranker_dir
    return {"root": root, "folder": folder, "cache": cache, "dataset": dataset, "split": split,
            "teacher": teacher, "student": student, "labels": labels}


def _sasrec(setup):
    model = load_or_train_sasrec(setup["dataset"], SEED, str(setup["cache"]), progress=False)
    assert model.config.max_history == 8  # the fixture's tiny model, not a freshly trained default one
    return model


def _args(setup, *extra: str, checkpoints: list[str] | None = None, output: Path | None = None) -> list[str]:
    checkpoints = checkpoints or [str(setup["teacher"]), str(setup["student"]), str(setup["labels"])]
    output = output or setup["root"] / "report" / "rankers.json"
    return ["eval", "ranker", "--checkpoint", *checkpoints, "--dataset", str(setup["folder"]), "--cache-dir",
            str(setup["cache"]), "--output", str(output), "--seed", str(SEED), "--no-progress", "--threads", "1",
            "--device", "cpu", *extra]


# --- end to end ----------------------------------------------------------------------------------
T20, T100, SPEED_REQUESTS, SPEED_BATCH = 5, 3, 3, 4
SEEDS = (0, 1, 2)  # candidate seeds of the sampled protocols
DEPTHS = (10, 30)  # rerank depths of full ranking: 30 retrieves most targets, 10 misses some
RETRIEVE = 30  # the headline depth


def _eval(setup, *extra: str, checkpoints: list[str] | None = None, output: Path, seeds: tuple[int, ...] | None = SEEDS,
          depths: tuple[int, ...] = DEPTHS, headline: int | None = RETRIEVE) -> dict:
    """Run ``mixllm eval ranker`` on ``_args`` with several candidate seeds (None: the one of ``--seed``),
    rerank depths and a headline depth set on the parsed arguments (the report fixture's options are what
    is under test, not their command-line spelling); returns the JSON report."""
    args = cli.build_parser().parse_args(_args(setup, *extra, checkpoints=checkpoints, output=output))
    if seeds is not None:
        args.seeds = list(seeds)
    args.retrieve, args.headline_depth = list(depths), headline
    assert ranker_eval.cli_eval_ranker(args) == 0
    return json.loads(output.read_text())


@pytest.fixture(scope="module")
def report(setup):
    output = setup["root"] / "report" / "rankers.json"
    data = _eval(setup, "--teacher-users-20", str(T20), "--teacher-users-100", str(T100), "--speed-requests",
                 str(SPEED_REQUESTS), "--speed-batch-size", str(SPEED_BATCH), "--batch-size", "4", output=output)
    return data, output


def _rows(data: dict) -> dict[str, dict]:
    return {row["name"]: row for row in data["rankers"]}


NAMES = ["Popularity", "SASRec (H=8)", "teacher", "student (distilled, ids)", "student (labels only, ids)"]


def test_cli_report_rows_users_and_metrics(setup, report):
    data, output = report
    rows = _rows(data)
    assert list(rows) == NAMES
    assert data["users"] == NUM_USERS and data["dataset"]["name"] == DATASET_NAME and data["seeds"] == list(SEEDS)
    assert data["teacher_users"] == {"sampled-20": T20, "sampled-100": T100, "full": T100}
    assert [rows[n]["kind"] for n in NAMES] == ["popularity", "sasrec", "teacher", "student", "student"]
    assert rows["student (labels only, ids)"]["max_history"] == 3 and rows["teacher"]["max_history"] == 4
    for name, row in rows.items():
        teacher = name == "teacher"
        expected_users = {"sampled-20": T20, "sampled-100": T100, "full": T100} if teacher else dict.fromkeys(
            ("sampled-20", "sampled-100", "full"), NUM_USERS)
        assert row["users"] == expected_users, name
        for key in ("metrics", "metrics_common_users"):
            assert set(row[key]) == {"sampled-20", "sampled-100", "full"}
            for protocol, values in row[key].items():
                assert set(values) == set(PROTOCOLS[protocol].metrics), (name, protocol)
                for metric, stats in values.items():
                    if protocol == "full":  # scored once: no candidate seed
                        assert stats == {"mean": stats["mean"], "std": 0.0, "n": 1}, (name, key, metric)
                        assert 0.0 <= stats["mean"] <= 1.0
                        continue
                    per_seed = stats["per_seed"]
                    assert list(per_seed) == [str(seed) for seed in SEEDS], (name, key, protocol, metric)
                    assert all(0.0 <= v <= 1.0 for v in per_seed.values()), (name, key, protocol, metric, per_seed)
                    expected = mean_std(list(per_seed.values()))
                    assert {k: stats[k] for k in expected} == pytest.approx(expected, abs=1e-12), (name, key, protocol, metric)
        if teacher:  # the teacher is scored on exactly the common users
            assert row["metrics"] == row["metrics_common_users"]

    # Full ranking at every depth: the LLM rows rerank the top k, SASRec's row has its own order of it;
    # the headline columns are the headline depth's.
    retrieval = data["retrieval"]
    assert retrieval["depths"] == list(DEPTHS) and retrieval["headline_depth"] == RETRIEVE
    assert list(retrieval["recall"]) == [str(k) for k in DEPTHS]
    assert retrieval["recall"]["10"] <= retrieval["recall"]["30"]
    assert "full_by_depth" not in rows["Popularity"]
    for name in NAMES[1:]:
        by_depth = rows[name]["full_by_depth"]
        assert list(by_depth) == [str(k) for k in DEPTHS]
        for k, values in by_depth.items():
            assert set(values) == set(PROTOCOLS["full"].metrics)
            if rows[name]["users"]["full"] == NUM_USERS:  # a reranker's recall is bounded by the retrieval's
                assert values["recall@20"] <= retrieval["recall"][k] + 1e-9 and values["recall@10"] <= retrieval["recall"][k] + 1e-9
        if name != "SASRec (H=8)":
            assert {m: v["mean"] for m, v in rows[name]["metrics"]["full"].items()} == by_depth[str(RETRIEVE)]

    markdown = output.with_suffix(".md")
    assert markdown.is_file()
    text = markdown.read_text()
    assert all(name in text for name in NAMES)
    hr1 = rows["Popularity"]["metrics"]["sampled-20"]["hr@1"]
    assert f"| Popularity | 0 | {hr1['mean']:.4f} ± {hr1['std']:.4f} |" in text  # mean ± std over the seeds
    assert "| Model | top-10 | top-30 |" in text and "k = 30" in text
    assert "Paired comparisons" in text and "skipped" not in text


# Scores of the tiny rankers are O(1) float32 values; computing them in differently shaped batches
# (other padding, other matrix shapes) changes each by a few ulps, ~1e-7 relative. A candidate whose
# score is within NEAR_TIE (relative to the largest |score| of its list, at least 1) of the target's is a
# tie up to rounding: 1e-4 is ~1000x that rounding, and far below the gaps between distinct scores
# that decide these metrics.
NEAR_TIE = 1e-4


class _NudgedTarget(Ranker):
    """``inner``'s scores with each user's test target moved by ``delta`` (times the list's score
    scale): the target's order against every candidate farther away than that is unchanged, and every
    near-tie goes its way (delta > 0) or against it (delta < 0). Metrics are monotone in the target's
    rank, so any computation of ``inner`` that differs from this one by less than |delta| / 2 per score
    gives per-user metrics between those of ``-delta`` and ``+delta``."""

    def __init__(self, inner: Ranker, targets: np.ndarray, delta: float) -> None:
        self.inner, self.targets, self.delta = inner, torch.from_numpy(targets), delta
        self.name, self.max_history = inner.name, inner.max_history

    def score(self, batch: RankingBatch) -> torch.Tensor:
        scores = self.inner.score(batch)
        scale = scores.abs().amax(dim=1, keepdim=True).clamp_min(1.0)  # (B, 1)
        is_target = batch.candidates == self.targets[batch.users].unsqueeze(1)  # (B, C)
        return scores + self.delta * scale * is_target


def test_cli_metrics_match_an_independent_recomputation(setup, report):
    """Per-seed row metrics are means over all users of that seed's lists, common-user metrics over the
    first N users; full ranking at each depth, SASRec's own order and the retrieval recall likewise."""
    data, _ = report
    rows = _rows(data)
    split = setup["split"]
    cache = str(setup["cache"])
    sasrec = _sasrec(setup)
    retriever = FaissRetriever(sasrec)
    from mixllm.baselines import PopularityRanker

    shared = {"sampled-20": T20, "sampled-100": T100, "full": T100}
    popularity = PopularityRanker.fit(split)
    for protocol, seed in [(p, s) for p in ("sampled-20", "sampled-100") for s in SEEDS] + [("full", None)]:
        values = per_user_metrics(popularity, split, protocol, np.arange(NUM_USERS), seed or 0, cache, retriever, RETRIEVE,
                                  chunk=7, progress=False)  # fmt: skip
        for metric, per_user in values.items():
            assert len(per_user) == NUM_USERS
            for key, users in (("metrics", NUM_USERS), ("metrics_common_users", shared[protocol])):
                stats = rows["Popularity"][key][protocol][metric]
                reported = stats["mean"] if seed is None else stats["per_seed"][str(seed)]
                assert reported == pytest.approx(per_user[:users].mean(), abs=1e-6), (key, protocol, seed, metric)

    # An LLM row through the retriever: the distilled student on sampled-20 (each seed) and on full
    # ranking (each depth). Unlike popularity counts, its scores are float32 forwards that this
    # recomputation batches differently (chunks of 5 users, not the report's), so each score may differ
    # from the report's by rounding, and a candidate within that rounding of the target may rank on
    # either side of it. So the report must lie between the recomputation with every such near-tie
    # resolved against the target and with every one resolved for it (_NudgedTarget); with no near-tie
    # both bounds are the exact recomputation, and a misaligned user, list, seed or chunk moves a mean
    # by >= 1 / 24 user.
    student = ProtocolRanker(MixLLMRanker.from_pretrained(setup["student"], ItemCatalog(texts=setup["dataset"].item_texts)),
                             "student", batch_size=4)
    row = rows["student (distilled, ids)"]
    targets = split.targets("test")
    for protocol, variant in [("sampled-20", seed) for seed in SEEDS] + [("full", depth) for depth in DEPTHS]:
        low, high = (per_user_metrics(_NudgedTarget(student, targets, delta), split, protocol, np.arange(NUM_USERS),
                                      variant if protocol != "full" else SEED, cache, retriever, variant, chunk=5,
                                      progress=False) for delta in (-NEAR_TIE, NEAR_TIE))  # fmt: skip
        for metric in low:
            assert (low[metric] <= high[metric]).all(), (protocol, metric)
            if protocol == "full":
                reported = [(row["full_by_depth"][str(variant)][metric], NUM_USERS)]
                if variant == RETRIEVE:
                    reported += [(row["metrics"]["full"][metric]["mean"], NUM_USERS),
                                 (row["metrics_common_users"]["full"][metric]["mean"], T100)]  # fmt: skip
            else:
                reported = [(row["metrics"][protocol][metric]["per_seed"][str(variant)], NUM_USERS),
                            (row["metrics_common_users"][protocol][metric]["per_seed"][str(variant)], T20)]  # fmt: skip
            for value, users in reported:
                lo, hi = low[metric][:users].mean(), high[metric][:users].mean()
                # 1e-6: the per-user values are float32 (<= 1, rounding <= 6e-8) on both sides
                assert lo - 1e-6 <= value <= hi + 1e-6, (protocol, variant, metric, users, value, lo, hi)

    # SASRec's own order of its top k, and the retrieval recall: the hit rate of the FAISS top k.
    users = np.arange(NUM_USERS)
    allowed = ~split.interaction_mask(users)
    allowed[users, targets] = True
    history = torch.from_numpy(split.histories("test", sasrec.config.max_history))
    for depth in DEPTHS:
        with torch.inference_mode():
            own, hit = full_ranking_metrics(sasrec, retriever, split, users, depth, sasrec.config.max_history)
        for metric, value in own.items():
            assert rows["SASRec (H=8)"]["full_by_depth"][str(depth)][metric] == pytest.approx(value.mean().item(), abs=1e-6)
        retrieved = retriever.top_k(history, allowed, depth)
        assert data["retrieval"]["recall"][str(depth)] == pytest.approx((retrieved == targets[:, None]).any(1).mean())
        assert data["retrieval"]["recall"][str(depth)] == pytest.approx(hit.double().mean().item())


def test_cli_speed_and_targets(setup, report):
    data, _ = report
    rows = _rows(data)
    for name in ("Popularity", "SASRec (H=8)"):
        assert "speed" not in rows[name]
    for name in ("teacher", "student (distilled, ids)", "student (labels only, ids)"):
        speed = rows[name]["speed"]
        assert speed["requests_per_s"] > 0 and speed["candidates_per_s"] > 0 and speed["prompt_tokens_per_request"] > 0
        # 3 requests in batches of 4: one batch of 3 requests; the rate counts the requests actually timed
        assert len(speed["batch_times_s"]) == 1
        assert speed["requests_per_s"] * speed["median_batch_s"] == pytest.approx(SPEED_REQUESTS)
        assert speed["candidates_per_s"] * speed["median_batch_s"] == pytest.approx(SPEED_REQUESTS * 20)
    teacher_tokens = rows["teacher"]["speed"]["prompt_tokens_per_request"]
    student_tokens = rows["student (distilled, ids)"]["speed"]["prompt_tokens_per_request"]
    assert teacher_tokens > student_tokens
    # the H=3 student reads fewer history items than the H=4 student on the same requests
    assert rows["student (labels only, ids)"]["speed"]["prompt_tokens_per_request"] < student_tokens
    assert data["speed_setup"]["requests"] == SPEED_REQUESTS and data["speed_setup"]["batch_size"] == SPEED_BATCH

    targets = data["targets"]
    assert set(targets) == {"prompt_tokens_ratio", "throughput_ratio", "hr1_vs_teacher", "hr1_vs_sasrec",
                            "distilled_vs_labels_only", "reranked_vs_sasrec_order"}
    assert targets["prompt_tokens_ratio"]["value"] == pytest.approx(teacher_tokens / student_tokens)
    assert targets["prompt_tokens_ratio"]["met"] == (teacher_tokens / student_tokens >= 10)
    distilled, labels, sasrec = rows["student (distilled, ids)"], rows["student (labels only, ids)"], rows["SASRec (H=8)"]
    assert targets["distilled_vs_labels_only"]["distilled"] == distilled["metrics"]["sampled-20"]["hr@1"]["mean"]
    assert targets["distilled_vs_labels_only"]["labels_only"] == labels["metrics"]["sampled-20"]["hr@1"]["mean"]
    assert targets["hr1_vs_teacher"]["teacher"] == rows["teacher"]["metrics_common_users"]["sampled-20"]["hr@1"]["mean"]
    assert targets["hr1_vs_teacher"]["student"] == distilled["metrics_common_users"]["sampled-20"]["hr@1"]["mean"]
    assert targets["hr1_vs_sasrec"]["sasrec"] == sasrec["metrics"]["sampled-20"]["hr@1"]["mean"]
    # "above SASRec": the paired interval above zero on every candidate seed, not only a higher mean
    per_seed = data["comparisons"]["student_vs_sasrec"]["results"]
    assert targets["hr1_vs_sasrec"]["met"] == all(per_seed[str(seed)]["above_zero"] for seed in SEEDS)
    assert targets["hr1_vs_sasrec"]["intervals_above_zero"] == sum(r["above_zero"] for r in per_seed.values())
    # "above SASRec's order": the paired interval at the headline depth
    rerank, headline = targets["reranked_vs_sasrec_order"], data["comparisons"]["reranked_vs_sasrec_order"]["results"][str(RETRIEVE)]
    assert rerank["depth"] == RETRIEVE and rerank["met"] == headline["above_zero"]
    assert (rerank["difference"], rerank["low"], rerank["high"]) == (headline["mean"], headline["low"], headline["high"])
    assert rerank["reranked"] == distilled["full_by_depth"][str(RETRIEVE)]["ndcg@10"]
    assert rerank["sasrec_order"] == sasrec["full_by_depth"][str(RETRIEVE)]["ndcg@10"]
    for value in targets.values():
        assert isinstance(value["met"], bool)


def test_comparisons_pair_the_common_users_per_seed_and_depth(report):
    """Each comparison's n is the number of users both rows were scored on, and its mean is the
    difference of the two rows' reported means on those users (same users, same lists)."""
    data, output = report
    rows, comparisons = _rows(data), data["comparisons"]
    student, sasrec, teacher, labels = (rows[n] for n in (NAMES[3], NAMES[1], NAMES[2], NAMES[4]))

    def hr1(row: dict, seed: int, common: bool = False) -> float:
        return row["metrics_common_users" if common else "metrics"]["sampled-20"]["hr@1"]["per_seed"][str(seed)]

    expected = {  # key: (a, b, per variant: (n, mean of a - b))
        "student_vs_sasrec": (student, sasrec, {str(s): (NUM_USERS, hr1(student, s) - hr1(sasrec, s)) for s in SEEDS}),
        "reranked_vs_sasrec_order": (student, sasrec, {str(k): (NUM_USERS, student["full_by_depth"][str(k)]["ndcg@10"] -
                                                                sasrec["full_by_depth"][str(k)]["ndcg@10"]) for k in DEPTHS}),
        "student_vs_teacher": (student, teacher, {str(s): (T20, hr1(student, s, True) - hr1(teacher, s, True)) for s in SEEDS}),
        "distilled_vs_labels_only": (student, labels, {str(s): (NUM_USERS, hr1(student, s) - hr1(labels, s)) for s in SEEDS}),
    }  # fmt: skip
    assert list(comparisons) == list(expected)
    for key, (a, b, variants) in expected.items():
        comparison = comparisons[key]
        assert a["name"] in comparison["a"] and b["name"] in comparison["b"] and "skipped" not in comparison
        assert list(comparison["results"]) == list(variants), key
        for variant, (n, mean) in variants.items():
            result = comparison["results"][variant]
            assert result["n"] == n, (key, variant)
            # 1e-6: the rows' means are of float32 per-user values, the bootstrap's in float64
            assert result["mean"] == pytest.approx(mean, abs=1e-6), (key, variant)
            assert result["low"] <= result["mean"] <= result["high"] and result["above_zero"] == (result["low"] > 0)
            assert result["confidence"] == 0.95
    text = output.with_suffix(".md").read_text()
    r = comparisons["student_vs_teacher"]["results"]["1"]
    assert f"| seed 1 | {T20} | {r['mean']:+.4f} | [{r['low']:+.4f}, {r['high']:+.4f}] |" in text


def test_paired_difference_of_a_ranker_with_itself_is_zero_and_needs_the_same_users(setup):
    from mixllm.baselines import PopularityRanker

    split, users = setup["split"], np.arange(NUM_USERS)
    values = per_user_metrics(PopularityRanker.fit(split), split, "sampled-20", users, SEED, str(setup["cache"]), None,
                              RETRIEVE, progress=False)  # fmt: skip
    run = ranker_eval.UserMetrics(users, values)
    itself = ranker_eval.paired_difference(run, run, "hr@1")
    assert (itself["mean"], itself["low"], itself["high"], itself["n"]) == (0.0, 0.0, 0.0, NUM_USERS)
    assert itself["above_zero"] is False
    # a row scored on fewer users (the teacher): paired on those, the first T20
    first = ranker_eval.UserMetrics(users[:T20], {m: v[:T20] for m, v in values.items()})
    assert ranker_eval.paired_difference(run, first, "mrr")["n"] == T20
    # the same values in another user order are not paired
    reversed_users = ranker_eval.UserMetrics(users[::-1], {m: v[::-1] for m, v in values.items()})
    with pytest.raises(ValueError, match="same first 24 users in the same order"):
        ranker_eval.paired_difference(run, reversed_users, "hr@1")


# --- retrieval and full ranking ------------------------------------------------------------------
def test_faiss_top_k_is_the_masked_sasrec_top_k(setup):
    split = setup["split"]
    sasrec = _sasrec(setup)
    retriever = FaissRetriever(sasrec)
    users = np.arange(NUM_USERS)
    history = torch.from_numpy(split.histories("test", sasrec.config.max_history, users))
    with torch.no_grad():
        scores = sasrec.score_all(make_batch(split, "test", users, sasrec.config.max_history)).float()  # (U, N)
    rng = np.random.default_rng(0)
    full_mask = ~split.interaction_mask(users)
    # the unconstrained best items banned for half the users: top_k must search past them
    banned = full_mask.copy()
    banned[np.arange(0, NUM_USERS, 2)[:, None], scores.topk(40, dim=1).indices[::2].numpy()] = False
    for allowed in (full_mask, rng.random((NUM_USERS, NUM_ITEMS)) < 0.3, banned):
        for k in (1, 10, 25):
            got = retriever.top_k(history, allowed, k)
            assert got.shape == (NUM_USERS, k) and got.dtype == np.int64
            assert allowed[np.arange(NUM_USERS)[:, None], got].all()  # only allowed items
            assert all(len(set(row)) == k for row in got.tolist())  # no repeats
            masked = scores.masked_fill(~torch.from_numpy(allowed), float("-inf"))
            best = masked.topk(k, dim=1)
            # same order up to ties: the scores at each rank agree, and distinct scores give the same items
            # FAISS computes the same inner products as torch in another summation order (float32
            # rounding, ~1e-7 relative on these scores), so at a near-tie it may pick either item: the
            # scores at each rank agree within 1e-5, and the items agree wherever the item leads the
            # next one (for the last rank: the best item left out of the top k) and trails the
            # previous one by more than 1e-4, i.e. far beyond that rounding.
            torch.testing.assert_close(scores.gather(1, torch.from_numpy(got)), best.values, rtol=1e-5, atol=1e-5)
            next_best = masked.topk(k + 1, dim=1).values[:, k:]  # (U, 1)
            gaps = best.values - torch.cat([best.values[:, 1:], next_best], 1)
            lead = torch.cat([torch.full((NUM_USERS, 1), float("inf")), gaps[:, :-1]], 1)
            clear = (gaps > 1e-4) & (lead > 1e-4)
            assert torch.equal(torch.from_numpy(got)[clear], best.indices[clear])
    with pytest.raises(MixLLMError, match=r"retrieval found only \d+ allowed items; k = 60 is too large"):
        retriever.top_k(history, rng.random((NUM_USERS, NUM_ITEMS)) < 0.05, 60)


class _TargetScorer(Ranker):
    """Scores ``target_score`` for the user's test target and ``other`` for every other candidate."""

    max_history = 4

    def __init__(self, targets: np.ndarray, target_score: float, other: float = 0.0) -> None:
        self.targets, self.target_score, self.other = torch.from_numpy(targets), target_score, other
        self.seen: list[torch.Tensor] = []

    def score(self, batch: RankingBatch) -> torch.Tensor:
        self.seen.append(batch.candidates)
        is_target = batch.candidates == self.targets[batch.users].unsqueeze(1)
        return torch.where(is_target, self.target_score, self.other).float()


def test_full_ranking_oracle_constant_and_adversarial_rerankers(setup):
    split = setup["split"]
    sasrec = _sasrec(setup)
    retriever = FaissRetriever(sasrec)
    users = np.arange(NUM_USERS)
    targets = split.targets("test")
    for k in (10, 30):  # 30 retrieves most targets, 10 misses some: both must occur across k
        oracle = _TargetScorer(targets, 1.0)
        values, hit = full_ranking_metrics(oracle, retriever, split, users, k, sasrec.config.max_history)
        assert set(values) == set(PROTOCOLS["full"].metrics) and hit.shape == (NUM_USERS,)
        retrieved = oracle.seen[-1]
        assert retrieved.shape == (NUM_USERS, k)
        assert torch.equal(hit, (retrieved == torch.from_numpy(targets)[:, None]).any(1))
        # the reranker sees the retriever's items for the same users
        history = torch.from_numpy(split.histories("test", sasrec.config.max_history, users))
        allowed = ~split.interaction_mask(users)
        allowed[users, targets] = True
        assert torch.equal(retrieved, torch.from_numpy(retriever.top_k(history, allowed, k)))
        # oracle: a retrieved target ranks first, a missed one is a miss
        for name in ("recall@10", "recall@20", "ndcg@10"):
            assert torch.equal(values[name].double(), hit.double()), (k, name)
        # constant reranker: the target is tied with the k-1 other retrieved items (expected rank)
        flat, hit_flat = full_ranking_metrics(_TargetScorer(targets, 0.0), retriever, split, users, k, sasrec.config.max_history)
        assert torch.equal(hit_flat, hit)
        torch.testing.assert_close(flat["recall@10"].double(), hit.double() * min(10, k) / k)
        if k == 10:
            assert hit.any() and not hit.all()  # both cases are exercised

    # adversarial: the target scores lowest among more than 20 retrieved items -> nothing in the top 20
    worst, hit = full_ranking_metrics(_TargetScorer(targets, -1.0), retriever, split, users, 30, sasrec.config.max_history)
    assert hit.any()
    for name in ("recall@10", "recall@20", "ndcg@10"):
        assert torch.count_nonzero(worst[name]) == 0, name
    # lowest of 21 retrieved items: rank 20, just outside recall@20
    worst21, _ = full_ranking_metrics(_TargetScorer(targets, -1.0), retriever, split, users, 21, sasrec.config.max_history)
    assert torch.count_nonzero(worst21["recall@20"]) == 0


# --- bad input -----------------------------------------------------------------------------------
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING) ")


def _one_error_line(capsys, loaded_models: bool = False) -> str:
    """The one stderr line of a refused command (log records reach stderr only where pytest's logging
    plugin is off; transformers' "Loading weights" bars appear where checkpoints were loaded first)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not LOG_LINE.match(line)]
    if loaded_models:
        lines = [line for line in lines if not line.startswith("Loading weights")]
    assert len(lines) == 1, err
    assert lines[0].startswith("mixllm: error: ")
    return lines[0]


def test_missing_checkpoint_exits_2_naming_the_path(setup, tmp_path, capsys):
    missing = tmp_path / "nonexistent"
    code = cli.main(_args(setup, checkpoints=[str(missing)], output=tmp_path / "r.json"))
    assert code == 2
    line = _one_error_line(capsys)
    assert str(missing) in line and "--checkpoint" in line
    assert not (tmp_path / "r.json").exists()


def test_duplicate_row_names_exit_2_naming_the_option(setup, tmp_path, capsys):
    student = str(setup["student"])
    code = cli.main(_args(setup, checkpoints=[student, student], output=tmp_path / "r.json"))
    assert code == 2
    assert "--checkpoint NAME=PATH" in _one_error_line(capsys, loaded_models=True)
    # a NAME=PATH clashing with a baseline row
    code = cli.main(_args(setup, checkpoints=[f"Popularity={student}"], output=tmp_path / "r.json"))
    assert code == 2
    assert "Popularity" in _one_error_line(capsys, loaded_models=True)
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("option", ["--teacher-users-20", "--teacher-users-100", "--speed-requests", "--retrieve"])
def test_non_positive_limits_exit_2_naming_the_option(setup, tmp_path, capsys, option):
    code = cli.main(_args(setup, option, "0", output=tmp_path / "r.json"))
    assert code == 2
    line = _one_error_line(capsys)
    assert f"{option} must be >= 1" in line
    assert not (tmp_path / "r.json").exists()


def test_bad_checkpoint_spec_and_device(setup, tmp_path, capsys):
    code = cli.main(_args(setup, checkpoints=["=nowhere"], output=tmp_path / "r.json"))
    assert code == 2 and "--checkpoint '=nowhere'" in _one_error_line(capsys)
    # a row name may hold "=" (the Makefile's "m = 4 user tokens"): the path follows the last one
    assert ranker_eval._parse_checkpoint("m = 4 tokens=runs/a") == ("m = 4 tokens", Path("runs/a"))
    assert ranker_eval._parse_checkpoint("runs/a") == (None, Path("runs/a"))
    code = cli.main(_args(setup, output=tmp_path / "r.json")[:-2] + ["--device", "tpu"])
    assert code == 2 and "--device" in _one_error_line(capsys)
    assert isinstance(ranker_eval.EvalError("x"), MixLLMError)


def test_one_seed_a_protocol_subset_and_missing_rows_skip_their_comparisons(setup, tmp_path, report):
    """The command line as it is typed (``--seed`` = one candidate seed), only the distilled student,
    only sampled-20: the comparisons with no teacher, no labels-only student or no full ranking are
    skipped with a note, and their targets left out."""
    output = tmp_path / "subset.json"
    # The report's --batch-size: the same batches give the same float32 scores, so the metrics must
    # agree exactly (to the 1e-6 of float32 per-user values), near-ties included.
    code = cli.main(_args(setup, "--protocols", "sampled-20", "--speed-requests", "2", "--speed-batch-size", "2",
                          "--retrieve", str(RETRIEVE), "--batch-size", "4", checkpoints=[str(setup["student"])],
                          output=output))  # fmt: skip
    assert code == 0
    subset = json.loads(output.read_text())
    assert subset["seeds"] == [SEED]
    full = _rows(report[0])
    assert [row["name"] for row in subset["rankers"]] == ["Popularity", "SASRec (H=8)", "student (distilled, ids)"]
    for row in subset["rankers"]:
        assert list(row["metrics"]) == ["sampled-20"] and "full_by_depth" not in row
        for metric, stats in row["metrics"]["sampled-20"].items():
            reported = full[row["name"]]["metrics"]["sampled-20"][metric]["per_seed"][str(SEED)]
            assert (stats["n"], stats["std"], list(stats["per_seed"])) == (1, 0.0, [str(SEED)])
            assert stats["mean"] == stats["per_seed"][str(SEED)] == pytest.approx(reported, abs=1e-6), (row["name"], metric)
    comparisons = subset["comparisons"]
    assert list(comparisons["student_vs_sasrec"]["results"]) == [str(SEED)]
    assert comparisons["student_vs_sasrec"]["results"][str(SEED)]["n"] == NUM_USERS
    skipped = {key: c["skipped"] for key, c in comparisons.items() if "skipped" in c}
    assert skipped == {"reranked_vs_sasrec_order": "full was not scored (--protocols)",
                       "student_vs_teacher": "no teacher row in this report",
                       "distilled_vs_labels_only": "no labels-only student row in this report"}  # fmt: skip
    assert set(subset["targets"]) == {"hr1_vs_sasrec"}
    text = output.with_suffix(".md").read_text()
    assert "—" in text and "- student_vs_teacher: skipped — no teacher row in this report" in text
    assert "full ranking was not scored (`--protocols`)." in text and "top k for k in" not in text


def test_seeds_and_headline_depth_are_checked_naming_the_option(setup, tmp_path):
    args = cli.build_parser().parse_args(_args(setup, output=tmp_path / "r.json"))
    args.seeds, args.retrieve, args.headline_depth = [0, 1, 0], [10, 30], None
    with pytest.raises(ranker_eval.EvalError, match="--seeds: expected distinct seeds >= 0, got 0 1 0"):
        ranker_eval.run_eval(args)
    args.seeds, args.headline_depth = [0], 20
    with pytest.raises(ranker_eval.EvalError, match="--headline-depth 20 is not one of --retrieve 10 30"):
        ranker_eval.run_eval(args)
    args.headline_depth, args.compare = None, [["Popularity", "no such row"]]
    with pytest.raises(ranker_eval.EvalError, match="--compare 'no such row': not a row of this report; rows: "):
        ranker_eval.run_eval(args)
    assert not (tmp_path / "r.json").exists()


def test_the_named_student_is_the_one_compared_and_never_its_own_labels_only_twin():
    def row(name, kind="student", alpha=0.0, **extra):
        return {"name": name, "kind": kind, "training": {"recipe": {"alpha": alpha}}, **extra}

    rows = [row("distilled", alpha=0.5), row("user tokens"), row("fused", default_student=True), row("SASRec", "sasrec")]
    roles = ranker_eval._roles(rows)
    assert roles["student"]["name"] == "fused" and roles["sasrec"]["name"] == "SASRec"
    assert roles["labels"] is None  # a labels-only --student has no distillation to compare
    rows[2]["training"]["recipe"]["alpha"] = 0.5
    assert ranker_eval._roles(rows)["labels"]["name"] == "user tokens"
    del rows[2]["default_student"]  # no --student: the first distilled student, the first labels-only one
    roles = ranker_eval._roles(rows)
    assert roles["student"]["name"] == "distilled" and roles["labels"]["name"] == "user tokens"
    assert roles["alone"] is None and roles["labels_alone"] is None

    # Both fused: each brings its fusion-off row, and the two alone rows are compared too, paired per user.
    rows = [row("kd", alpha=0.5, default_student=True), row("kd [alone]", alpha=0.5, fusion_off_of="kd"),
            row("labels [alone]", fusion_off_of="labels"), row("labels"), row("SASRec", "sasrec")]
    roles = ranker_eval._roles(rows)
    assert [roles[r]["name"] for r in ("student", "alone", "labels", "labels_alone")] == ["kd", "kd [alone]", "labels",
                                                                                          "labels [alone]"]
    users = np.arange(40)
    hits = {"kd": users % 2, "kd [alone]": users % 3 == 0, "labels": users % 4 == 0, "labels [alone]": users % 5 == 0,
            "SASRec": users % 6 == 0}  # fmt: skip
    runs = {name: {("sampled-20", 0): ranker_eval.UserMetrics(users, {"hr@1": np.asarray(h, float)})} for name, h in hits.items()}
    comparisons = ranker_eval.paired_comparisons(rows, runs, [0], [20])
    alone = comparisons["distilled_vs_labels_only_alone"]
    assert (alone["a"], alone["b"]) == ("kd [alone]", "labels [alone]")
    assert alone["results"]["0"]["mean"] == pytest.approx(np.mean((users % 3 == 0) * 1.0 - (users % 5 == 0)))
    assert comparisons["distilled_vs_labels_only"]["results"]["0"]["mean"] == pytest.approx(0.5 - 0.25)
    del rows[2]  # the labels-only student unfused: no alone-vs-alone entry at all
    assert "distilled_vs_labels_only_alone" not in ranker_eval.paired_comparisons(rows, runs, [0], [20])

    # --compare A B: any two rows, on each protocol both were scored on (here sampled-20 only).
    named = ranker_eval.paired_comparisons(rows, runs, [0], [20], [("kd", "SASRec"), ("labels [alone]", "kd")])
    entry = named["kd − SASRec, sampled-20"]
    assert (entry["a"], entry["b"], entry["metric"], entry["per"]) == ("kd", "SASRec", "hr@1", "seed")
    assert entry["results"]["0"]["mean"] == pytest.approx(0.5 - np.mean(users % 6 == 0))
    assert entry["results"]["0"]["n"] == 40
    assert named["labels [alone] − kd, sampled-20"]["results"]["0"]["mean"] == pytest.approx(np.mean(users % 5 == 0) - 0.5)
    assert not any(key.endswith(", full") for key in named)  # full ranking was not scored
    with pytest.raises(ranker_eval.EvalError, match="--compare 'nope': not a row of this report"):
        ranker_eval.named_comparisons(runs, [0], [20], [("kd", "nope")])


def test_a_fused_student_gets_a_fusion_off_row_from_the_same_forward(setup, tmp_path, monkeypatch):
    """A fused checkpoint is reported twice: fused, and alone (fused minus gate x SASRec score, which is
    the unfused ranker's score), the second row costing no forward; the comparisons name both."""
    from torch import nn

    texts = setup["dataset"].item_texts
    source = MixLLMRanker.from_pretrained(setup["labels"], ItemCatalog(texts=texts))
    source.fusion_gate = nn.Parameter(torch.tensor(0.7))
    fused_dir = tmp_path / "fused"
    run = json.loads((Path(setup["labels"]) / "training_run.json").read_text())
    source.save_pretrained(fused_dir, provenance=run)
    (fused_dir / "training_run.json").write_text(json.dumps(run))
    scored: list[tuple[bytes, bytes]] = []
    original = ProtocolRanker.score

    def spy(self, batch):
        if self.retriever is not None:  # the fused ranker's forwards
            scored.append((np.asarray(batch.history).tobytes(), np.asarray(batch.candidates).tobytes()))
        return original(self, batch)

    monkeypatch.setattr(ProtocolRanker, "score", spy)
    output = tmp_path / "fused.json"
    data = _eval(setup, "--speed-requests", "2", "--speed-batch-size", "2", "--batch-size", "4", "--student", "fused",
                 "--compare", "fused [alone: fusion off]", "unfused",
                 checkpoints=[f"fused={fused_dir}", f"unfused={setup['labels']}"], output=output, seeds=(0, 1))  # fmt: skip
    assert scored and len(set(scored)) == len(scored), "the fusion-off row must reuse the fused row's forwards"
    rows = _rows(data)
    alone = rows["fused [alone: fusion off]"]
    assert alone["fusion_off_of"] == "fused" and rows["fused"]["fusion"]["gate"] == pytest.approx(0.7)
    assert "speed" in rows["fused"] and "speed" not in alone
    # the alone row scores as the unfused checkpoint does (same lists, same users)
    for protocol in ("sampled-20", "sampled-100"):
        for metric, stats in alone["metrics"][protocol].items():
            assert stats["mean"] == pytest.approx(rows["unfused"]["metrics"][protocol][metric]["mean"], abs=0.05), metric
    split, sasrec = setup["split"], _sasrec(setup)
    parts = ranker_eval.FusionParts(ProtocolRanker(MixLLMRanker.from_pretrained(fused_dir, ItemCatalog(texts=texts)), "f",
                                                   4, retriever=FaissRetriever(sasrec)), "alone")  # fmt: skip
    users = np.arange(8)
    lists = ranker_eval.get_candidates(split, PROTOCOLS["sampled-20"], "test", 0, setup["cache"] / "candidates")
    batch = make_batch(split, "test", users, parts.alone.max_history, lists.candidates[users])
    unfused = ProtocolRanker(MixLLMRanker.from_pretrained(setup["labels"], ItemCatalog(texts=texts)), "u", 4)
    with torch.inference_mode():
        assert torch.allclose(parts.alone.score(batch), unfused.score(batch), atol=1e-4)
        sasrec_scores = FaissRetriever(sasrec).candidate_scores(batch.history[:, -sasrec.config.max_history :], batch.candidates)
        assert torch.allclose(parts.fused.score(batch), unfused.score(batch) + 0.7 * sasrec_scores.float(), atol=1e-4)
    assert parts.forwards == 1
    comparisons = data["comparisons"]
    assert comparisons["fused_vs_alone"]["a"] == "fused" and comparisons["fused_vs_alone"]["b"] == alone["name"]
    assert list(comparisons["alone_vs_sasrec"]["results"]) == ["0", "1"]
    assert "skipped" in comparisons["alone_vs_teacher"]  # no teacher row here; without a fused row there is no entry
    named = comparisons["fused [alone: fusion off] − unfused, sampled-20"]  # --compare: the same scores, paired
    assert list(named["results"]) == ["0", "1"] and named["results"]["0"]["n"] == NUM_USERS
    assert all(abs(r["mean"]) <= 0.05 for r in named["results"].values())
    assert "| fused [alone: fusion off] | unfused | sampled-20 hr@1 | seed 1 |" in output.with_suffix(".md").read_text()
    with pytest.raises(ranker_eval.EvalError, match="not a fused ranker"):
        ranker_eval.FusionParts(unfused, "x")
