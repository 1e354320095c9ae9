"""The service's verbs as plain Python: rank, recommend, rerank, items, events. No FastAPI here.

Nothing here blocks the event loop: the async methods resolve users and items in a worker thread
(store reads, the catalog lock), submit the request to the model's
:class:`~serving.batching.MicroBatcher` and await the scores, so concurrent requests share one
forward, which runs in the model thread.

**History length.** A ranker reads at most its ``max_history`` items (10 for the committed
checkpoints). A longer history (given explicitly, or a user with more events) is **truncated to the
most recent** items, and the response says so (``history.given`` vs ``history.used``): a client is
never refused for a long history, and can see what was read.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from mixllm.errors import DataError
from mixllm.ranking import MixLLMRanker, RankingRequest
from mixllm.retrieval import left_padded
from serving.batching import MicroBatcher
from serving.catalog import Catalog
from serving.errors import Invalid, NotFound
from serving.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    """A ranker the service answers with."""

    name: str
    ranker: MixLLMRanker
    load_seconds: float
    batcher: MicroBatcher | None = None

    @property
    def kind(self) -> str:
        return self.ranker.mode  # "teacher" | "student"

    @property
    def max_history(self) -> int:
        """The most recent history items the ranker reads (longer than H with user tokens)."""
        return self.ranker.max_request_history or 10

    @property
    def fused(self) -> bool:
        """The ranker adds a gated SASRec score to its own (``MixLLMRanker(fusion=True)``)."""
        return self.ranker.fusion_gate is not None


@dataclass
class UserContext:
    """A request's user: the item rows the ranker reads and what the service did to the history."""

    rows: list[int]
    """History rows, oldest first, at most the model's max_history."""
    given: int
    """History items available (before truncation)."""
    seen: set[int] = field(default_factory=set)
    """Rows the user interacted with (filled only for exclude_seen: one more store read)."""
    retrieval_rows: list[int] = field(default_factory=list)
    """The longer history the retriever reads (up to its max_history)."""

    def describe(self) -> dict:
        return {"given": self.given, "used": len(self.rows), "truncated": self.given > len(self.rows)}

    def retrieval_history(self) -> torch.Tensor:
        """(1, L) :attr:`retrieval_rows` left-padded with PAD (at least one column), as SASRec reads them."""
        return left_padded(self.retrieval_rows)


@dataclass
class RerankJob:
    """A rerank of texts outside the catalog, queued with the model's rank requests."""

    query: str
    documents: list[str]


@dataclass
class Ranked:
    """Scores of one request, best first."""

    model: str
    results: list[dict]
    prompt_tokens: int
    history: dict | None = None


