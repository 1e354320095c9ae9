"""The catalog as one replica sees it: the store's items plus what the models read per item.

The store (:class:`serving.store.Store`) is the only state; everything here is a cache rebuilt from it:

* ``rows``: item id <-> dense row (the store's ``Item.row``), texts, live flags;
* ``text_vectors``: (N, 384) MiniLM vectors of the item texts (the student's text features);
* per student model, an :class:`~mixllm.item_cache.ItemTokenCache` of its projected item tokens and
  the feature rows they were made from;
* the retriever's item vectors (FAISS) for ``/v1/recommend``.

**Items the collaborative model never saw.** A student reads ``[MiniLM(text) ; SASRec vector]``
(``checkpoints/student``: 384 + 64). An item added at run time has text but no SASRec vector:

* the **student** reads a **zero** SASRec part (:data:`COLD_RULE`). Chosen by measurement
  (``python -m training.cold_items --users 300`` -> ``reports/cold_items.md``): with each test
  target made cold, zeros ranked it best of six cold rules on sampled-20 (HR@1 0.210, mean rank
  4.14; warm 0.340 / 3.88; the nearest text neighbour's vector 0.193 / 6.11, the 10-neighbour text
  mean 0.140 / 5.88, the catalog mean 0.060 / 6.34). The student never saw a cold item in
  training, and a borrowed vector misleads it more than an empty one.
* the **retriever** (FAISS, ``/v1/recommend``) gets the cosine-weighted mean of the SASRec vectors
  of the 10 seed items whose texts are most similar (:func:`mixllm.features.neighbour_mean`), so a
  new item is retrieved for the users of items that read like it (a zero vector would score 0 for
  every user).

A client may send the collaborative vector itself (``features``, width = the SASRec hidden size),
which then replaces both (the student's only if its SASRec columns are the retriever's vectors, see
``same_space``). Seed items keep the exact feature rows the student checkpoint stores; if their text
is changed, the text part is re-encoded and their own SASRec vector kept (their interactions did not
change).

Thread safety: every read and write of this state holds ``self.lock`` (model batches hold it
while they prepare and score, upserts while they write), so a request never sees half an update.
:meth:`refresh` pulls changes other replicas wrote to the shared store (by catalog version).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mixllm.errors import DataError
from mixllm.features import FeatureLayout, neighbour_mean
from mixllm.item_cache import ItemTokenCache, cache_key
from mixllm.provenance import atomic_write
from mixllm.ranking import MixLLMRanker
from serving.errors import Invalid, NotFound
from serving.store import Item, Store

log = logging.getLogger(__name__)

COLD_RULE = "zeros"
"""What a student reads in the collaborative columns of an item without a vector (module doc)."""
RETRIEVER_COLD_RULE = "neighbours"
"""What the retriever (FAISS, and a fused ranker's SASRec score) reads for an item without a vector."""
TEXT_PART = "minilm"
COLLAB_PART = "sasrec"
SAME_SPACE_ATOL = 1e-3
"""The student's SASRec columns and the retriever's item vectors count as one space when they agree
within this: the seed-0 SASRec retrained on another x86 CPU reproduces the vectors the committed
student stores within 2e-4 (rounding in training), while two different SASRec runs differ by ~0.1."""


@dataclass
class StudentItems:
    """One student model's per-item inputs: how its feature row is laid out, the rows, the tokens."""

    ranker: MixLLMRanker
    layout: FeatureLayout
    """Which columns of its feature row are which ("minilm", "sasrec", ...)."""
    seed_features: torch.Tensor
    """(N0, F) the feature rows its checkpoint stores for the seed catalog."""
    features: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    """(N, F) the feature row of every catalog row (what the token cache was made from)."""
    same_space: bool | None = None
    """Whether its collaborative columns are the retriever's item vectors (computed once)."""

    def part(self, name: str) -> slice | None:
        """The columns of part ``name``, None if this student does not read it."""
        return self.layout.slice(name) if name in self.layout.names else None


class Catalog:
    """See the module doc. Built by :meth:`load`; the services call the methods below."""

    def __init__(self, store: Store, seed_texts: Sequence[str], encode_texts: Callable[[list[str]], torch.Tensor],
                 students: dict[str, StudentItems], teachers: dict[str, MixLLMRanker], retriever=None,
                 cache_dir: Path | None = None, checkpoints: dict[str, Path] | None = None) -> None:
        self.store, self.seed_texts, self.encode_texts = store, list(seed_texts), encode_texts
        self.students, self.teachers, self.retriever = students, teachers, retriever
        self.cache_dir, self.checkpoints = cache_dir, checkpoints or {}
        self.lock = threading.RLock()
        self.version = -1
        self.row_of: dict[str, int] = {}
        self.item_ids: list[str] = []
        self.texts: list[str] = []
        self.live = np.zeros(0, dtype=bool)
        self.client_features: dict[int, np.ndarray] = {}
        self.text_vectors = torch.empty(0)
        self._seed_vectors: torch.Tensor | None = None
        self._seed_collab = self._retriever_seed_vectors()

    # --- building -------------------------------------------------------------------------------
    @property
    def num_seed(self) -> int:
        return len(self.seed_texts)

    def is_cold(self, row: int) -> bool:
        """Whether ``row`` has no collaborative vector of its own: an item added after the seed catalog
        whose client gave no ``features`` (the retriever reads :data:`RETRIEVER_COLD_RULE`'s stand-in)."""
        return row >= self.num_seed and row not in self.client_features

    def _retriever_seed_vectors(self) -> torch.Tensor | None:
        if self.retriever is None:
            return None
        return self.retriever.item_vectors[: self.num_seed].clone()

    def load(self) -> None:
        """Read the whole catalog from the store and (re)build every per-row cache."""
        with self.lock:
            version, items = self.store.catalog_changes(0)
            self.item_ids = [it.item_id for it in items]
            self.row_of = {it.item_id: it.row for it in items}
            self.texts = [it.text for it in items]
            self.live = np.array([not it.deleted for it in items], dtype=bool)
            self.client_features = {it.row: it.features for it in items if it.features is not None}
            # The disk caches hold the seed catalog (stable across starts); rows changed since are redone here.
            changed = [r for r in range(len(items)) if not self._is_original(r)]
            self.text_vectors = torch.zeros(len(items), self._seed_text_vectors().shape[1])
            self.text_vectors[: self.num_seed] = self._seed_text_vectors()
            if changed:
                self.text_vectors[changed] = self.encode_texts([self.texts[r] for r in changed]).float()
            for name, student in self.students.items():
                student.features = self._student_rows(student, list(range(len(items))))
                self._load_token_cache(name, student)
                derived = sorted(set(changed) | set(self.client_features))
                if derived:
                    student.ranker.token_cache.put(derived, ItemTokenCache.encode(model=student.ranker.model,
                                                                                  features=student.features[derived]))
            for teacher in self.teachers.values():
                teacher.catalog.texts = self.texts
            if self.retriever is not None:
                new = [r for r in range(len(items)) if r >= self.num_seed or r in self.client_features]
                if new:
                    self.retriever.set_rows(new, self._retriever_rows(new))
            self.version = version

    def _seed_text_vectors(self) -> torch.Tensor:
        """(N0, 384) MiniLM vectors of the seed texts, cached in memory and on disk by their hash."""
        if self._seed_vectors is None:
            self._seed_vectors = self._text_vectors(self.seed_texts)
        return self._seed_vectors

    def _text_vectors(self, texts: list[str]) -> torch.Tensor:
        """MiniLM vectors of ``texts``, cached on disk by a hash of the texts."""
        digest = hashlib.sha256("\x1f".join(texts).encode()).hexdigest()[:24]
        path = None if self.cache_dir is None else self.cache_dir / f"text_vectors-{digest}.pt"
        if path is not None and path.is_file():
            return torch.load(path, weights_only=True)
        vectors = self.encode_texts(texts)
        if path is not None:
            with atomic_write(path) as tmp:  # replicas may write it at once: each into its own temp file
                torch.save(vectors, tmp)
        return vectors

    def _is_original(self, row: int) -> bool:
        """A seed item with its seed text: its stored feature rows are exact."""
        return row < self.num_seed and self.texts[row] == self.seed_texts[row]

    def _load_token_cache(self, name: str, student: StudentItems) -> None:
        """The seed catalog's tokens (a file keyed by checkpoint + seed features), rows past it empty
        until written: :meth:`load` writes the rows that differ from the seed."""
        model = student.ranker.model
        key = cache_key(self.checkpoints.get(name, Path(".")), student.seed_features)
        device = next(model.parameters()).device
        path = None if self.cache_dir is None else self.cache_dir / f"{name}-{key[:24]}.safetensors"
        cache = None if path is None else ItemTokenCache.load(path, key, device)
        if cache is None:
            cache = ItemTokenCache.build(model, features=student.seed_features)
            if path is not None:
                cache.save(path, key)
                log.info("built the item token cache of %s: %d rows -> %s", name, cache.num_rows, path)
        student.ranker.token_cache = cache

    # --- per-row features -----------------------------------------------------------------------
    def _student_rows(self, student: StudentItems, rows: list[int]) -> torch.Tensor:
        """(n, F) what ``student`` reads for catalog ``rows``: the stored rows for original seed
        items, :meth:`_derive` for the others."""
        out = student.seed_features.new_zeros(len(rows), student.seed_features.shape[1])
        derived = [i for i, r in enumerate(rows) if not self._is_original(r) or r in self.client_features]
        original = sorted(set(range(len(rows))) - set(derived))
        if original:
            out[original] = student.seed_features[[rows[i] for i in original]]
        if derived:
            derived_rows = [rows[i] for i in derived]
            out[derived] = self._derive(student, self.text_vectors[derived_rows], derived_rows)
        return out

    def document_features(self, student: StudentItems, texts: list[str]) -> torch.Tensor:
        """(n, F) feature rows of texts the catalog does not hold (``/v1/rerank`` documents)."""
        return self._derive(student, self.encode_texts(texts), [None] * len(texts))

    def _collab(self, seed_table: torch.Tensor, vectors: torch.Tensor, rows: list[int | None], client_ok: bool,
                cold: str) -> torch.Tensor:
        """(n, c) collaborative vectors in the space of ``seed_table`` (N0, c): the client's vector
        (when ``client_ok``), else the seed item's own (its interactions do not change with its
        text), else the ``cold`` rule: "zeros", or "neighbours" (the mean over the seed items with
        the most similar texts)."""
        if cold == "zeros":
            out = torch.zeros(len(vectors), seed_table.shape[1])
        else:
            out = neighbour_mean(vectors, self.text_vectors[: self.num_seed], seed_table)
        for i, row in enumerate(rows):
            given = None if row is None else self.client_features.get(row)
            if given is not None and client_ok:
                out[i] = torch.as_tensor(given, dtype=torch.float32)
            elif row is not None and row < self.num_seed:
                out[i] = seed_table[row]
        return out

    def _derive(self, student: StudentItems, vectors: torch.Tensor, rows: list[int | None]) -> torch.Tensor:
        """(n, F) feature rows: MiniLM ``vectors`` in the text columns, :meth:`_collab` in the
        collaborative ones. ``rows``: the catalog rows (None for texts outside the catalog)."""
        other = [p for p in student.layout.names if p not in (TEXT_PART, COLLAB_PART)]
        if other:
            raise DataError(f"the student reads item features {other}; the service derives features only for "
                            f"'{TEXT_PART}' and '{COLLAB_PART}'")
        out = torch.zeros(len(vectors), student.seed_features.shape[1])
        text, collab = student.part(TEXT_PART), student.part(COLLAB_PART)
        if text is not None:
            out[:, text] = vectors.float()
        if collab is not None:
            out[:, collab] = self._collab(student.seed_features[:, collab], vectors, rows, self.same_space(student), COLD_RULE)
        return out

    def same_space(self, student: StudentItems) -> bool:
        """Whether the student's collaborative columns are the retriever's item vectors (then a
        client's collaborative vector means the same thing to both)."""
        if student.same_space is None:
            collab = student.part(COLLAB_PART)
            student.same_space = (
                collab is not None and self._seed_collab is not None
                and self._seed_collab.shape[1] == collab.stop - collab.start
                and bool(torch.allclose(student.seed_features[:, collab], self._seed_collab, atol=SAME_SPACE_ATOL))
            )  # fmt: skip
        return student.same_space

    def _retriever_rows(self, rows: list[int]) -> torch.Tensor:
        return self._collab(self._seed_collab, self.text_vectors[rows], rows, client_ok=True, cold=RETRIEVER_COLD_RULE)

    @property
    def collab_width(self) -> int | None:
        return None if self._seed_collab is None else int(self._seed_collab.shape[1])

    # --- reads ----------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Apply the changes other replicas made to the store since this replica last looked."""
        if self.store.catalog_version() == self.version:
            return
        with self.lock:
            version, changed = self.store.catalog_changes(self.version)  # one snapshot: no write slips between
            if changed:
                self._apply(changed)
            self.version = max(self.version, version)

    def rows(self, item_ids: Sequence[str], field: str) -> list[int]:
        """Rows of live items; NotFound naming ``field[i]`` and the id otherwise."""
        out = []
        for i, item_id in enumerate(item_ids):
            row = self.row_of.get(item_id)
            if row is None or not self.live[row]:
                raise NotFound(f"{field}[{i}]: unknown item id {item_id!r}", field=f"{field}[{i}]", value=item_id)
            out.append(row)
        return out

    def item(self, item_id: str) -> Item:
        item = self.store.get_item(item_id)
        if item is None:
            raise NotFound(f"item_id: unknown item id {item_id!r}", field="item_id", value=item_id)
        return item

    # --- writes ---------------------------------------------------------------------------------
    def upsert(self, item_id: str, text: str, features: Sequence[float] | None = None) -> tuple[Item, bool]:
        """Store the item (durably), then compute its tokens once and write them into every cache."""
        vector = None
        if features is not None:
            width = self.collab_width
            if width is None:
                raise Invalid("features: this service has no collaborative model to read them", field="features")
            if len(features) != width:
                raise Invalid(f"features: expected {width} numbers (the SASRec vector), got {len(features)}",
                              field="features", value=len(features), limit=width)
            vector = np.asarray(features, dtype=np.float32)
        with self.lock:
            item, created = self.store.upsert_item(item_id, text, vector)
            self._apply([item])
            self.version = max(self.version, item.version)
        return item, created

    def delete(self, item_id: str) -> Item:
        with self.lock:
            item = self.store.delete_item(item_id)
            if item is None:
                raise NotFound(f"item_id: unknown item id {item_id!r}", field="item_id", value=item_id)
            self._apply([item])
            self.version = max(self.version, item.version)
        return item

    def _apply(self, items: list[Item]) -> None:
        """Bring every cache in line with these (changed) store items."""
        grow = max(it.row for it in items) + 1 - len(self.item_ids)
        if grow > 0:
            self.item_ids += [""] * grow
            self.texts += [""] * grow
            self.live = np.concatenate([self.live, np.zeros(grow, dtype=bool)])
        rows = [it.row for it in items]
        for it in items:
            self.item_ids[it.row], self.texts[it.row], self.live[it.row] = it.item_id, it.text, not it.deleted
            self.row_of[it.item_id] = it.row
            if it.features is not None:
                self.client_features[it.row] = it.features
            else:
                self.client_features.pop(it.row, None)
        self.text_vectors = _grown(self.text_vectors, len(self.item_ids))
        self.text_vectors[rows] = self.encode_texts([it.text for it in items]).float()
        for student in self.students.values():
            new_rows = self._student_rows(student, rows)
            student.features = _grown(student.features, len(self.item_ids))
            student.features[rows] = new_rows
            tokens = ItemTokenCache.encode(student.ranker.model, features=new_rows)
            student.ranker.token_cache.put(rows, tokens)
        for teacher in self.teachers.values():
            teacher.catalog.texts = self.texts
        if self.retriever is not None:
            self.retriever.set_rows(rows, self._retriever_rows(rows))


def _grown(table: torch.Tensor, rows: int) -> torch.Tensor:
    """``table`` with zero rows appended up to ``rows`` (itself when it is long enough)."""
    if table.shape[0] >= rows:
        return table
    return torch.cat([table, table.new_zeros(rows - table.shape[0], *table.shape[1:])])
