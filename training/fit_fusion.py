"""``python -m training.fit_fusion``: give a trained ranker score fusion, its gate fitted on validation.

A fused ranker scores a candidate as ``ranker score + gate * SASRec score`` (``MixLLMRanker(fusion=True)``,
the retriever's inner product of its user vector with the candidate). The gate starts at 0 -- the
ranker alone -- and is fitted here on the *validation* targets' candidate lists, not during training:
SASRec was trained on the training sequences, so on training lists its scores are far more confident
than on held-out targets, and a gate learned there over-trusts it. The fitted objective is the
listwise cross-entropy of the fused scores, convex in the gate (its second derivative is the variance
of the SASRec scores under the fused softmax), so Newton's method from 0 finds the optimum.

    python -m training.fit_fusion --checkpoint runs/student_user/ranker --output runs/student_user_fused/ranker

The output is a complete ranker checkpoint (the input's files plus the gate), evaluated and served
like any other; ``training_run.json`` gains a ``fusion`` record (gate, validation CE and HR@1 before
and after).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mixllm.baselines.sasrec import SASRec
from mixllm.data import PROTOCOLS, get_candidates, leave_one_out, load_dataset
from mixllm.data.evaluation import make_batch
from mixllm.errors import MixLLMError
from mixllm.features import sasrec_checkpoint_dir
from mixllm.provenance import atomic_write_text, git_revision
from mixllm.ranking import ItemCatalog, MixLLMRanker, ProtocolRanker
from mixllm.retrieval import FaissRetriever

log = logging.getLogger(__name__)


def listwise_ce(scores: torch.Tensor, target_index: torch.Tensor) -> float:
    return float(torch.nn.functional.cross_entropy(scores.double(), target_index))


def fit_gate(scores: torch.Tensor, retriever_scores: torch.Tensor, target_index: torch.Tensor,
             steps: int = 50, tolerance: float = 1e-10) -> float:  # fmt: skip
    """argmin_g mean_i CE(softmax(s_i + g r_i), t_i) by Newton's method from g = 0 (convex in g).

    f'(g) = mean_i (E_p[r_i] - r_i[t_i]), f''(g) = mean_i Var_p(r_i) with p = softmax(s_i + g r_i)."""
    s, r = scores.double(), retriever_scores.double()
    rows = torch.arange(len(s))
    gate = 0.0
    for _ in range(steps):
        p = (s + gate * r).softmax(-1)
        mean = (p * r).sum(-1)
        grad = float((mean - r[rows, target_index]).mean())
        curvature = float((p * (r - mean[:, None]) ** 2).sum(-1).mean())
        if curvature <= 0:
            break
        step = grad / curvature
        while listwise_ce(s + (gate - step) * r, target_index) > listwise_ce(s + gate * r, target_index) + 1e-12:
            step /= 2  # damped: never a worse gate
            if abs(step) < tolerance:
                break
        gate -= step
        if abs(step) < tolerance:
            break
    return gate


def fuse_checkpoint(checkpoint: Path, output: Path, sasrec: SASRec, split, protocol: str = "sampled-20", seed: int = 0,
                    batch_size: int = 32, cache_dir: str | None = None) -> dict:  # fmt: skip
    """Fit the gate of ``checkpoint`` on the validation lists and write the fused ranker to ``output``."""
    ranker = MixLLMRanker.from_pretrained(checkpoint, ItemCatalog(texts=split.dataset.item_texts)).eval()
    if ranker.fusion_gate is not None:
        raise MixLLMError(f"--checkpoint {checkpoint}: already fused (gate {float(ranker.fusion_gate.detach()):.4g})")
    retriever = FaissRetriever(sasrec)
    alone = ProtocolRanker(ranker, "ranker", batch_size)
    lists = get_candidates(split, PROTOCOLS[protocol], "valid", seed, None if cache_dir is None else Path(cache_dir) / "candidates")
    users = np.arange(split.num_users)
    batch = make_batch(split, "valid", users, max(alone.max_history, retriever.max_history), lists.candidates[users])
    target = torch.from_numpy(lists.target_index[users])
    with torch.inference_mode():
        scores = alone.score(batch).float()
        sasrec_scores = retriever.candidate_scores(batch.history[:, -retriever.max_history :], batch.candidates)
    gate = fit_gate(scores, sasrec_scores, target)

    def summary(g: float) -> dict:
        fused = scores + g * sasrec_scores
        return {"ce": listwise_ce(fused, target), "hr@1": float((fused.argmax(-1) == target).float().mean())}

    record = {"gate": gate, "fitted_on": f"{protocol} validation lists, seed {seed}, {len(users)} users",
              "ranker_alone": summary(0.0), "fused": summary(gate), "sasrec_alone_hr@1":
              float((sasrec_scores.argmax(-1) == target).float().mean()), "source_checkpoint": str(checkpoint)}  # fmt: skip
    ranker.fusion_gate = nn.Parameter(torch.tensor(gate, dtype=torch.float32))
    output = Path(output)
    if output.exists():
        shutil.rmtree(output)
    run_file = Path(checkpoint) / "training_run.json"
    run = json.loads(run_file.read_text()) if run_file.is_file() else {}
    base = Path(checkpoint) / "base_model"
    if base.is_dir():  # a tiny random base LLM travels with its checkpoint
        shutil.copytree(base, output / "base_model")
        ranker.model.config.language_model = str((output / "base_model").resolve())
    ranker.save_pretrained(output, provenance={**run, "fusion": record})
    atomic_write_text(output / "training_run.json", json.dumps({**run, "git_revision": git_revision(), "fusion": record},
                                                                indent=2, default=str))  # fmt: skip
    log.info("gate %.4f: validation CE %.4f -> %.4f, HR@1 %.4f -> %.4f (SASRec %.4f)", gate, record["ranker_alone"]["ce"],
             record["fused"]["ce"], record["ranker_alone"]["hr@1"], record["fused"]["hr@1"], record["sasrec_alone_hr@1"])
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.fit_fusion", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a trained ranker (runs/student_user/ranker)")
    parser.add_argument("--output", required=True, help="where the fused ranker goes")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--seed", type=int, default=0, help="SASRec and the validation lists of this seed")
    parser.add_argument("--protocol", default="sampled-20", choices=[n for n, p in PROTOCOLS.items() if not p.is_full_ranking])
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        dataset = load_dataset(args.dataset)
        directory = sasrec_checkpoint_dir(dataset.name, args.seed, args.cache_dir)
        record = fuse_checkpoint(Path(args.checkpoint), Path(args.output), SASRec.from_pretrained(directory), leave_one_out(dataset),
                                 args.protocol, args.seed, args.batch_size, args.cache_dir)  # fmt: skip
    except (MixLLMError, FileNotFoundError) as error:
        print(f"python -m training.fit_fusion: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
