"""``python -m training.cold_items``: what should a student read for an item with no SASRec vector?

The service adds items at run time; they have text but no collaborative (SASRec) vector. This
measures candidate rules on MovieLens-100K: for test users, the **test target is made cold** (its
SASRec columns replaced by the rule's vector, computed without the item itself) and the distilled
student ranks it among its sampled-20 test candidates (seed-0 lists, the reports' protocol). The
same users and lists for every rule; "warm" (the item's real vector) is the reference.

Rules: ``zeros``; ``catalog-mean`` (the mean SASRec vector); ``nearest`` (the SASRec vector of
the most text-similar other item); ``neighbours`` (the cosine-weighted mean over the 10 most
text-similar items, :func:`mixllm.features.neighbour_mean`); ``half-nearest`` and
``half-neighbours`` (those scaled by 0.5, between the borrowed vector and zero).

Writes ``reports/cold_items.{json,md}``; the service's rule (``serving.catalog.COLD_RULE``) is the
best mean rank here.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time

import numpy as np
import torch

from mixllm.baselines.sasrec import SASRec
from mixllm.data import PROTOCOLS, get_candidates, leave_one_out, load_movielens_100k
from mixllm.features import MINILM_DIM, FeatureLayout, neighbour_mean
from mixllm.lora import merge_lora
from mixllm.provenance import atomic_write_text, git_revision, machine_info
from mixllm.ranking import ItemCatalog, MixLLMRanker, RankingRequest
from mixllm.retrieval import FaissRetriever
from serving.catalog import RETRIEVER_COLD_RULE

log = logging.getLogger(__name__)
RULES = ("warm", "zeros", "catalog-mean", "nearest", "neighbours", "half-nearest", "half-neighbours")


def cold_vector(rule: str, item: int, text: torch.Tensor, collab: torch.Tensor) -> torch.Tensor:
    """(c,) what ``rule`` gives item ``item`` (its own row excluded from every neighbour search)."""
    others = torch.cat([torch.arange(item), torch.arange(item + 1, len(text))])
    if rule == "warm":
        return collab[item]
    if rule == "zeros":
        return torch.zeros(collab.shape[1])
    if rule == "catalog-mean":
        return collab[others].mean(0)
    if rule in ("nearest", "half-nearest"):
        best = others[int((text[others] @ text[item]).argmax())]
        return collab[best] * (0.5 if rule.startswith("half") else 1.0)
    if rule in ("neighbours", "half-neighbours"):
        mean = neighbour_mean(text[item : item + 1], text[others], collab[others])[0]
        return mean * (0.5 if rule.startswith("half") else 1.0)
    raise ValueError(f"unknown rule {rule!r}; choose from {RULES}")


def neutral_cold_scores(scores: torch.Tensor, cold: torch.Tensor) -> torch.Tensor:
    """(B, C) ``scores`` with each cold candidate's score replaced by the mean of its list's warm ones
    (a list with no warm candidate keeps its scores): added to a fused ranker's scores, that shifts the
    cold item by the same gate * mean as an average warm candidate, so SASRec neither favours nor
    buries an item it never saw."""
    warm = (~cold).float()
    mean = (scores * warm).sum(1, keepdim=True) / warm.sum(1, keepdim=True).clamp(min=1)
    return torch.where(cold & (warm.sum(1, keepdim=True) > 0), mean.expand_as(scores), scores)


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = load_movielens_100k()
    split = leave_one_out(dataset)
    lists = get_candidates(split, PROTOCOLS["sampled-20"], "test", args.seed)
    users = np.linspace(0, split.num_users - 1, args.users).round().astype(np.int64)
    ranker = MixLLMRanker.from_pretrained(args.checkpoint)
    merge_lora(ranker.model.language_model)
    ranker.eval()
    layout = FeatureLayout.from_checkpoint(args.checkpoint)
    features = ranker.catalog.features.clone()
    text, collab = features[:, layout.slice("minilm")], features[:, layout.slice("sasrec")]
    histories = split.histories("test", ranker.max_request_history or 10, users)  # user tokens read the longer window
    requests = [RankingRequest.from_padded(h, lists.candidates[u]) for h, u in zip(histories, users)]
    targets = lists.target_index[users]
    cold_items = sorted({int(lists.candidates[u][lists.target_index[u]]) for u in users})
    gate = None if ranker.fusion_gate is None else float(ranker.fusion_gate.detach())
    sasrec = None if gate is None else SASRec.from_pretrained(args.sasrec)
    rows = []
    for rule in args.rules:
        start = time.perf_counter()
        table = features.clone()
        for item in cold_items:
            table[item, layout.slice("sasrec")] = cold_vector(rule, item, text, collab)
        ranker.catalog = ItemCatalog(features=table)
        if sasrec is not None:  # a fused ranker: SASRec's scores, the cold targets given the service's retriever vector
            retriever = FaissRetriever(copy.deepcopy(sasrec))
            if rule != "warm" and args.retriever_cold == "neighbours":
                warm = retriever.item_vectors
                retriever.set_rows(cold_items, torch.stack([cold_vector(RETRIEVER_COLD_RULE, i, text, warm) for i in cold_items]))
            r_scores = retriever.candidate_scores(torch.from_numpy(histories[:, -retriever.max_history :]),
                                                  torch.from_numpy(lists.candidates[users]))  # fmt: skip
            if rule != "warm" and args.retriever_cold == "neutral":  # SASRec has no opinion of a cold item
                r_scores = neutral_cold_scores(r_scores, torch.from_numpy(np.isin(lists.candidates[users], cold_items)))
            for request, row in zip(requests, r_scores):
                request.retriever_scores = row.tolist()
        ranks: dict[str, list[int]] = {"fused": [], "alone": []} if gate is not None else {"student": []}
        with torch.inference_mode():
            for i in range(0, len(requests), 8):
                for j, (scores, target) in enumerate(zip(ranker.score(requests[i : i + 8]), targets[i : i + 8])):
                    views = {"student": scores} if gate is None else {
                        "fused": scores, "alone": ranker.unfused(scores, requests[i + j].retriever_scores)}  # fmt: skip
                    for name, view in views.items():
                        ranks[name].append(int((view > view[target]).sum()))  # ties count for the target
        for name, values in ranks.items():
            values = np.asarray(values)
            rows.append({"rule": rule, "scores": name, "hr@1": float((values == 0).mean()), "hr@5": float((values < 5).mean()),
                         "mean_rank": float(values.mean() + 1), "seconds": time.perf_counter() - start})  # fmt: skip
            log.info("%-16s %-7s HR@1 %.3f  HR@5 %.3f  mean rank %.2f", rule, name, rows[-1]["hr@1"], rows[-1]["hr@5"],
                     rows[-1]["mean_rank"])  # fmt: skip
    cold = [r for r in rows if r["rule"] != "warm" and r["scores"] != "fused"]  # the student's own reading
    return {
        "command": " ".join(["python -m training.cold_items", *sys.argv[1:]]), "git_revision": git_revision(),
        "machine": machine_info(), "checkpoint": str(args.checkpoint), "users": len(users), "protocol": "sampled-20",
        "split": "test", "seed": args.seed, "text_dim": MINILM_DIM, "rows": rows, "fusion_gate": gate,
        "retriever_cold_rule": None if gate is None else args.retriever_cold,
        "best_mean_rank": min(cold, key=lambda r: r["mean_rank"])["rule"] if cold else None,
        "best_hr@1": max(cold, key=lambda r: r["hr@1"])["rule"] if cold else None,
    }  # fmt: skip


def render_markdown(report: dict) -> str:
    lines = [
        "# Cold items: what the student reads without a SASRec vector", "",
        f"`{report['command']}` at revision {report['git_revision']} on {report['machine']['cpu']}: "
        f"{report['users']} test users, sampled-20 (seed {report['seed']}), the test target made cold; "
        "mean rank 1 = always first, 10.5 = chance.", "",
        *([f"A fused ranker (gate {report['fusion_gate']:.4g}): the `fused` rows add SASRec's scores, the cold targets "
           f"given the service's retriever vector ({report['retriever_cold_rule']}); `alone` rows are the student's own "
           "score (fused minus the gated SASRec term).", ""] if report.get("fusion_gate") is not None else []),
        "| rule | scores | HR@1 | HR@5 | mean rank of the target |", "|---|---|---:|---:|---:|",
    ]  # fmt: skip
    for r in report["rows"]:
        lines.append(f"| {r['rule']} | {r['scores']} | {r['hr@1']:.3f} | {r['hr@5']:.3f} | {r['mean_rank']:.2f} |")
    lines += ["", f"Best cold rule by mean rank: **{report['best_mean_rank']}**; by HR@1: {report['best_hr@1']}. "
              f"With {report['users']} users the standard error of an HR@1 near 0.15 is about "
              f"{np.sqrt(0.15 * 0.85 / report['users']):.3f}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(prog="python -m training.cold_items", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="checkpoints/student", help="a student that reads minilm+sasrec")
    parser.add_argument("--sasrec", default="checkpoints/sasrec", help="a fused student's SASRec (its retriever)")
    parser.add_argument("--retriever-cold", default="neighbours", choices=["neighbours", "neutral"],
                        help="a fused student's SASRec score of a cold target: SASRec with the service's retriever "
                             "vector for it (neighbours), or the mean of its list's warm scores (neutral)")
    parser.add_argument("--users", type=int, default=120, help="test users, evenly spread over the user ids")
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES)
    parser.add_argument("--seed", type=int, default=0, help="candidate lists of this seed")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", default="reports/cold_items.json")
    args = parser.parse_args(argv)
    report = run(args)
    atomic_write_text(args.output, json.dumps(report, indent=2) + "\n")
    atomic_write_text(args.output.rsplit(".", 1)[0] + ".md", render_markdown(report))
    print(render_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
