"""``mixllm eval ranker``: the Mix-LLM rankers next to the baselines — quality, its uncertainty and speed in one report.

    mixllm eval ranker --checkpoint checkpoints/teacher checkpoints/student runs/student_labels/ranker

Every row is scored on the evaluation issue's protocols for the **test** targets:

* ``sampled-20`` (HR@1, NDCG@5, MRR) and ``sampled-100`` (HR@10, NDCG@10), on the cached candidate
  lists (``mixllm.data.get_candidates``) of each of ``--seeds`` (0 1 2): every metric is reported as
  mean ± std over those seeds (``mixllm.stats.mean_std``) beside each seed's value; the LLM ranker
  scores the listed candidates in one forward per request;
* ``full``: it does not depend on the candidate seed, so it is scored once. An LLM ranker cannot
  score 1,682 items per user, so the catalog is first cut to the top k by FAISS inner-product search
  over the SASRec item embeddings with the SASRec user vector (among the same items the full-ranking
  protocol ranks: everything the user never interacted with, plus the target), then the LLM reranks
  those; items outside the top k rank below them (a target missed by retrieval counts as a miss).
  The rerank depth k is a reported choice: every one of ``--retrieve`` (20 50 100) is scored, beside
  the retrieval's recall@k (no reranker can beat it) and SASRec's own order of the same k items (what
  a reranker must beat); the table's full-ranking columns use ``--headline-depth`` (the largest).

SASRec (its row and the retriever) is the checkpoint of the first candidate seed.

Comparisons that the targets name are paired per user (``mixllm.stats.paired_bootstrap``: the mean
per-user difference with its 95% percentile-bootstrap interval over users): the student (``--student``)
minus SASRec, minus the teacher (on the common users) and minus the labels-only student, on
sampled-20 HR@1 per candidate seed; for a fused student also its fusion-off row (:class:`FusionParts`:
the fused score minus the gated SASRec term, from the same forward) against the fused row, SASRec and
the teacher; SASRec's top k reranked by the student minus SASRec's own order,
on full NDCG@10 per depth. A comparison whose rows are not in the report is skipped with a note.

The textual teacher is ~15x slower than the student on CPU, so ``--teacher-users-20`` and
``--teacher-users-100`` limit it to the first N test users (on every seed); every row also reports
its metrics on exactly those users ("common users"), which is where teacher and students are compared.

Speed is measured side by side: the first ``--speed-requests`` sampled-20 test requests (first seed), in
batches of ``--speed-batch-size``, fp32, the models taking turns batch by batch (so machine noise
hits both alike); requests/s and candidates/s are from the median batch time. Peak memory, on a
CPU: a fresh process loads only that model and scores two of those batches; its peak resident
memory while scoring (Linux ``VmHWM``, reset after loading) is reported, with the resident memory
after loading beside it. On a GPU: ``torch.cuda.max_memory_allocated`` while scoring, above the
loaded models.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mixllm.data import PROTOCOLS, LeaveOneOutSplit, get_candidates, leave_one_out, load_dataset
from mixllm.data.evaluation import Ranker, RankingBatch, make_batch
from mixllm.errors import MixLLMError
from mixllm.features import sasrec_checkpoint_dir
from mixllm.metrics import ranking_metrics
from mixllm.provenance import atomic_write_text, git_revision, machine_info
from mixllm.ranking import ItemCatalog, MixLLMRanker, ProtocolRanker, RankingRequest
from mixllm.retrieval import FaissRetriever
from mixllm.stats import mean_std, paired_bootstrap

log = logging.getLogger(__name__)

SPLIT = "test"
PROTOCOL_ORDER = ("sampled-20", "sampled-100", "full")
TABLE_COLUMNS = (("sampled-20", "hr@1"), ("sampled-20", "ndcg@5"), ("sampled-100", "ndcg@10"), ("full", "ndcg@10"),
                 ("full", "recall@20"))  # fmt: skip


class EvalError(MixLLMError, ValueError):
    """Bad ``mixllm eval ranker`` arguments (the message names the option)."""


# --- rankers under evaluation --------------------------------------------------------------------
def full_ranking_metrics(reranker: Ranker, retriever: FaissRetriever, split: LeaveOneOutSplit, users: np.ndarray,
                         k: int, retrieval_history: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-user full-ranking metrics of ``reranker`` over ``retriever``'s top ``k``, and (B,) bool
    whether the target was retrieved at all."""
    protocol = PROTOCOLS["full"]
    targets = torch.from_numpy(split.targets(SPLIT)[users])
    allowed = split.full_ranking_mask(SPLIT, users)
    history = torch.from_numpy(split.histories(SPLIT, retrieval_history, users))
    retrieved = torch.from_numpy(retriever.top_k(history, allowed, k))  # (B, k)
    scores = reranker.score(make_batch(split, SPLIT, users, reranker.max_history, retrieved))  # (B, k)
    full = torch.full((len(users), split.num_items), float("-inf"))
    # Below every reranked item, the rest keep no order among themselves (ties = expected rank).
    full.scatter_(1, retrieved, scores.float())
    hit = (retrieved == targets.unsqueeze(1)).any(1)
    values = ranking_metrics(full, targets, protocol.metrics, torch.from_numpy(allowed))
    # A target missed by retrieval is a miss (with --retrieve below a cut-off, its expected rank
    # among the unordered rest would otherwise earn partial credit).
    return {name: torch.where(hit, value, torch.zeros_like(value)) for name, value in values.items()}, hit


