"""The catalog's item tokens, projected once and kept on the serving device.

A student ranker reads every item as k tokens, ``projector(item_encoder(features, id))``. For one
checkpoint these tokens are constants per item, so the serving layer computes them once for the
whole catalog and keeps them as **one tensor** ``(rows, k, hidden)`` on the device that runs the
language model (bf16 on a GPU, the model's dtype on a CPU). A request then gathers its rows::

    cache = ItemTokenCache.build(model, features=catalog_features)   # (N, k, D), once
    ranker.token_cache = cache                                        # the ranker now reads rows
    ranker.score([RankingRequest(history=[3, 17], candidates=[8, 2])])  # encoder/projector never run

New items are encoded once (:meth:`ItemTokenCache.encode`) and written with :meth:`put`, which
grows the tensor geometrically, so appending n items costs O(n) amortised copies.

The cache file (:meth:`save` / :meth:`load`) is keyed by :func:`cache_key`, a hash of the
checkpoint's trained weights and of the catalog features, so a cache made by another checkpoint or
for another catalog is never used.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mixllm.errors import DataError
from mixllm.provenance import atomic_write

logger = logging.getLogger(__name__)


def cache_key(checkpoint: str | Path, features: torch.Tensor | None = None, ids: torch.Tensor | None = None) -> str:
    """sha256 over the checkpoint's weight/config files and the catalog's item inputs."""
    digest = hashlib.sha256()
    root = Path(checkpoint)
    for path in sorted(root.glob("*.safetensors")) + sorted(root.glob("*.json")):
        if path.name == "training_run.json":  # provenance only; the same weights whatever it says
            continue
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    for tensor in (features, ids):
        if tensor is not None:
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class ItemTokenCache:
    """Projected item tokens of a catalog: row r is item row r's (k, hidden) tokens.

    Args:
        tokens: (N, k, D) the tokens; the cache keeps (a view of) this tensor, on its device.
    """

    def __init__(self, tokens: torch.Tensor) -> None:
        if tokens.dim() != 3:
            raise ValueError(f"tokens must be (rows, k, hidden), got shape {tuple(tokens.shape)}")
        self._buffer = tokens
        self.num_rows = tokens.shape[0]

    @property
    def tokens(self) -> torch.Tensor:
        """(num_rows, k, D) the live rows."""
        return self._buffer[: self.num_rows]

    @property
    def device(self) -> torch.device:
        return self._buffer.device

    @property
    def dtype(self) -> torch.dtype:
        return self._buffer.dtype

    @staticmethod
    @torch.no_grad()
    def encode(model, features: torch.Tensor | None = None, ids: torch.Tensor | None = None,
               batch_size: int = 1024) -> torch.Tensor:
        """(N, k, D) tokens of N items: the model's item encoder + projector, in batches, on the
        model's device and in its dtype."""
        param = next(model.projectors["item"].parameters())
        count = features.shape[0] if features is not None else len(ids)
        out = []
        for start in range(0, count, batch_size):
            part = slice(start, start + batch_size)
            f = None if features is None else features[part].to(param.device, param.dtype)
            i = None if ids is None else torch.as_tensor(ids[part], dtype=torch.long, device=param.device)
            out.append(model.get_item_features(f, i))
        if not out:
            k, hidden = model.config.item.tokens_per_item, model.language_model.config.get_text_config().hidden_size
            return torch.empty(0, k, hidden, device=param.device, dtype=param.dtype)
        return torch.cat(out)

    @classmethod
    def build(cls, model, features: torch.Tensor | None = None, ids: torch.Tensor | None = None,
              batch_size: int = 1024) -> ItemTokenCache:
        """Encode a whole catalog (row i = ``features[i]`` / ``ids[i]``)."""
        return cls(cls.encode(model, features, ids, batch_size))

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """(n, k, D) tokens of ``rows`` (n,), on the cache's device."""
        return self._buffer[rows.to(self._buffer.device)]

    def put(self, rows: torch.Tensor | list[int], tokens: torch.Tensor) -> None:
        """Write ``tokens`` (n, k, D) at ``rows`` (n,); rows past the end grow the cache (rows in
        between, if any, hold zeros until written)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        if tokens.shape[1:] != self._buffer.shape[1:] or len(rows) != tokens.shape[0]:
            raise ValueError(f"tokens {tuple(tokens.shape)} do not fit rows {tuple(rows.shape)} of a cache of "
                             f"{tuple(self._buffer.shape[1:])} tokens")
        if len(rows) == 0:
            return
        if int(rows.min()) < 0:
            raise ValueError(f"row {int(rows.min())} is negative")
        needed = int(rows.max()) + 1
        if needed > self._buffer.shape[0]:
            capacity = max(needed, 2 * self._buffer.shape[0], 16)
            grown = torch.zeros(capacity, *self._buffer.shape[1:], dtype=self.dtype, device=self.device)
            grown[: self.num_rows] = self._buffer[: self.num_rows]
            self._buffer = grown
        self._buffer[rows.to(self.device)] = tokens.to(self.device, self.dtype)
        self.num_rows = max(self.num_rows, needed)

    def save(self, path: str | Path, key: str) -> Path:
        """Write the live rows and ``key`` (atomically: a temp file renamed into place)."""
        path = Path(path)
        with atomic_write(path) as tmp:
            save_file({"tokens": self.tokens.detach().cpu().contiguous()}, str(tmp), metadata={"key": key})
        return path

    @classmethod
    def load(cls, path: str | Path, key: str, device: torch.device | str = "cpu",
             dtype: torch.dtype | None = None) -> ItemTokenCache | None:
        """The cache at ``path`` if it was saved with ``key``; None if missing, stale or unreadable."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                stored_key = (handle.metadata() or {}).get("key")
            if stored_key != key:
                logger.info("item token cache %s was made for another checkpoint or catalog; rebuilding", path)
                return None
            tokens = load_file(str(path))["tokens"]
        except (OSError, KeyError, ValueError, RuntimeError, SafetensorError) as error:  # a torn or foreign file: rebuild
            logger.warning("item token cache %s is unreadable (%s); rebuilding", path, error)
            return None
        return cls(tokens.to(device, dtype or tokens.dtype))

    def check_rows(self, rows: list[int], what: str) -> list[int]:
        """``rows`` if every one is in the cache, else DataError naming the first that is not."""
        bad = [r for r in rows if not 0 <= r < self.num_rows]
        if bad:
            raise DataError(f"{what}: item row {bad[0]} is not in the item token cache (rows 0..{self.num_rows - 1})")
        return rows