class RankingService:
    """rank / recommend / rerank over the catalog with the served models."""

    def __init__(self, settings: Settings, catalog: Catalog, models: dict[str, ServedModel]) -> None:
        self.settings, self.catalog, self.models = settings, catalog, models
        self.default_model = next(iter(models))

    # --- helpers --------------------------------------------------------------------------------
    def model(self, name: str | None) -> ServedModel:
        name = name or self.default_model
        if name not in self.models:
            raise NotFound(f"model: unknown model {name!r} (served: {', '.join(self.models)})", field="model", value=name)
        return self.models[name]

    def user_context(self, user_id: str | None, history: Sequence[str] | None, max_history: int,
                     with_seen: bool = False) -> UserContext:
        """Resolve ``{"id": ...}`` or ``{"history": [...]}`` into rows (most recent max_history);
        ``with_seen`` also reads every item the user interacted with (recommend's exclude_seen)."""
        retrieval_len = self.catalog.retriever.max_history if self.catalog.retriever is not None else max_history
        if user_id is not None:
            store = self.catalog.store
            if not store.has_user(user_id):
                raise NotFound(f"user.id: unknown user id {user_id!r}", field="user.id", value=user_id)
            ids = store.history(user_id)
            rows = [self.catalog.row_of[i] for i in ids if i in self.catalog.row_of and self.catalog.live[self.catalog.row_of[i]]]
            seen = {self.catalog.row_of[i] for i in store.seen(user_id) if i in self.catalog.row_of} if with_seen else set()
        else:
            rows = self.catalog.rows(list(history or []), "user.history")
            seen = set(rows)
        return UserContext(rows[-max_history:] if max_history else [], len(rows), seen, rows[-retrieval_len:])

    def _check_count(self, count: int, field: str) -> None:
        """``count`` items (candidates or documents) within 1..max_candidates, else Invalid naming both."""
        limit = self.settings.max_candidates
        if count == 0:
            raise Invalid(f"{field}: the list is empty; give at least one item", field=field, value=0, limit=1)
        if count > limit:
            raise Invalid(f"{field}: {count} items is more than the limit of {limit} (max_candidates)",
                          field=field, value=count, limit=limit)

    def _check_candidates(self, candidates: Sequence[str], field: str = "candidates") -> None:
        self._check_count(len(candidates), field)
        seen: dict[str, int] = {}
        for i, c in enumerate(candidates):
            if c in seen:
                raise Invalid(f"{field}[{i}]: item id {c!r} repeats {field}[{seen[c]}]; candidates must be distinct",
                              field=f"{field}[{i}]", value=c)
            seen[c] = i

    # --- the model call (worker thread) ---------------------------------------------------------
    def run_batch(self, model: ServedModel, requests: list) -> list:
        """Score a batch of :class:`RankingRequest` in one forward (a :class:`RerankJob` runs on its
        own); a request that fails alone gets its exception back."""
        ranker = model.ranker
        prompts, out = [], [None] * len(requests)
        for i, job in enumerate(requests):
            if isinstance(job, RerankJob):
                try:
                    out[i] = self.rerank_sync(job.query, job.documents, model)
                except DataError as error:
                    out[i] = Invalid(str(error), field="documents")
        with torch.inference_mode():
            with self.catalog.lock:  # the catalog is read here only: the forward runs outside the lock
                for i, request in enumerate(requests):
                    if isinstance(request, RerankJob):
                        continue
                    try:
                        prompts.append((i, ranker.build_prompt(request, i)))
                    except DataError as error:
                        out[i] = Invalid(str(error), field="request")
                if not prompts:
                    return out
                inputs = ranker.collate([p for _, p in prompts]).to(next(ranker.parameters()).device)
                item_embeds = ranker.gather_item_tokens(inputs)  # a copy: later cache writes cannot reach it
            scores = ranker(inputs, item_embeds=item_embeds).float().cpu()
        for b, (i, prompt) in enumerate(prompts):
            out[i] = (scores[b, : len(prompt.segment_ids)], prompt.num_tokens)
        return out

    async def _score(self, model: ServedModel, request: RankingRequest) -> tuple[torch.Tensor, int]:
        return await model.batcher.submit(request)

    # --- verbs ----------------------------------------------------------------------------------
    async def rank(self, user_id: str | None, history: Sequence[str] | None, candidates: Sequence[str],
                   top_n: int | None = None, model_name: str | None = None) -> Ranked:
        model = self.model(model_name)
        self._check_candidates(candidates)
        # Store reads and the catalog lock (held by a running forward) stay off the event loop.
        context, request = await asyncio.to_thread(self._rank_request, model, user_id, history, candidates)
        scores, tokens = await self._score(model, request)
        order = torch.argsort(scores, descending=True, stable=True).tolist()[: top_n or len(candidates)]
        results = [{"item_id": candidates[i], "index": i, "score": float(scores[i])} for i in order]
        return Ranked(model.name, results, tokens, context.describe())

    def request_for(self, model: ServedModel, context: UserContext, candidates: list[int]) -> RankingRequest:
        """(worker thread) The ranking request of ``context``'s rows and ``candidates``; for a fused model
        with the retriever's score of each candidate (SASRec over the user's retrieval rows).

        A request with a cold candidate (:meth:`Catalog.is_cold`) is scored by the ranker alone
        (every retriever score 0): SASRec's score of a stand-in vector buries a new item, while the
        student alone still ranks it (``reports/cold_items_default.md``: cold targets' HR@1 fused vs
        alone; the README's *Cold items*)."""
        request = RankingRequest(context.rows, candidates)
        if model.fused:
            with self.catalog.lock:
                if any(self.catalog.is_cold(row) for row in candidates):
                    request.retriever_scores = [0.0] * len(candidates)
                    return request
                scores = self.catalog.retriever.candidate_scores(context.retrieval_history(), torch.as_tensor([candidates]))
            request.retriever_scores = scores[0].tolist()
        return request

    def _rank_request(self, model: ServedModel, user_id, history, candidates: Sequence[str]) -> tuple[UserContext, RankingRequest]:
        """(worker thread) The user and the request of ``candidates``, in one trip off the event loop."""
        context, rows = self._resolve(user_id, history, model.max_history, candidates)
        return context, self.request_for(model, context, rows)

    def _resolve(self, user_id, history, max_history: int, candidates: Sequence[str] = (),
                 with_seen: bool = False) -> tuple[UserContext, list[int]]:
        """(worker thread) Pull other replicas' catalog changes, then the user's rows and the candidates' rows."""
        self.catalog.refresh()
        with self.catalog.lock:
            return self.user_context(user_id, history, max_history, with_seen), self.catalog.rows(candidates, "candidates")

    async def recommend(self, user_id: str | None, history: Sequence[str] | None, k: int, exclude_seen: bool = True,
                        model_name: str | None = None) -> Ranked:
        model = self.model(model_name)
        if self.catalog.retriever is None:
            raise NotFound("recommend: this service runs without a retriever (--sasrec)", field="sasrec")
        context, request = await asyncio.to_thread(self._retrieve, model, user_id, history, exclude_seen)
        if request is None:
            return Ranked(model.name, [], 0, context.describe())
        candidates = request.candidates
        scores, tokens = await self._score(model, request)
        order = torch.argsort(scores, descending=True, stable=True).tolist()[:k]
        ids = self.catalog.item_ids
        results = [{"item_id": ids[candidates[i]], "index": i, "score": float(scores[i]),
                    "text": self.catalog.texts[candidates[i]]} for i in order]
        return Ranked(model.name, results, tokens, context.describe())

    def _retrieve(self, model: ServedModel, user_id, history, exclude_seen: bool) -> tuple[UserContext, RankingRequest | None]:
        """(worker thread) The user and the request of the retriever's top ``retrieve`` rows among the
        allowed items (None when no item is allowed)."""
        context, _ = self._resolve(user_id, history, model.max_history, with_seen=exclude_seen)
        with self.catalog.lock:
            allowed = self.catalog.live.copy()
            if exclude_seen and context.seen:
                allowed[list(context.seen)] = False
            available = int(allowed.sum())
            if available == 0:
                return context, None
            pool = min(self.settings.retrieve, available)
            candidates = self.catalog.retriever.top_k(context.retrieval_history(), allowed[None], pool)[0].tolist()
        return context, self.request_for(model, context, candidates)

    async def rerank(self, query: str, documents: Sequence[str], model_name: str | None = None) -> tuple[str, list[float], int]:
        """(model name, one score per document, prompt tokens): through the model's batcher, so a
        rerank waits in the same bounded queue as rank requests and never overlaps a forward."""
        model = self.model(model_name)
        self._check_count(len(documents), "documents")
        scores, tokens = await model.batcher.submit(RerankJob(query, list(documents)))
        return model.name, scores, tokens

    def rerank_sync(self, query: str, documents: Sequence[str], model: ServedModel) -> tuple[list[float], int]:
        """Scores of documents the catalog does not hold (worker thread). A student encodes them on
        the fly (MiniLM + the cold-item collaborative part, as for new items) and reads the
        query as text where the history goes; a teacher reads both as text. A fused model scores
        them with its own score alone: documents outside the catalog have no SASRec vector, so
        their retriever score is 0 (``score + gate * 0``)."""
        ranker = model.ranker
        with self.catalog.lock, torch.inference_mode():
            if model.kind == "teacher":
                prompt = ranker.prompts.teacher([query], list(documents))
            else:
                student = self.catalog.students[model.name]
                features = self.catalog.document_features(student, list(documents))
                prompt = ranker.prompts.student(candidate_features=features, history_text=query)
            if model.fused:
                prompt.retriever_scores = torch.zeros(len(documents))
            inputs = ranker.collate([prompt]).to(next(ranker.parameters()).device)
            scores = ranker(inputs).float().cpu()[0, : len(documents)]
        return scores.tolist(), prompt.num_tokens


def softmax(scores: Sequence[float]) -> list[float]:
    """Relevance scores of a rerank: softmax over the request's documents (sums to 1)."""
    top = max(scores)
    exp = [math.exp(s - top) for s in scores]
    total = sum(exp)
    return [e / total for e in exp]


class EventService:
    """Appends interactions to users' histories (durably, in the store)."""

    def __init__(self, settings: Settings, catalog: Catalog) -> None:
        self.settings, self.catalog = settings, catalog

    def append(self, events: Sequence[tuple[str, str, float | None]]) -> list:
        limit = self.settings.max_events
        if not events:
            raise Invalid("events: the list is empty", field="events", value=0, limit=1)
        if len(events) > limit:
            raise Invalid(f"events: {len(events)} events is more than the limit of {limit} (max_events)",
                          field="events", value=len(events), limit=limit)
        self.catalog.refresh()
        for i, (_, item_id, _) in enumerate(events):
            row = self.catalog.row_of.get(item_id)
            if row is None or not self.catalog.live[row]:
                raise NotFound(f"events[{i}].item_id: unknown item id {item_id!r}", field=f"events[{i}].item_id", value=item_id)
        now = time.time()
        return self.catalog.store.append_events([(u, i, now if t is None else t) for u, i, t in events])