def sampled_metrics(ranker: Ranker, split: LeaveOneOutSplit, protocol: str, users: np.ndarray, seed: int,
                    cache_dir: str | None) -> dict[str, torch.Tensor]:
    cache = None if cache_dir is None else Path(cache_dir) / "candidates"
    lists = get_candidates(split, PROTOCOLS[protocol], SPLIT, seed, cache)
    batch = make_batch(split, SPLIT, users, ranker.max_history, lists.candidates[users])
    with torch.inference_mode():
        scores = ranker.score(batch)
    return ranking_metrics(scores.float(), torch.from_numpy(lists.target_index[users]), PROTOCOLS[protocol].metrics)


def per_user_metrics(ranker: Ranker, split: LeaveOneOutSplit, protocol: str, users: np.ndarray, seed: int,
                     cache_dir: str | None, retriever: FaissRetriever | None, k: int, chunk: int = 64,
                     progress: bool = True, rerank: bool = False) -> dict[str, np.ndarray]:
    """{metric: (len(users),)} for one protocol, scored ``chunk`` users at a time with a progress bar.
    Full ranking: a ranker that supports it ranks the whole catalog, any other reranks ``retriever``'s
    top ``k``; ``rerank=True`` makes a catalog ranker rerank the top ``k`` too (SASRec: its own order)."""
    from tqdm.auto import tqdm

    parts: dict[str, list[np.ndarray]] = {}
    catalog = ranker.supports_full_ranking and not rerank
    desc = f"{ranker.name} {protocol} " + (f"seed {seed}" if protocol != "full" else "catalog" if catalog else f"top-{k}")
    bar = tqdm(total=len(users), desc=desc, unit="user", disable=not progress, leave=False)
    for start in range(0, len(users), chunk):
        block = users[start : start + chunk]
        if protocol != "full":
            values = sampled_metrics(ranker, split, protocol, block, seed, cache_dir)
        elif catalog:  # the baselines rank the whole catalog themselves
            batch = make_batch(split, SPLIT, block, ranker.max_history)
            with torch.inference_mode():
                scores = ranker.score_all(batch).float()
            targets = torch.from_numpy(split.targets(SPLIT)[block])
            allowed = torch.from_numpy(split.full_ranking_mask(SPLIT, block))
            values = ranking_metrics(scores, targets, PROTOCOLS["full"].metrics, allowed)
        else:
            with torch.inference_mode():
                values, _ = full_ranking_metrics(ranker, retriever, split, block, k, retriever.max_history)
        for name, value in values.items():
            parts.setdefault(name, []).append(value.float().numpy())
        bar.update(len(block))
    bar.close()
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


class FusionParts:
    """One fused ranker as two report rows scored by one forward: ``fused`` (``score + gate * SASRec
    score``, what is served) and ``alone`` (its own score, the fused score minus ``gate *`` the SASRec
    score), so the report shows what the LLM adds beside what fusion adds, at no second forward.

    The fused row must be scored first: each batch's scores are kept (keyed by its histories and
    candidates) and the alone row reads them; a batch the fused row never scored is scored then."""

    def __init__(self, fused: ProtocolRanker, alone_name: str) -> None:
        if fused.retriever is None:
            raise EvalError(f"{fused.name}: not a fused ranker")
        self.wrapped, self.memo = fused, {}
        self.fused, self.alone = _FusionPart(self, fused.name, alone=False), _FusionPart(self, alone_name, alone=True)
        self.forwards = 0
        """Batches scored by the model (a test checks the alone row adds none)."""

    def scores(self, batch: RankingBatch, alone: bool) -> torch.Tensor:
        key = (np.asarray(batch.history).tobytes(), np.asarray(batch.candidates).tobytes())
        if key not in self.memo:
            fused = self.wrapped.score(batch)  # (B, C) float32
            self.forwards += 1
            retriever = self.wrapped.retriever
            sasrec = retriever.candidate_scores(batch.history[:, -retriever.max_history :], batch.candidates).float()
            self.memo[key] = (fused, self.wrapped.ranker.unfused(fused, sasrec))
        return self.memo[key][1 if alone else 0]


class _FusionPart(Ranker):
    supports_full_ranking = False

    def __init__(self, parts: FusionParts, name: str, alone: bool) -> None:
        self.parts, self.name, self.is_alone = parts, name, alone
        self.max_history, self.max_item_history = parts.wrapped.max_history, parts.wrapped.max_item_history

    def score(self, batch: RankingBatch) -> torch.Tensor:
        return self.parts.scores(batch, self.is_alone)


# --- per-user results: mean ± std over seeds, paired comparisons ---------------------------------
@dataclass(frozen=True)
class UserMetrics:
    """One row's per-user metrics on one protocol run: ``values[metric][i]`` is user ``users[i]``'s."""

    users: np.ndarray  # (U,) test users, in the order scored: the first U (every row's limit is a prefix)
    values: dict[str, np.ndarray]  # {metric: (U,)}

    def mean(self, users: int | None = None) -> dict[str, float]:
        """{metric: mean over the first ``users`` users (all by default)}."""
        return {name: float(value[:users].mean()) for name, value in self.values.items()}


def over_seeds(runs: dict[int, UserMetrics], users: int | None = None) -> dict[str, dict[str, Any]]:
    """``{metric: {mean, std, n, per_seed}}``: each run's (candidate seed's) mean over its first ``users``
    users, then ``mean_std`` of those over the seeds; ``per_seed`` keeps them, keyed by seed."""
    means = {seed: run.mean(users) for seed, run in runs.items()}
    metrics = next(iter(means.values()))
    return {name: {**mean_std([m[name] for m in means.values()]), "per_seed": {str(seed): m[name] for seed, m in means.items()}}
            for name in metrics}  # fmt: skip


