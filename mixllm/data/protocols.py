"""Evaluation protocols as data: which candidates each user's target competes with, and the metrics.

Three protocols (:data:`PROTOCOLS`):

=============  ===================================================  ====================
name           candidates per user                                  metrics
=============  ===================================================  ====================
sampled-20     the target + 19 items the user never interacted with  HR@1, NDCG@5, MRR
sampled-100    the target + 99 such items                            HR@10, NDCG@10
full           every item the user never interacted with + target    Recall@10/20, NDCG@10
=============  ===================================================  ====================

"Never interacted with" means over the user's whole log (training, validation and test), so no
negative is an item the user actually chose. Negatives are drawn uniformly without replacement.

**Sampled candidate lists are data.** :func:`get_candidates` draws them once per
``(dataset, protocol, split, seed)``, in a shuffled order (the target's column is stored, so an LLM
that reads the list never finds the answer in a fixed place), and writes them to

    {cache_dir}/{dataset.name}/{protocol}_seed{seed}_{split}_{key}.npz

where ``cache_dir`` defaults to ``$MIXLLM_HOME/candidates`` (``~/.cache/mixllm/candidates``) and
``key`` hashes the dataset's fingerprint, the protocol, the split, the seed and
:data:`SAMPLER_VERSION`. Every later model reads the same file, and a changed dataset or protocol
gets a new key instead of stale lists. Full ranking samples nothing: its candidates follow from the
split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mixllm.data.split import SPLITS, LeaveOneOutSplit, Split
from mixllm.errors import DataError
from mixllm.metrics import METRIC_PATTERN
from mixllm.provenance import atomic_write

log = logging.getLogger(__name__)

SAMPLER_VERSION = 1
"""Bump when the sampling algorithm changes, so cached lists from the old one are not reused."""


@dataclass(frozen=True)
class EvalProtocol:
    """One way to rank a user's held-out target."""

    name: str
    """Identifier used in reports and cache file names."""
    num_negatives: int | None
    """Negatives sampled per user; None ranks the whole catalog (full ranking)."""
    metrics: tuple[str, ...]
    """Metric names understood by :func:`mixllm.metrics.compute_metric`, e.g. ``"ndcg@10"``."""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"protocol name must be non-empty and contain no '/': {self.name!r}")
        if self.num_negatives is not None and self.num_negatives < 1:
            raise ValueError(f"{self.name}: num_negatives must be >= 1 or None, got {self.num_negatives}")
        if not self.metrics:
            raise ValueError(f"{self.name}: no metrics")
        for metric in self.metrics:
            if not METRIC_PATTERN.match(metric):
                raise ValueError(f"{self.name}: unknown metric {metric!r}")

    @property
    def is_full_ranking(self) -> bool:
        return self.num_negatives is None

    @property
    def num_candidates(self) -> int | None:
        """Candidates per user (target included); None for full ranking."""
        return None if self.num_negatives is None else self.num_negatives + 1


SAMPLED_20 = EvalProtocol("sampled-20", num_negatives=19, metrics=("hr@1", "ndcg@5", "mrr"))
SAMPLED_100 = EvalProtocol("sampled-100", num_negatives=99, metrics=("hr@10", "ndcg@10"))
FULL_RANKING = EvalProtocol("full", num_negatives=None, metrics=("recall@10", "recall@20", "ndcg@10"))
PROTOCOLS: dict[str, EvalProtocol] = {p.name: p for p in (SAMPLED_20, SAMPLED_100, FULL_RANKING)}


@dataclass
class CandidateLists:
    """Every user's candidates for one sampled protocol, split and seed."""

    protocol: str
    split: str
    seed: int
    candidates: np.ndarray
    """``(num_users, C)`` int64 item indices; row ``u`` belongs to ``user_idx == u``."""
    target_index: np.ndarray
    """``(num_users,)`` column of the target in ``candidates``."""
    key: str
    """Hash of what the lists depend on (see the module docstring)."""

    def digest(self) -> str:
        """sha256 of the lists themselves, for reports: equal digests = identical lists."""
        digest = hashlib.sha256(np.ascontiguousarray(self.candidates, dtype=np.int64).tobytes())
        digest.update(np.ascontiguousarray(self.target_index, dtype=np.int64).tobytes())
        return digest.hexdigest()


def default_cache_dir() -> Path:
    """``$MIXLLM_HOME/candidates`` (``MIXLLM_HOME`` defaults to ``~/.cache/mixllm``)."""
    from mixllm.assets import mixllm_home

    return mixllm_home() / "candidates"


