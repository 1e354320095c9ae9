"""Candidate retrieval over a whole catalog: SASRec's user vector, FAISS inner-product search.

An LLM ranker cannot score every item of a catalog per request, so full ranking (the evaluation's
``full`` protocol and the service's ``/v1/recommend``) first cuts the catalog to the top k by inner
product between SASRec's user vector and its item embeddings (a FAISS ``IndexFlatIP``: exact
search), then reranks those k with the LLM ranker.

The catalog may grow (the service adds items at run time): :meth:`FaissRetriever.set_rows` writes
item vectors at any rows, appending new ones to the index and to SASRec's input table, so a history
holding a new item gets a user vector too.
"""

from __future__ import annotations

import numpy as np
import torch

from mixllm.data.split import PAD
from mixllm.errors import DataError


def left_padded(rows) -> torch.Tensor:
    """(1, L) one history of item rows (oldest first) left-padded with PAD, at least one column: what
    :meth:`FaissRetriever.candidate_scores` and :meth:`FaissRetriever.top_k` read for one request."""
    rows = list(rows)
    padded = torch.full((1, max(len(rows), 1)), PAD, dtype=torch.long)
    if rows:
        padded[0, -len(rows) :] = torch.as_tensor(rows)
    return padded


class FaissRetriever:
    """Top-k items by inner product between SASRec's user vector and its item embeddings (FAISS)."""

    def __init__(self, sasrec) -> None:
        import faiss

        self.sasrec = sasrec.eval()
        self.index = faiss.IndexFlatIP(sasrec.config.hidden_size)
        self.index.add(self.item_vectors.contiguous().numpy())

    @property
    def item_vectors(self) -> torch.Tensor:
        """(num_items, D) float32 item vectors, row = item index."""
        return self.sasrec.item_embeddings().detach().float()

    @property
    def num_items(self) -> int:
        return int(self.index.ntotal)

    @property
    def max_history(self) -> int:
        """H of the retriever: the most recent items SASRec's user vector reads."""
        return self.sasrec.config.max_history

    @torch.no_grad()
    def set_rows(self, rows: list[int], vectors: torch.Tensor) -> None:
        """Write ``vectors`` (n, D) at ``rows``: rows past the end append, others update in place."""
        vectors = torch.as_tensor(vectors, dtype=torch.float32)
        if vectors.shape != (len(rows), self.sasrec.config.hidden_size):
            raise DataError(f"item vectors have shape {tuple(vectors.shape)}; expected ({len(rows)}, {self.sasrec.config.hidden_size})")
        table = self.sasrec.item_embedding.weight  # (1 + N, D); row 0 is padding
        needed = max(rows) + 2
        if needed > table.shape[0]:
            grown = torch.zeros(needed, table.shape[1], dtype=table.dtype)
            grown[: table.shape[0]] = table
            self.sasrec.item_embedding.weight = torch.nn.Parameter(grown, requires_grad=False)
            self.sasrec.item_embedding.num_embeddings = needed
            self.sasrec.config.num_items = needed - 1
        self.sasrec.item_embedding.weight[torch.as_tensor(rows) + 1] = vectors
        appended_only = min(rows) >= self.num_items
        if appended_only and sorted(rows) == list(range(self.num_items, self.num_items + len(rows))):
            self.index.add(self.item_vectors[self.num_items :].contiguous().numpy())
        else:  # an update (or a gap): rebuild, exact and cheap for catalogs of this size
            self.index.reset()
            self.index.add(self.item_vectors.contiguous().numpy())

    @torch.inference_mode()
    def candidate_scores(self, history: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """(B, C) float32 inner products of SASRec's user vector with each candidate's item vector: the
        retriever's own score of the items it proposes (what a fused ranker adds, gated, to its score).

        ``history``: (B, L) left-padded (PAD = -1) item indices, most recent last; ``candidates``: (B, C)."""
        users = self.sasrec.user_vectors(history).float()  # (B, D)
        return torch.einsum("bd,bcd->bc", users, self.item_vectors[candidates])  # (B, C)

    @torch.inference_mode()
    def top_k(self, history: torch.Tensor, allowed: np.ndarray, k: int) -> np.ndarray:
        """(B, k) item ids, best first, drawn only from ``allowed`` (B, N) bool.

        ``history``: (B, L) left-padded (PAD = -1) item indices, most recent last.
        """
        queries = self.sasrec.user_vectors(history).float().contiguous().numpy()  # (B, D)
        excluded = int((~allowed).sum(1).max())
        _, ids = self.index.search(queries, min(self.num_items, k + excluded))  # (B, k + excluded)
        out = np.empty((len(ids), k), dtype=np.int64)
        for row, (found, ok) in enumerate(zip(ids, allowed)):
            kept = found[(found >= 0)]
            kept = kept[ok[kept]][:k]
            if len(kept) < k:
                raise DataError(f"retrieval found only {len(kept)} allowed items; k = {k} is too large")
            out[row] = kept
        return out