def scored_once(run: UserMetrics, users: int | None = None) -> dict[str, dict[str, Any]]:
    """``{metric: {mean, std, n}}`` of a protocol scored once (full ranking: no candidate seed), in
    :func:`over_seeds`' shape: one value, std 0."""
    return {name: mean_std([value]) for name, value in run.mean(users).items()}


def paired_difference(a: UserMetrics, b: UserMetrics, metric: str) -> dict[str, Any]:
    """``mixllm.stats.paired_bootstrap`` of ``a``'s minus ``b``'s per-user ``metric`` on the users both
    rows were scored on: every row is scored on the first N test users, so these are the first
    ``min(N_a, N_b)``, taken in the same order from both (checked: a misaligned pair is an error).

    Returns: ``{mean, low, high, n, confidence, resamples, above_zero}``.
    Raises: ValueError if the two runs' first users differ.
    """
    n = min(len(a.users), len(b.users))
    if not np.array_equal(a.users[:n], b.users[:n]):
        raise ValueError(f"paired {metric}: the two runs were not scored on the same first {n} users in the same order")
    return paired_bootstrap(a.values[metric][:n], b.values[metric][:n]).to_dict()


# Comparisons the targets name: (key, row a, row b, protocol, metric, per). Rows by role (see _roles);
# per "seed": one comparison per candidate seed; per "depth": one per rerank depth, where SASRec's
# run at depth k is its own order of its top k.
COMPARISONS = (
    ("student_vs_sasrec", "student", "sasrec", "sampled-20", "hr@1", "seed"),
    ("reranked_vs_sasrec_order", "student", "sasrec", "full", "ndcg@10", "depth"),
    ("student_vs_teacher", "student", "teacher", "sampled-20", "hr@1", "seed"),
    ("distilled_vs_labels_only", "student", "labels", "sampled-20", "hr@1", "seed"),
    ("distilled_vs_labels_only_alone", "alone", "labels_alone", "sampled-20", "hr@1", "seed"),
    ("fused_vs_alone", "student", "alone", "sampled-20", "hr@1", "seed"),
    ("alone_vs_sasrec", "alone", "sasrec", "sampled-20", "hr@1", "seed"),
    ("alone_vs_teacher", "alone", "teacher", "sampled-20", "hr@1", "seed"),
)
ROLE_NAMES = {"student": "distilled student", "sasrec": "SASRec", "teacher": "teacher", "labels": "labels-only student",
              "alone": "fusion-off row of a fused student", "labels_alone": "fusion-off row of the labels-only student"}  # fmt: skip
FUSION_OFF_ROLES = ("alone", "labels_alone")
"""Roles that only fused rows have: a comparison naming one is left out, unsaid, where that row is missing."""


def _roles(rows: list[dict]) -> dict[str, dict | None]:
    """Which row plays which part in the comparisons: the student is the row ``--student`` named (else
    the first distilled student); when it is distilled, the labels-only student is the first other student
    trained without a teacher (a labels-only ``--student`` has no distillation to compare). Fused rows bring
    their fusion-off rows ("alone", "labels_alone")."""
    named = [row for row in rows if row.get("default_student")]
    student = named[0] if named else _find(rows, "student", distilled=True)

    def fusion_off(of: dict | None) -> dict | None:
        return next((row for row in rows if of is not None and row.get("fusion_off_of") == of["name"]), None)

    alone = fusion_off(student)
    others = [row for row in rows if row is not student and row is not alone and not row.get("fusion_off_of")]
    distilled = student is not None and _find([student], "student", distilled=True) is not None
    labels = _find(others, "student", distilled=False) if distilled else None
    return {"student": student, "sasrec": _find(rows, "sasrec"), "teacher": _find(rows, "teacher"), "alone": alone,
            "labels": labels, "labels_alone": fusion_off(labels)}  # fmt: skip


def paired_comparisons(rows: list[dict], runs: dict[str, dict[tuple[str, int | None], UserMetrics]],
                       seeds: list[int], depths: list[int], pairs: list[tuple[str, str]] = ()) -> dict[str, dict[str, Any]]:
    """The :data:`COMPARISONS` on the per-user ``runs`` (``{row name: {(protocol, seed or depth): ...}}``),
    then the ``pairs`` of rows the command named (``--compare A B``: :func:`named_comparisons`).

    Each is ``{a, b, protocol, metric, per, results: {seed or depth: paired_difference}}``, or, where a
    row is not in the report or the protocol was not scored, ``{..., skipped: why}``.
    """
    roles = _roles(rows)
    out: dict[str, dict[str, Any]] = {}
    for key, role_a, role_b, protocol, metric, per in COMPARISONS:
        if any(role in FUSION_OFF_ROLES and roles[role] is None for role in (role_a, role_b)):
            continue  # only a fused student has a fusion-off row: nothing to compare, nothing to say
        a, b = roles[role_a], roles[role_b]
        entry: dict[str, Any] = {"a": a["name"] if a else None, "b": b["name"] if b else None, "protocol": protocol,
                                 "metric": metric, "per": per}  # fmt: skip
        if per == "depth" and a and b:  # say what is compared: the same k items in two orders
            entry.update(a=f"{a['name']} reranking SASRec's top k", b=f"{b['name']}'s own order of its top k")
        variants = seeds if per == "seed" else depths
        missing = [ROLE_NAMES[role] for role, row in ((role_a, a), (role_b, b)) if row is None]
        if missing:
            entry["skipped"] = f"no {' and no '.join(missing)} row in this report"
        elif any((protocol, variants[0]) not in runs[row["name"]] for row in (a, b)):
            entry["skipped"] = f"{protocol} was not scored (--protocols)"
        else:
            entry["results"] = {str(v): paired_difference(runs[a["name"]][(protocol, v)], runs[b["name"]][(protocol, v)],
                                                          metric) for v in variants}  # fmt: skip
        if "skipped" in entry:
            log.info("comparison %s skipped: %s", key, entry["skipped"])
        out[key] = entry
    return {**out, **named_comparisons(runs, seeds, depths, pairs)}