def candidates_key(split: LeaveOneOutSplit, protocol: EvalProtocol, which: Split, seed: int) -> str:
    """Hash of everything a candidate list depends on."""
    payload = {
        "dataset": split.dataset.fingerprint(),
        "protocol": asdict(protocol),
        "split": which,
        "seed": seed,
        "sampler_version": SAMPLER_VERSION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def sample_candidates(split: LeaveOneOutSplit, protocol: EvalProtocol, which: Split, seed: int) -> CandidateLists:
    """Draw every user's candidate list (target + uniform negatives never interacted with), shuffled.

    Deterministic given ``(dataset, protocol, which, seed)``: the random stream is seeded from all
    four, so validation and test lists are independent draws.
    """
    if protocol.is_full_ranking:
        raise ValueError(f"{protocol.name} ranks every item; there is nothing to sample")
    if which not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {which!r}")
    rng = np.random.default_rng([seed, zlib.crc32(protocol.name.encode()), SPLITS.index(which)])
    n_neg, n_items = protocol.num_negatives, split.num_items
    targets = split.targets(which)
    candidates = np.empty((split.num_users, n_neg + 1), dtype=np.int64)
    candidates[:, 0] = targets
    for user in range(split.num_users):
        seen = np.unique(split.interacted_items(user))
        if n_items - len(seen) < n_neg:
            raise DataError(
                f"{split.dataset.name}: user {split.dataset.user_ids[user]!r} interacted with {len(seen)} of "
                f"{n_items} items, leaving fewer than the {n_neg} negatives protocol {protocol.name} needs"
            )
        candidates[user, 1:] = _draw_unseen(rng, n_items, seen, n_neg)
    order = rng.random(candidates.shape).argsort(axis=1)  # (U, C) a random permutation per user
    candidates = np.take_along_axis(candidates, order, axis=1)
    target_index = np.argmax(order == 0, axis=1)
    return CandidateLists(
        protocol=protocol.name,
        split=which,
        seed=seed,
        candidates=candidates,
        target_index=target_index.astype(np.int64),
        key=candidates_key(split, protocol, which, seed),
    )


def _draw_unseen(rng: np.random.Generator, n_items: int, seen_sorted: np.ndarray, n: int) -> np.ndarray:
    """``n`` distinct items uniformly from ``range(n_items)`` minus ``seen_sorted``.

    Rejection sampling: draw uniform items, drop seen ones and repeats (keeping first occurrences);
    the accepted sequence is a uniformly random ordered sample without replacement from the pool.
    """
    chosen: list[int] = []
    chosen_set: set[int] = set()
    pool = n_items - len(seen_sorted)
    while len(chosen) < n:
        # Oversample by the expected rejection rate so one round is almost always enough.
        size = int((n - len(chosen)) * n_items / pool * 1.2) + 8
        draws = rng.integers(0, n_items, size=size)
        pos = np.searchsorted(seen_sorted, draws)
        unseen = draws[(pos >= len(seen_sorted)) | (seen_sorted[np.minimum(pos, len(seen_sorted) - 1)] != draws)]
        for item in unseen.tolist():
            if item not in chosen_set:
                chosen_set.add(item)
                chosen.append(item)
                if len(chosen) == n:
                    break
    return np.asarray(chosen, dtype=np.int64)


def get_candidates(
    split: LeaveOneOutSplit,
    protocol: EvalProtocol,
    which: Split,
    seed: int,
    cache_dir: str | Path | None = None,
) -> CandidateLists:
    """The cached candidate lists for ``(protocol, which, seed)``, sampled and written on first use."""
    key = candidates_key(split, protocol, which, seed)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder / split.dataset.name / f"{protocol.name}_seed{seed}_{which}_{key[:16]}.npz"
    if path.is_file():
        with np.load(path) as stored:
            if str(stored["key"]) == key and np.array_equal(
                np.take_along_axis(stored["candidates"], stored["target_index"][:, None], 1)[:, 0], split.targets(which)
            ):
                log.debug("reusing candidate lists %s", path)
                return CandidateLists(
                    protocol=protocol.name,
                    split=which,
                    seed=seed,
                    candidates=stored["candidates"].astype(np.int64),
                    target_index=stored["target_index"].astype(np.int64),
                    key=key,
                )
        log.warning("candidate lists %s do not match the split; sampling them again", path)
    lists = sample_candidates(split, protocol, which, seed)
    with atomic_write(path) as tmp:
        np.savez_compressed(tmp, candidates=lists.candidates, target_index=lists.target_index, key=np.array(key))
    log.info("wrote candidate lists %s", path)
    return lists
