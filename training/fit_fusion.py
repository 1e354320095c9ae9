"""``python -m training.fit_fusion``: give a trained ranker score fusion, fitted on validation.

A fused ranker scores a candidate as ``ranker score + gate * SASRec score`` (``MixLLMRanker(fusion=True)``,
the retriever's inner product of its user vector with the candidate). The gate starts at 0 -- the
ranker alone -- and is fitted here on the *validation* targets' candidate lists, not during training:
SASRec was trained on the training sequences, so on training lists its scores are far more confident
than on held-out targets, and a gate learned there over-trusts it.

Two numbers are fitted together: the gate and a positive **scale** of the ranker's own scores, folded
into its score head (``score_head.weight *= scale``), so the fused checkpoint is still exactly
``ranker score + gate * SASRec score`` and the ranker alone ranks as before (a positive scale keeps
every order). The objective is the listwise cross-entropy of the fused scores, convex in (scale, gate),
so Newton's method from (1, 0) finds the optimum. ``--gate-only`` keeps the scale at 1 (the ablation;
also what a ranker without a score head gets).

    python -m training.fit_fusion --checkpoint runs/student_user/ranker --output runs/student_user_fused/ranker

The output is a complete ranker checkpoint (the input's files plus the gate), evaluated and served
like any other; ``training_run.json`` gains a ``fusion`` record (scale, gate, validation CE and HR@1
before and after).
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


def fit_fusion_weights(scores: torch.Tensor, retriever_scores: torch.Tensor, target_index: torch.Tensor,
                       fit_scale: bool = True, steps: int = 50, tolerance: float = 1e-10) -> tuple[float, float]:  # fmt: skip
    """(scale, gate) = argmin mean_i CE(softmax(scale * s_i + gate * r_i), t_i), by damped Newton from (1, 0),
    the ranker alone. The objective is convex in (scale, gate): its gradient is mean_i (E_p[x_i] - x_i[t_i])
    and its Hessian mean_i Cov_p(x_i), with x_ij = (s_ij, r_ij) and p the fused softmax. ``fit_scale=False``
    keeps the scale at 1 and fits the gate alone.

    The scale matters: a ranker trained on the labels alone is over-confident on held-out lists (its
    training CE is far below its validation CE), and with the scale fixed at 1 the best gate cannot
    give SASRec its due weight."""
    x = torch.stack([scores.double(), retriever_scores.double()], dim=-1)  # (N, C, 2)
    rows = torch.arange(len(x))
    free = [0, 1] if fit_scale else [1]
    weights = torch.tensor([1.0, 0.0], dtype=torch.float64)

    def loss(w: torch.Tensor) -> float:
        return listwise_ce(x @ w, target_index)

    for _ in range(steps):
        p = (x @ weights).softmax(-1)  # (N, C)
        mean = (p.unsqueeze(-1) * x).sum(1)  # (N, 2)
        grad = (mean - x[rows, target_index]).mean(0)  # (2,)
        centred = x - mean.unsqueeze(1)  # (N, C, 2)
        hessian = torch.einsum("nc,nci,ncj->ij", p, centred, centred) / len(x)  # (2, 2)
        sub = hessian[free][:, free] + 1e-12 * torch.eye(len(free), dtype=torch.float64)
        step = torch.zeros(2, dtype=torch.float64)
        step[free] = torch.linalg.solve(sub, grad[free])
        size = float(step.abs().max())
        while loss(weights - step) > loss(weights) + 1e-12 and size >= tolerance:
            step, size = step / 2, size / 2  # damped: never worse weights
        weights = weights - step
        if size < tolerance:
            break
    return float(weights[0]), float(weights[1])


def fuse_checkpoint(checkpoint: Path, output: Path, sasrec: SASRec, split, protocol: str = "sampled-20", seed: int = 0,
                    batch_size: int = 32, cache_dir: str | None = None, fit_scale: bool = True) -> dict:  # fmt: skip
    """Fit the scale and gate of ``checkpoint`` on the validation lists and write the fused ranker to ``output``."""
    ranker = MixLLMRanker.from_pretrained(checkpoint, ItemCatalog(texts=split.dataset.item_texts)).eval()
    if ranker.fusion_gate is not None:
        raise MixLLMError(f"--checkpoint {checkpoint}: already fused (gate {float(ranker.fusion_gate.detach()):.4g})")
    fit_scale = fit_scale and ranker.score_head is not None  # an answer-token ranker has no head to hold a scale
    retriever = FaissRetriever(sasrec)
    alone = ProtocolRanker(ranker, "ranker", batch_size)
    lists = get_candidates(split, PROTOCOLS[protocol], "valid", seed, None if cache_dir is None else Path(cache_dir) / "candidates")
    users = np.arange(split.num_users)
    batch = make_batch(split, "valid", users, max(alone.max_history, retriever.max_history), lists.candidates[users])
    target = torch.from_numpy(lists.target_index[users])
    with torch.inference_mode():
        scores = alone.score(batch).float()
        sasrec_scores = retriever.candidate_scores(batch.history[:, -retriever.max_history :], batch.candidates)
    scale, gate = fit_fusion_weights(scores, sasrec_scores, target, fit_scale=fit_scale)
    if scale <= 0:
        raise MixLLMError(
            f"--checkpoint {checkpoint}: on the validation lists the best fusion gives the ranker's scores the weight "
            f"{scale:.4g} (<= 0), i.e. SASRec alone beats any positive mix with this ranker; nothing was written"
        )

    def summary(s: float, g: float) -> dict:
        fused = s * scores + g * sasrec_scores
        return {"ce": listwise_ce(fused, target), "hr@1": float((fused.argmax(-1) == target).float().mean())}

    record = {"gate": gate, "score_scale": scale, "fitted_on": f"{protocol} validation lists, seed {seed}, {len(users)} users",
              "ranker_alone": summary(1.0, 0.0), "fused": summary(scale, gate), "sasrec_alone": summary(0.0, 1.0),
              "source_checkpoint": str(checkpoint)}  # fmt: skip
    if ranker.score_head is not None:
        with torch.no_grad():
            ranker.score_head.weight.mul_(scale)
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
    log.info("scale %.4f, gate %.4f: validation CE %.4f -> %.4f, HR@1 %.4f -> %.4f (SASRec %.4f)", scale, gate,
             record["ranker_alone"]["ce"], record["fused"]["ce"], record["ranker_alone"]["hr@1"], record["fused"]["hr@1"],
             record["sasrec_alone"]["hr@1"])
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
    parser.add_argument("--gate-only", action="store_true", help="keep the ranker's score scale at 1 (the ablation)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        dataset = load_dataset(args.dataset)
        directory = sasrec_checkpoint_dir(dataset.name, args.seed, args.cache_dir)
        record = fuse_checkpoint(Path(args.checkpoint), Path(args.output), SASRec.from_pretrained(directory), leave_one_out(dataset),
                                 args.protocol, args.seed, args.batch_size, args.cache_dir, not args.gate_only)  # fmt: skip
    except (MixLLMError, FileNotFoundError) as error:
        print(f"python -m training.fit_fusion: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