# What a named pair is compared on: (protocol, metric, per), where both rows were scored on it.
NAMED_METRICS = (("sampled-20", "hr@1", "seed"), ("full", "ndcg@10", "depth"))


def check_compared(pairs: list[tuple[str, str]], names: list[str]) -> None:
    """Raises EvalError naming the first row of a ``--compare`` pair that is not one of ``names``."""
    unknown = sorted({name for pair in pairs for name in pair} - set(names))
    if unknown:
        raise EvalError(f"--compare {unknown[0]!r}: not a row of this report; rows: {names}")


def named_comparisons(runs: dict[str, dict[tuple[str, int | None], UserMetrics]], seeds: list[int], depths: list[int],
                      pairs: list[tuple[str, str]]) -> dict[str, dict[str, Any]]:
    """``--compare A B``: row A minus row B, paired per user, on every :data:`NAMED_METRICS` protocol both
    rows were scored on (sampled-20 HR@1 per candidate seed; full NDCG@10 per rerank depth), keyed
    ``"A − B, <protocol>"``. Ablations use it: the arms of one recipe, scored in one run.

    Raises: EvalError naming the row when A or B is not a row of the report."""
    check_compared(pairs, list(runs))
    out: dict[str, dict[str, Any]] = {}
    for a, b in pairs:
        for protocol, metric, per in NAMED_METRICS:
            variants = seeds if per == "seed" else depths
            if all((protocol, v) in runs[a] and (protocol, v) in runs[b] for v in variants):
                out[f"{a} − {b}, {protocol}"] = {
                    "a": a, "b": b, "protocol": protocol, "metric": metric, "per": per,
                    "results": {str(v): paired_difference(runs[a][(protocol, v)], runs[b][(protocol, v)], metric) for v in variants},
                }  # fmt: skip
    return out


# --- speed ---------------------------------------------------------------------------------------
def _rss_mb(field_name: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@dataclass
class SpeedResult:
    batch_times_s: list[float] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)
    peak_memory_mb: float | None = None
    loaded_memory_mb: float | None = None
    memory_kind: str = ""


def own_batches(ranker: ProtocolRanker, batch: RankingBatch, batch_size: int) -> list[list[RankingRequest]]:
    """``ranker``'s own requests of ``batch`` (histories cut to what it reads, a fused ranker's retriever
    scores attached), in batches of ``batch_size``."""
    requests = ranker.requests(batch)
    return [requests[i : i + batch_size] for i in range(0, len(requests), batch_size)]


@torch.inference_mode()
def measure_speed(rankers: list[ProtocolRanker], batch: RankingBatch, batch_size: int,
                  device: torch.device) -> dict[str, SpeedResult]:
    """Time ``prepare`` + forward per batch for every ranker, taking turns batch by batch. On a GPU
    also each ranker's peak allocated memory over one pass on its own (on a CPU see
    :func:`probe_cpu_memory`)."""
    own = {r.name: own_batches(r, batch, batch_size) for r in rankers}
    results = {r.name: SpeedResult() for r in rankers}
    for r in rankers:  # warm-up: first-call allocations and kernel choices stay out of the timings
        r.ranker(r.ranker.prepare(own[r.name][0]).to(device))
    for index in range(len(own[rankers[0].name])):
        for r in rankers:
            _sync(device)
            start = time.perf_counter()
            inputs = r.ranker.prepare(own[r.name][index]).to(device)
            r.ranker(inputs)
            _sync(device)
            results[r.name].batch_times_s.append(time.perf_counter() - start)
            results[r.name].prompt_tokens.extend(inputs.num_tokens)
    if device.type == "cuda":
        for r in rankers:
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            for batch in own[r.name]:
                r.ranker(r.ranker.prepare(batch).to(device))
            results[r.name].peak_memory_mb = (torch.cuda.max_memory_allocated(device) - base) / 2**20
            results[r.name].memory_kind = "CUDA peak allocated while scoring, above the loaded models"
    return results


def _memory_probe(path: str, texts: list[str], batches: list[list[RankingRequest]], threads: int) -> dict[str, float | None]:
    """Runs in a fresh process: load one ranker, score ``batches``, report resident memory (MB)."""
    torch.set_num_threads(threads)
    ranker = MixLLMRanker.from_pretrained(path, ItemCatalog(texts=texts)).eval()
    loaded = _rss_mb("VmRSS")
    reset = _reset_peak_rss()  # the peak of loading (transient copies) is not the serving peak
    with torch.inference_mode():
        for batch in batches:
            ranker(ranker.prepare(batch))
    return {"loaded_rss_mb": loaded, "peak_rss_mb": _rss_mb("VmHWM") if reset else None}


