"""The evaluator's interface: :class:`ProtocolRanker` puts a :class:`MixLLMRanker` behind
:class:`~mixllm.data.evaluation.Ranker` (``evaluate_protocols``, ``mixllm eval ranker``)."""

from __future__ import annotations

import torch

from mixllm.data.evaluation import Ranker, RankingBatch
from mixllm.data.split import DEFAULT_HISTORY_LENGTH
from mixllm.errors import DataError
from mixllm.ranking.ranker import MixLLMRanker, RankingRequest


class ProtocolRanker(Ranker):
    """A :class:`MixLLMRanker` behind the evaluator's :class:`~mixllm.data.evaluation.Ranker`
    interface (``evaluate_protocols``, ``mixllm eval ranker``): batches of padded histories and
    candidates become requests (:meth:`RankingRequest.from_padded`), scored ``batch_size`` at a time.

    Two history lengths: :attr:`max_history` (the evaluator's: how many of the most recent items
    ``make_batch`` supplies, the longest the ranker reads) and :attr:`max_item_history` (H, how
    many of them become item tokens). They differ only for a student with user tokens, whose user
    encoder reads ``UserConfig.max_history`` items."""

    supports_full_ranking = False

    def __init__(self, ranker: MixLLMRanker, name: str, batch_size: int = 8, retriever=None) -> None:
        self.ranker, self.name, self.batch_size = ranker.eval(), name, batch_size
        # A ranker without max_history makes every history item a token: it gets the default H.
        self.max_item_history: int = ranker.max_history or DEFAULT_HISTORY_LENGTH
        """H: the most recent history items the ranker reads as item tokens."""
        self.reads: int = self.max_item_history if ranker.max_history is None else ranker.max_request_history
        """The most recent history items the ranker itself reads (item tokens and user encoder)."""
        fused = ranker.fusion_gate is not None
        if fused and retriever is None:
            raise DataError(f"{name}: this ranker fuses the retriever's scores; give ProtocolRanker the retriever")
        self.retriever = retriever if fused else None
        """A fused ranker's retriever (``mixllm.retrieval.FaissRetriever``): its candidate scores go with each request."""
        self.max_history: int = max(self.reads, self.retriever.max_history if self.retriever is not None else 0)
        """What the evaluator supplies: the longest history the ranker or its retriever reads."""

    def requests(self, batch: RankingBatch) -> list[RankingRequest]:
        """One request per row, each history cut to the most recent items the ranker reads; a fused
        ranker's requests carry the retriever's scores of their candidates (from the full history)."""
        requests = [RankingRequest.from_padded(h, c, self.reads) for h, c in zip(batch.history, batch.candidates)]
        if self.retriever is not None:
            fused = self.retriever.candidate_scores(batch.history[:, -self.retriever.max_history :], batch.candidates)
            for request, row in zip(requests, fused.tolist()):
                request.retriever_scores = row
        return requests

    @torch.inference_mode()
    def score(self, batch: RankingBatch) -> torch.Tensor:
        """(B, C) scores of ``batch.candidates``."""
        requests = self.requests(batch)
        out = [self.ranker.score(requests[i : i + self.batch_size]) for i in range(0, len(requests), self.batch_size)]
        return torch.stack([row.float().cpu() for part in out for row in part])  # (B, C)