def probe_cpu_memory(path: Path, texts: list[str], batches: list[list[RankingRequest]], threads: int) -> dict[str, float | None]:
    """Resident memory of a process that loads only this ranker and scores ``batches`` (a spawned
    child, so other models and earlier allocations do not count): after loading, and the peak
    while scoring (Linux ``VmHWM`` reset after loading). None where /proc is unavailable."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_memory_probe, str(path), texts, batches, threads).result()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- the command ---------------------------------------------------------------------------------
def _parse_checkpoint(spec: str) -> tuple[str | None, Path]:
    """``PATH`` or ``NAME=PATH``; the path is what follows the last "=", so a name may hold one ("m = 4")."""
    name, sep, path = spec.rpartition("=")
    if not sep:
        return None, Path(spec)
    if not name or not path:
        raise EvalError(f"--checkpoint {spec!r}: expected PATH or NAME=PATH")
    return name, Path(path)


def _default_name(ranker: MixLLMRanker, run: dict) -> str:
    if ranker.mode == "teacher":
        return "teacher"
    recipe = run.get("recipe", {})
    kind = "distilled" if recipe.get("alpha", 0) > 0 else "labels only"
    features = recipe.get("item_features")
    return f"student ({kind}{', ' + features if features and features != 'minilm+sasrec' else ''})"


def _trained_parameters(ranker: MixLLMRanker) -> int:
    """Numbers the checkpoint stores (adapters, projector, encoders, score head)."""
    head = 0 if ranker.score_head is None else sum(p.numel() for p in ranker.score_head.parameters())
    return int(sum(t.numel() for t in ranker.model.trainable_state_dict().values())) + head


def load_checkpoint(path: Path, item_texts: list[str]) -> tuple[MixLLMRanker, dict]:
    if not path.is_dir():
        raise EvalError(f"--checkpoint {path}: no such directory")
    run_file = path / "training_run.json"
    run = json.loads(run_file.read_text()) if run_file.is_file() else {}
    ranker = MixLLMRanker.from_pretrained(path, ItemCatalog(texts=item_texts))
    if ranker.catalog.num_items != len(item_texts):
        raise EvalError(f"--checkpoint {path}: its catalog has {ranker.catalog.num_items} items, the dataset {len(item_texts)}")
    return ranker, run


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    from mixllm.baselines import PopularityRanker
    from training.ranker_build import load_or_train_sasrec

    if args.threads:
        torch.set_num_threads(args.threads)
    for option in ("teacher_users_20", "teacher_users_100", "max_users", "speed_requests", "speed_batch_size", "retrieve"):
        for value in np.atleast_1d(getattr(args, option)).tolist():  # --retrieve: one or more depths
            if value is not None and value < 1:
                raise EvalError(f"--{option.replace('_', '-')} must be >= 1, got {value}")
    seeds = list(getattr(args, "seeds", None) or [args.seed])  # --seed N is --seeds N
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise EvalError(f"--seeds: expected distinct seeds >= 0, got {' '.join(map(str, seeds))}")
    depths = sorted(set(np.atleast_1d(args.retrieve).tolist()))
    headline = depths[-1] if getattr(args, "headline_depth", None) is None else args.headline_depth
    student_name = getattr(args, "student", None)
    names = [_parse_checkpoint(spec)[0] for spec in args.checkpoint]
    if student_name is not None and student_name not in names:
        raise EvalError(f"--student {student_name!r}: not one of the named checkpoints {[n for n in names if n]}")
    if headline not in depths:
        raise EvalError(f"--headline-depth {headline} is not one of --retrieve {' '.join(map(str, depths))}")
    if args.device not in ("auto", "cpu", "cuda") and not args.device.startswith("cuda:"):
        raise EvalError(f"--device must be cpu, cuda or auto, got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise EvalError(f"--device {args.device}: no CUDA device is available")
    protocols = [p for p in PROTOCOL_ORDER if p in (getattr(args, "protocols", None) or PROTOCOL_ORDER)]
    unknown = sorted(set(getattr(args, "protocols", None) or []) - set(PROTOCOL_ORDER))
    if unknown or not protocols:
        raise EvalError(f"--protocols: expected some of {', '.join(PROTOCOL_ORDER)}, got {unknown or '(none)'}")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else "cpu" if args.device == "auto" else args.device)
    dataset = load_dataset(args.dataset)
    split = leave_one_out(dataset)
    n_users = split.num_users if args.max_users is None else min(args.max_users, split.num_users)
    t20 = min(args.teacher_users_20, n_users)
    t100 = min(args.teacher_users_100, n_users)
    sasrec = load_or_train_sasrec(dataset, seeds[0], args.cache_dir, progress=not args.no_progress)
    retriever = FaissRetriever(sasrec)

    entries: list[tuple[Ranker, dict[str, Any]]] = [
        (PopularityRanker.fit(split), {"name": "Popularity", "kind": "popularity"}),
        (sasrec, {"name": f"SASRec (H={sasrec.config.max_history})", "kind": "sasrec",
                  "checkpoint": str(sasrec_checkpoint_dir(dataset.name, seeds[0], args.cache_dir or "$MIXLLM_HOME"))}),
    ]  # fmt: skip
    llm_rankers: list[ProtocolRanker] = []
    paths: dict[str, Path] = {}
    for spec in args.checkpoint:
        name, path = _parse_checkpoint(spec)
        ranker, run = load_checkpoint(path, dataset.item_texts)
        ranker.to(device)
        wrapped = ProtocolRanker(ranker, name or _default_name(ranker, run), args.batch_size,
                                 retriever=retriever if ranker.fusion_gate is not None else None)  # fmt: skip
        llm_rankers.append(wrapped)
        paths[wrapped.name] = path
        recipe = run.get("recipe", {})
        meta = {
            "name": wrapped.name, "kind": ranker.mode, "checkpoint": str(path),
            "training": {"recipe": recipe, "train_time_s": run.get("train_time_s"), "global_step": run.get("global_step"),
                         "train_lists": run.get("train_lists"), "val_metrics": run.get("metrics"),
                         "git_revision": run.get("git_revision"), **({"fusion": run["fusion"]} if "fusion" in run else {})},
            "trained_parameters": _trained_parameters(ranker),
        }  # fmt: skip
        if wrapped.retriever is None:
            entries.append((wrapped, meta))
        else:  # a fused ranker: its row, then the ranker alone from the same forward
            parts = FusionParts(wrapped, f"{wrapped.name} [alone: fusion off]")
            gate = float(ranker.fusion_gate.detach())
            entries.append((parts.fused, {**meta, "fusion": {"gate": gate}}))
            entries.append((parts.alone, {**meta, "name": parts.alone.name, "fusion_off_of": wrapped.name}))
    names = [meta["name"] for _, meta in entries]
    if len(set(names)) != len(names):
        raise EvalError(f"two rows would be called the same ({names}); name them with --checkpoint NAME=PATH")
    pairs = [tuple(pair) for pair in getattr(args, "compare", None) or []]
    check_compared(pairs, names)  # said before any scoring

    def score(ranker: Ranker, protocol: str, users: np.ndarray, seed: int, k: int, rerank: bool = False) -> UserMetrics:
        return UserMetrics(users, per_user_metrics(ranker, split, protocol, users, seed, args.cache_dir, retriever, k,
                                                   progress=not args.no_progress, rerank=rerank))  # fmt: skip

    rows = []
    runs: dict[str, dict[tuple[str, int | None], UserMetrics]] = {}  # {row: {(protocol, seed or depth): per user}}
    for ranker, meta in entries:
        is_teacher = meta["kind"] == "teacher"
        limits = {"sampled-20": t20 if is_teacher else n_users, "sampled-100": t100 if is_teacher else n_users,
                  "full": t100 if is_teacher else n_users}  # fmt: skip
        own = runs[meta["name"]] = {}
        metrics, common, users, times, by_depth = {}, {}, {}, {}, {}
        for protocol in protocols:
            chosen = np.arange(limits[protocol])
            shared = t20 if protocol == "sampled-20" else t100
            start = time.perf_counter()
            if protocol != "full":  # once per candidate seed
                by_seed = {seed: score(ranker, protocol, chosen, seed, headline) for seed in seeds}
                own.update({(protocol, seed): run for seed, run in by_seed.items()})
                metrics[protocol], common[protocol] = over_seeds(by_seed), over_seeds(by_seed, shared)
            else:  # once: the catalog (the baselines) and/or the retriever's top k at each depth
                if ranker.supports_full_ranking:
                    own[("full", None)] = score(ranker, protocol, chosen, seeds[0], headline)
                if not ranker.supports_full_ranking or ranker is sasrec:  # SASRec: its own order of its top k
                    own.update({("full", depth): score(ranker, protocol, chosen, seeds[0], depth, rerank=True) for depth in depths})
                    by_depth = {str(depth): own[("full", depth)].mean() for depth in depths}
                headline_run = own[("full", None if ranker.supports_full_ranking else headline)]
                metrics[protocol], common[protocol] = scored_once(headline_run), scored_once(headline_run, shared)
            times[protocol] = time.perf_counter() - start
            users[protocol] = len(chosen)
            log.info("%s %s (%d users, %.0fs): %s", meta["name"], protocol, len(chosen), times[protocol],
                     ", ".join(f"{m} {v['mean']:.4f} ± {v['std']:.4f}" for m, v in metrics[protocol].items()))  # fmt: skip
        rows.append({**meta, "max_history": getattr(ranker, "max_item_history", ranker.max_history), "users": users, "metrics": metrics,
                     "metrics_common_users": common, **({"full_by_depth": by_depth} if by_depth else {}),
                     "eval_time_s": times, **({"default_student": True} if meta["name"] == getattr(args, "student", None) else {})})  # fmt: skip

    # Retrieval recall@k at each depth (the ceiling of every reranker's full-ranking recall).
    users_all = np.arange(n_users)
    targets = split.targets(SPLIT)[users_all]
    allowed = split.full_ranking_mask(SPLIT, users_all)
    history = torch.from_numpy(split.histories(SPLIT, sasrec.config.max_history, users_all))
    recall = {str(depth): float((retriever.top_k(history, allowed, depth) == targets[:, None]).any(1).mean()) for depth in depths}

    speed = {}
    if llm_rankers:
        lists = get_candidates(split, PROTOCOLS["sampled-20"], SPLIT, seeds[0],
                               None if args.cache_dir is None else Path(args.cache_dir) / "candidates")  # fmt: skip
        speed_users = np.arange(min(args.speed_requests, split.num_users))
        batch = make_batch(split, SPLIT, speed_users, max(r.max_history for r in llm_rankers), lists.candidates[speed_users])
        results = measure_speed(llm_rankers, batch, args.speed_batch_size, device)
        if device.type == "cpu":  # each model alone in a fresh process, two batches of the same requests
            for r in llm_rankers:
                memory = probe_cpu_memory(paths[r.name], dataset.item_texts, own_batches(r, batch, args.speed_batch_size)[:2],
                                          torch.get_num_threads())  # fmt: skip
                results[r.name].peak_memory_mb = memory["peak_rss_mb"]
                results[r.name].loaded_memory_mb = memory["loaded_rss_mb"]
                results[r.name].memory_kind = "peak resident memory (VmHWM) of a process holding only this model, while scoring"
        per_batch = min(args.speed_batch_size, len(speed_users))  # requests in a (full) timed batch
        for r in llm_rankers:
            res = results[r.name]
            median = statistics.median(res.batch_times_s)
            speed[r.name] = {
                "requests_per_s": per_batch / median, "candidates_per_s": per_batch * 20 / median,
                "median_batch_s": median, "batch_times_s": res.batch_times_s,
                "prompt_tokens_per_request": float(np.mean(res.prompt_tokens)), "peak_memory_mb": res.peak_memory_mb,
                "loaded_memory_mb": res.loaded_memory_mb, "memory": res.memory_kind,
            }  # fmt: skip
        for row in rows:
            if row["name"] in speed:
                row["speed"] = speed[row["name"]]

    report = {
        "command": shlex.join(["mixllm", "eval", "ranker", *sys.argv[3:]]) if sys.argv[1:3] == ["eval", "ranker"] else None,
        "git_revision": git_revision(), "machine": {**machine_info(), "device": str(device)},
        "dataset": {"name": dataset.name, "fingerprint": dataset.fingerprint()}, "split": SPLIT, "seeds": seeds,
        "users": n_users, "teacher_users": {"sampled-20": t20, "sampled-100": t100, "full": t100},
        "retrieval": {"method": f"faiss.IndexFlatIP over SASRec item embeddings (seed {seeds[0]}), SASRec user vector",
                      "depths": depths, "headline_depth": headline, "recall": recall},
        "speed_setup": {"requests": int(min(args.speed_requests, split.num_users)), "batch_size": args.speed_batch_size,
                        "candidates_per_request": 20, "precision": "fp32", "threads": torch.get_num_threads(),
                        "python": platform.python_version()},
        "rankers": rows,
        "comparisons": paired_comparisons(rows, runs, seeds, depths, pairs),
    }  # fmt: skip
    report["targets"] = check_targets(report)
    return report


def _find(rows: list[dict], kind: str, distilled: bool | None = None) -> dict | None:
    for row in rows:
        if row["kind"] != kind:
            continue
        if distilled is None:
            return row
        alpha = row.get("training", {}).get("recipe", {}).get("alpha", 0)
        if (alpha > 0) == distilled:
            return row
    return None


def check_targets(report: dict) -> dict[str, Any]:
    """The issue's targets, computed from the report (true/false plus the numbers compared). Metrics
    are means over the candidate seeds; "above SASRec" needs the paired 95% interval above zero on every
    seed (sampled-20 HR@1), "above SASRec's order" at the headline depth (full NDCG@10)."""
    rows, comparisons = report["rankers"], report.get("comparisons", {})
    roles = _roles(rows)
    teacher, student, labels, sasrec = roles["teacher"], roles["student"], roles["labels"], roles["sasrec"]
    out: dict[str, Any] = {}
    if teacher and student and "speed" in teacher and "speed" in student:
        ts, ss = teacher["speed"], student["speed"]
        ratio = ts["prompt_tokens_per_request"] / ss["prompt_tokens_per_request"]
        out["prompt_tokens_ratio"] = {"value": ratio, "target": ">= 10", "met": ratio >= 10}
        speedup = ss["requests_per_s"] / ts["requests_per_s"]
        out["throughput_ratio"] = {"value": speedup, "target": ">= 8", "met": speedup >= 8}

    def hr1(row: dict, common: bool = False) -> float:
        return row["metrics_common_users" if common else "metrics"]["sampled-20"]["hr@1"]["mean"]

    def above_zero(key: str) -> list[bool]:
        return [r["above_zero"] for r in comparisons.get(key, {}).get("results", {}).values()]

    if all("sampled-20" in row["metrics"] for row in rows):
        if teacher and student:  # the student alone (no fusion) against the teacher, where it has a fusion-off row
            solo = roles["alone"] or student
            t_hr, s_hr = hr1(teacher, common=True), hr1(solo, common=True)
            out["hr1_vs_teacher"] = {"row": solo["name"], "student": s_hr, "teacher": t_hr, "ratio": s_hr / t_hr if t_hr else None,
                                     "users": report["teacher_users"]["sampled-20"], "target": ">= 0.95",
                                     "met": bool(t_hr) and s_hr / t_hr >= 0.95}  # fmt: skip
        if student and sasrec and (above := above_zero("student_vs_sasrec")):
            out["hr1_vs_sasrec"] = {"student": hr1(student), "sasrec": hr1(sasrec), "seeds": report["seeds"],
                                    "intervals_above_zero": sum(above), "target": "above on every seed, paired 95% interval above zero",
                                    "met": all(above)}  # fmt: skip
        if student and labels:
            s_hr, l_hr = hr1(student), hr1(labels)
            out["distilled_vs_labels_only"] = {"distilled": s_hr, "labels_only": l_hr, "seeds": report["seeds"],
                                               "intervals_above_zero": sum(above_zero("distilled_vs_labels_only")),
                                               "met": s_hr > l_hr}  # fmt: skip
            if roles["alone"] and roles["labels_alone"]:  # both fused: what distillation did to the student itself
                out["distilled_vs_labels_only"].update(
                    distilled_alone=hr1(roles["alone"]), labels_only_alone=hr1(roles["labels_alone"]),
                    alone_intervals_above_zero=sum(above_zero("distilled_vs_labels_only_alone")))
    depth = str(report["retrieval"]["headline_depth"])
    rerank = comparisons.get("reranked_vs_sasrec_order", {}).get("results", {})
    if student and sasrec and depth in rerank:
        r = rerank[depth]
        out["reranked_vs_sasrec_order"] = {"depth": int(depth), "reranked": student["full_by_depth"][depth]["ndcg@10"],
                                           "sasrec_order": sasrec["full_by_depth"][depth]["ndcg@10"], "difference": r["mean"],
                                           "low": r["low"], "high": r["high"], "target": "full NDCG@10, paired 95% interval above zero",
                                           "met": r["above_zero"]}  # fmt: skip
    return out


def render_markdown(report: dict) -> str:
    def stats(value: dict) -> str:
        return f"{value['mean']:.4f}" + (f" ± {value['std']:.4f}" if value["n"] > 1 else "")

    def cell(row: dict, protocol: str, metric: str, common: bool = False) -> str:
        if protocol not in row["metrics"]:
            return "—"
        value = row["metrics_common_users" if common else "metrics"][protocol].get(metric)
        users = row["users"][protocol]
        mark = f" ({users})" if users != report["users"] else ""
        return "—" if value is None else f"{stats(value)}{'' if common else mark}"

    header = ["Model", "H"] + [f"{p} {m}" for p, m in TABLE_COLUMNS] + ["prompt tokens/req", "req/s", "cand/s", "peak mem MB"]
    retrieval, seeds = report["retrieval"], ", ".join(map(str, report["seeds"]))
    depths, headline = retrieval["depths"], retrieval["headline_depth"]
    recalls = ", ".join(f"recall@{k} = {retrieval['recall'][str(k)]:.4f}" for k in depths)
    reranked = [row for row in report["rankers"] if "full_by_depth" in row]
    lines = [
        f"# MovieLens-100K rankers ({report['split']} targets, candidate seeds {seeds})", "",
        f"Command: `{report['command']}`  ", f"Revision {report['git_revision'] or 'unknown'}; machine: {report['machine']['cpu']}, "
        f"{report['machine']['torch_threads']} torch threads, device {report['machine']['device']}.", "",
        f"All {report['users']} test users unless a cell says how many (the teacher: the first N). Sampled "
        f"protocols: mean ± std (sample std) over candidate seeds {seeds}; " + (
            f"full ranking does not depend on the candidate seed and is scored once. Full ranking for the LLM "
            f"rankers: {retrieval['method']}, top k for k in {', '.join(map(str, depths))} ({recalls}), then rerank; "
            f"the full-ranking columns use k = {headline} (`--headline-depth`){', every k is below' if reranked else ''}."
            if any("full" in row["metrics"] for row in report["rankers"]) else "full ranking was not scored (`--protocols`)."),
        "",
        "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
    ]  # fmt: skip
    for row in report["rankers"]:
        speed = row.get("speed")
        extra = ["—"] * 4 if speed is None else [
            f"{speed['prompt_tokens_per_request']:.0f}", f"{speed['requests_per_s']:.2f}", f"{speed['candidates_per_s']:.0f}",
            "—" if speed["peak_memory_mb"] is None else f"{speed['peak_memory_mb']:.0f}",
        ]  # fmt: skip
        lines.append("| " + " | ".join([row["name"], str(row["max_history"])] + [cell(row, p, m) for p, m in TABLE_COLUMNS] + extra) + " |")
    t = report["teacher_users"]
    lines += ["", f"On the teacher's users (first {t['sampled-20']} for sampled-20, first {t['sampled-100']} for the others):", "",
              "| Model | " + " | ".join(f"{p} {m}" for p, m in TABLE_COLUMNS) + " |", "|" + "---|" * (len(TABLE_COLUMNS) + 1)]  # fmt: skip
    for row in report["rankers"]:
        lines.append("| " + " | ".join([row["name"]] + [cell(row, p, m, common=True) for p, m in TABLE_COLUMNS]) + " |")
    if reranked:
        lines += ["", "Full-ranking NDCG@10 by rerank depth k (the LLM rows rerank SASRec's top k; the SASRec row is its "
                  "own order of those k items; the retrieval's recall@k bounds every row's recall):", "",
                  "| Model | " + " | ".join(f"top-{k}" for k in depths) + " |", "|" + "---|" * (len(depths) + 1),
                  "| retrieval recall@k | " + " | ".join(f"{retrieval['recall'][str(k)]:.4f}" for k in depths) + " |"]  # fmt: skip
        for row in reranked:
            mark = f" ({row['users']['full']})" if row["users"]["full"] != report["users"] else ""
            lines.append("| " + " | ".join([row["name"] + mark] + [f"{row['full_by_depth'][str(k)]['ndcg@10']:.4f}" for k in depths]) + " |")
    compared, skipped = [], []
    for key, c in report.get("comparisons", {}).items():
        if "skipped" in c:
            skipped.append(f"- {key}: skipped — {c['skipped']}")
            continue
        for variant, r in c["results"].items():
            on = f"seed {variant}" if c["per"] == "seed" else f"top-{variant}"
            compared.append(f"| {c['a']} | {c['b']} | {c['protocol']} {c['metric']} | {on} | {r['n']} | {r['mean']:+.4f} | "
                            f"[{r['low']:+.4f}, {r['high']:+.4f}] | {'yes' if r['above_zero'] else 'no'} |")  # fmt: skip
    if compared or skipped:
        lines += ["", "Paired comparisons: the per-user difference a − b, its mean over the n users both rows were scored "
                  "on, and the 95% percentile-bootstrap interval of that mean over users:", ""]  # fmt: skip
        lines += ["| a | b | metric | on | n | a − b | 95% interval | above zero |", "|---|---|---|---|---|---|---|---|", *compared] if compared else []
        lines += ["", *skipped] if compared and skipped else skipped
    setup = report["speed_setup"]
    lines += ["", f"Speed: the first {setup['requests']} sampled-20 test requests, batches of {setup['batch_size']}, "
              f"{setup['precision']}, models taking turns batch by batch; median batch time. Peak memory: "
              "the peak resident memory of a fresh process holding only that model while it scores two of "
              "those batches (CPU), or the CUDA peak above the loaded models (GPU).", "", "Targets:", ""]  # fmt: skip
    for name, value in report["targets"].items():
        lines.append(f"- {name}: {'met' if value['met'] else 'NOT met'} — " + ", ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items() if k != "met"))  # fmt: skip
    return "\n".join(lines) + "\n"


def cli_eval_ranker(args: argparse.Namespace) -> int:
    report = run_eval(args)
    output = Path(args.output)
    atomic_write_text(output, json.dumps(report, indent=2) + "\n")
    markdown = atomic_write_text(output.with_suffix(".md"), render_markdown(report))
    print(markdown.read_text())
    print(f"wrote {output} and {markdown}")
    return 0
