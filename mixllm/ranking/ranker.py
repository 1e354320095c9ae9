"""The ranker: requests (:class:`RankingRequest`) over an :class:`ItemCatalog`, scored by
:class:`MixLLMRanker` in one forward per batch, and its checkpoints (``ranker_config.json``,
``ranker_head.safetensors``, ``catalog_features.safetensors``)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mixllm.data.split import PAD
from mixllm.errors import DataError
from mixllm.item_cache import ItemTokenCache
from mixllm.modeling import MixLLMForCausalLM
from mixllm.ranking.batching import RankingInputs, collate_prompts
from mixllm.ranking.prompts import RankingPrompt, RankingPromptBuilder, RankingTemplate

logger = logging.getLogger(__name__)

RANKER_CONFIG_NAME = "ranker_config.json"
RANKER_HEAD_NAME = "ranker_head.safetensors"
CATALOG_FEATURES_NAME = "catalog_features.safetensors"
MODES = ("teacher", "student")
SCORE_HEAD_RULE = (
    "the score head has no bias: listwise losses are invariant to a shift shared by all candidates, "
    "so a bias gets zero gradient; a stored bias is dropped on load (rankings and softmax scores unchanged)"
)
SCORINGS = ("head", "answer_token")


def _request_retriever_scores(request: RankingRequest, index: int) -> torch.Tensor | None:
    """(C,) float32 ``request.retriever_scores`` checked: one per candidate, all finite (``gate * inf``
    would poison the score even with the gate at 0); None when the request has none."""
    if request.retriever_scores is None:
        return None
    row = torch.as_tensor(request.retriever_scores, dtype=torch.float32).reshape(-1)
    if row.shape[0] != len(request.candidates):
        raise DataError(
            f"request {index}: {row.shape[0]} retriever_scores for {len(request.candidates)} candidates; give one per candidate"
        )
    if not bool(torch.isfinite(row).all()):
        raise DataError(f"request {index}: retriever_scores hold a non-finite value: {row.tolist()}")
    return row


@dataclass
class RankingRequest:
    """One user's history (oldest first) and the candidates to score, as catalog item indices."""

    history: Sequence[int]
    candidates: Sequence[int]
    retriever_scores: Sequence[float] | None = None
    """One score per candidate from the retriever that proposed them (e.g. SASRec's dot products),
    for a ranker with score fusion; None for every other ranker."""

    @classmethod
    def from_padded(cls, history_row, candidates, max_history: int | None = None) -> RankingRequest:
        """The request of one row of a padded history batch: ``history_row`` is ``(H,)`` item indices
        left-padded with ``PAD`` (-1), most recent last (``RankingBatch.history``,
        ``LeaveOneOutSplit.histories``); PAD entries are dropped and only the ``max_history`` most
        recent real items kept (None: all). The one way a padded history becomes a request."""
        history = [int(i) for i in history_row if int(i) != PAD]
        if max_history is not None:
            history = history[-max_history:] if max_history > 0 else []
        return cls(history=history, candidates=[int(i) for i in candidates])


@dataclass
class ItemCatalog:
    """What the ranker knows about each item; item index i is row i.

    The teacher needs ``texts``; the student needs ``features`` when its item encoder reads
    precomputed vectors (``ItemConfig.feature_dim > 0``) and passes the indices themselves to the
    id embedding when it has one (``ItemConfig.num_items > 0``). A student whose model has the
    user modality reads each history item's row of :attr:`user_item_features` too.
    """

    texts: Sequence[str] | None = None
    """Item texts (e.g. ``InteractionDataset.item_texts``)."""
    features: torch.Tensor | None = None
    """(N, F) precomputed item vectors (e.g. MiniLM embeddings of the texts)."""
    user_features: torch.Tensor | None = None
    """(N, F_user) the vectors the user encoder reads per history item (``UserConfig.item_dim``
    wide), when they differ from ``features`` (e.g. SASRec item embeddings for the user, MiniLM for
    the item tokens); None = ``features`` (see :attr:`user_item_features`)."""

    def __post_init__(self) -> None:
        if self.texts is None and self.features is None and self.user_features is None:
            raise DataError("ItemCatalog needs texts and/or features")
        for name in ("features", "user_features"):
            value = getattr(self, name)
            if value is not None:
                value = torch.as_tensor(value)
                setattr(self, name, value)
                if value.dim() != 2:
                    raise DataError(f"ItemCatalog.{name} must be (num_items, dim), got shape {tuple(value.shape)}")
        if self.texts is not None and self.features is not None and len(self.texts) != self.features.shape[0]:
            raise DataError(f"ItemCatalog has {len(self.texts)} texts but {self.features.shape[0]} feature rows")
        if self.user_features is not None and self.user_features.shape[0] != self.num_items:
            raise DataError(f"ItemCatalog has {self.num_items} items but {self.user_features.shape[0]} user_features rows")

    @property
    def num_items(self) -> int:
        if self.texts is not None:
            return len(self.texts)
        return int((self.features if self.features is not None else self.user_features).shape[0])

    @property
    def user_item_features(self) -> torch.Tensor | None:
        """(N, F_user) what the user encoder reads per item: ``user_features``, else ``features``."""
        return self.user_features if self.user_features is not None else self.features

    def check(self, ids: Sequence[int], what: str) -> list[int]:
        """``ids`` as a list of ints, or DataError naming the first id outside the catalog."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.num_items]
        if bad:
            raise DataError(f"{what}: item id {bad[0]} is not in the catalog (ids 0..{self.num_items - 1})")
        return ids


class MixLLMRanker(nn.Module):
    """Scores a request's candidates in one forward of a :class:`MixLLMForCausalLM`.

    Args:
        model: the fused model; the student needs its item modality, the teacher reads text only.
        processor: the model's :class:`~mixllm.processor.MixLLMProcessor`.
        catalog: item texts (teacher) and/or features (student).
        mode: "teacher" (items as text) or "student" (items as ``<item>`` tokens).
        template: how requests become text (shared by both modes).
        scoring: "head" (default) or "answer_token".

            * "head": a ``nn.Linear(hidden, 1, bias=False)`` on the final hidden state of each
              candidate segment's last token — the one token that has seen the prefix and its own
              candidate and nothing else. It gives an unbounded scalar per candidate, which is what
              listwise training over candidate lists (softmax / KL against the teacher's
              distribution) needs, it is trained with the item projector while the LLM stays
              frozen, and it needs no question text per candidate. It has **no bias**: every loss
              in mixllm is listwise (a softmax over one request's candidates), and softmax(s + b)
              = softmax(s), so a bias shared by all candidates has exactly zero gradient and would
              never train; scores are therefore meaningful only relative to the other candidates
              of the same request (see :data:`SCORE_HEAD_RULE`).
            * "answer_token": the LM head's logit of ``answer_token`` (e.g. "Yes") at that same
              token; zero new parameters, usable zero-shot, but reads best with a question in
              ``template.segment``, which every candidate pays for. Only the C gathered positions
              go through the LM head.
        answer_token: the text of the answer token; must tokenize to exactly one token.
        max_history: H, the most recent history items read as item tokens (the H the ranker was
            trained with); None = every history item, limited only by the model's positions. A
            student whose model has the user modality also feeds the last
            :attr:`user_max_history` items to the user encoder, so a request may hold up to
            :attr:`max_request_history` items.
        fusion: add a learned scalar :attr:`fusion_gate` (0 at init) times the candidates'
            retriever scores to the scores, so a trained ranker can lean on the retriever that
            proposed the candidates; starting at 0, it begins exactly as the ranker alone.
    """

    def __init__(
        self,
        model: MixLLMForCausalLM,
        processor,
        catalog: ItemCatalog,
        mode: str = "student",
        template: RankingTemplate | None = None,
        scoring: str = "head",
        answer_token: str = "Yes",
        max_history: int | None = None,
        fusion: bool = False,
    ):
        super().__init__()
        if max_history is not None and max_history < 1:
            raise ValueError(f"max_history must be >= 1 or None, got {max_history!r}")
        self.max_history = max_history
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
        self.model = model
        self.processor = processor
        self.catalog = catalog
        self.mode = mode
        self.scoring = scoring
        self.answer_token = answer_token
        self.prompts = RankingPromptBuilder(processor, template)
        self._check_catalog()
        text_config = model.language_model.config.get_text_config()
        self.max_positions: int | None = getattr(text_config, "max_position_embeddings", None)
        dtype = next(model.language_model.parameters()).dtype
        self.score_head = nn.Linear(text_config.hidden_size, 1, bias=False).to(dtype) if scoring == "head" else None
        self.token_cache: ItemTokenCache | None = None
        """Student only: when set, requests name rows of this cache (the catalog's projected item
        tokens, :mod:`mixllm.item_cache`) and the item encoder and projector never run."""
        self.answer_token_id: int | None = None
        if scoring == "answer_token":
            ids = processor.tokenizer(answer_token, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ValueError(f"answer_token {answer_token!r} is {len(ids)} tokens; it must be exactly one")
            self.answer_token_id = ids[0]
        # A float32 scalar whatever the model's dtype: bf16 keeps ~3 digits, and small steps of a
        # slowly learned gate would round away. Fused scores are float32 for the same reason.
        self.fusion_gate: nn.Parameter | None = nn.Parameter(torch.zeros((), dtype=torch.float32)) if fusion else None
        """Fusion only: final score = ranker score + ``fusion_gate`` * retriever score."""

    @property
    def user_max_history(self) -> int:
        """How many of a request's most recent history items the user encoder reads
        (``UserConfig.max_history``); 0 when the prompt has no user tokens (a teacher, or a model
        without the user modality)."""
        user = self.model.config.user
        return user.max_history if self.mode == "student" and user is not None else 0

    @property
    def max_request_history(self) -> int | None:
        """The longest history a request may hold: H (``max_history``) item tokens or the user
        encoder's :attr:`user_max_history`, whichever is longer; None when ``max_history`` is
        None (every history item becomes a token)."""
        return None if self.max_history is None else max(self.max_history, self.user_max_history)

    def _check_catalog(self) -> None:
        if self.mode == "teacher":
            if self.catalog.texts is None:
                raise DataError("the teacher reads item texts: give ItemCatalog(texts=...)")
            return
        if "item" not in self.model.encoders:
            raise DataError("the student needs a model with the item modality (MixLLMConfig.item)")
        item = self.model.config.item
        if item.feature_dim > 0:
            if self.catalog.features is None:
                raise DataError(f"the item encoder reads {item.feature_dim}-wide features: give ItemCatalog(features=...)")
            if self.catalog.features.shape[1] != item.feature_dim:
                raise DataError(
                    f"ItemCatalog.features have width {self.catalog.features.shape[1]} but the item encoder "
                    f"expects {item.feature_dim}"
                )
        if item.num_items > 0 and self.catalog.num_items > item.num_items:
            raise DataError(
                f"the catalog has {self.catalog.num_items} items but the id embedding holds {item.num_items}"
            )
        user, table = self.model.config.user, self.catalog.user_item_features
        if user is None:
            if self.catalog.user_features is not None:
                raise DataError(
                    f"ItemCatalog.user_features ({self.catalog.user_features.shape[1]} wide) were given but the model has "
                    "no user modality (MixLLMConfig.user), so no user encoder would read them"
                )
            return
        if table is None:
            raise DataError(
                f"the user encoder reads {user.item_dim}-wide item vectors: give ItemCatalog(user_features=...) or features"
            )
        if table.shape[1] != user.item_dim:
            name = "user_features" if self.catalog.user_features is not None else "features (read as user_features)"
            raise DataError(
                f"ItemCatalog.{name} have width {table.shape[1]} but the user encoder expects {user.item_dim} "
                "(UserConfig.item_dim)"
            )

    # --- requests -> inputs ----------------------------------------------------------------------
    def build_prompt(self, request: RankingRequest, index: int = 0) -> RankingPrompt:
        """Tokenize one request (``index`` only names it in error messages).

        The last ``max_history`` (H) history items become item tokens; with user tokens, the last
        :attr:`user_max_history` items are read by the user encoder, from the catalog's
        :attr:`ItemCatalog.user_item_features` (with a token cache too, so those items must be
        catalog rows). A request with no history gets no user tokens."""
        if len(request.candidates) == 0:
            raise DataError(f"request {index}: the candidate list is empty")
        retriever_scores = _request_retriever_scores(request, index)
        limit = self.max_request_history
        if limit is not None and len(request.history) > limit:
            limits = "max_history"
            if self.user_max_history:
                limits = (
                    f"max_history {self.max_history} as item tokens, "
                    f"user.max_history {self.user_max_history} for the user encoder"
                )
            raise DataError(
                f"request {index}: the history has {len(request.history)} items but this ranker reads at most "
                f"{limit} ({limits}); pass the {limit} most recent"
            )
        history_ids = [int(i) for i in request.history]
        item_history = history_ids if self.max_history is None else history_ids[-self.max_history :]
        user_history = history_ids[-self.user_max_history :] if self.user_max_history else []
        cached = self.mode == "student" and self.token_cache is not None
        check = self.token_cache.check_rows if cached else self.catalog.check
        history = check(item_history, f"request {index} history")
        candidates = check([int(i) for i in request.candidates], f"request {index} candidates")
        user = self._user_history(self.catalog.check(user_history, f"request {index} history"))
        try:
            if cached:  # placeholders carry cache rows; forward gathers their tokens
                prompt = self.prompts.student(history_ids=history, candidate_ids=candidates, user_history=user)
            elif self.mode == "teacher":
                texts = self.catalog.texts
                prompt = self.prompts.teacher([texts[i] for i in history], [texts[i] for i in candidates])
            else:
                prompt = self.prompts.student(**self._item_inputs(history, candidates), user_history=user)
        except DataError as err:
            raise DataError(f"request {index}: {err}") from None
        longest = prompt.prefix_len + max(prompt.segment_lens)
        if self.max_positions is not None and longest > self.max_positions:
            raise DataError(
                f"request {index}: the prefix ({prompt.prefix_len} tokens, {len(history)} history items) plus the "
                f"longest candidate ({max(prompt.segment_lens)} tokens) needs {longest} positions but the model "
                f"allows {self.max_positions}; shorten the history"
            )
        prompt.retriever_scores = retriever_scores
        return prompt

    def _item_inputs(self, history: list[int], candidates: list[int]) -> dict[str, Any]:
        item = self.model.config.item
        out: dict[str, Any] = {}
        if item.feature_dim > 0:
            out["history_features"] = self.catalog.features[history]  # (H, F)
            out["candidate_features"] = self.catalog.features[candidates]  # (C, F)
        if item.num_items > 0:
            out["history_ids"], out["candidate_ids"] = history, candidates
        return out

    def _user_history(self, history: list[int]) -> torch.Tensor | None:
        """(L, F_user) the user encoder's vectors of ``history`` (oldest first), None when empty."""
        return self.catalog.user_item_features[history] if history else None

    def prepare(self, requests: Sequence[RankingRequest]) -> RankingInputs:
        """Tokenize and pad a batch of requests (on the CPU; call ``.to(device)`` as needed); the
        requests' ``retriever_scores``, if any, travel in their prompts to ``RankingInputs.retriever_scores``."""
        if not requests:
            raise DataError("requests: the batch is empty")
        return self.collate([self.build_prompt(r, i) for i, r in enumerate(requests)])

    def collate(self, prompts: Sequence[RankingPrompt]) -> RankingInputs:
        """Pad tokenized prompts (:meth:`build_prompt`, or the prompt builder's own) into a batch in
        the model's dtype (on the CPU; call ``.to(device)`` as needed)."""
        return collate_prompts(prompts, self.processor.pad_token_id, self._dtype)

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.model.language_model.parameters()).dtype

    @property
    def _device(self) -> torch.device:
        return next(self.model.language_model.parameters()).device

    # --- scoring ---------------------------------------------------------------------------------
    def gather_item_tokens(self, inputs: RankingInputs) -> torch.Tensor | None:
        """(N, k, D) the cached tokens of ``inputs``' items (a student with ``token_cache``), else None."""
        if self.mode == "student" and self.token_cache is not None and inputs.item_ids is not None:
            return self.token_cache.gather(inputs.item_ids)  # rows of the catalog's tokens
        return None

    def forward(self, inputs: RankingInputs, item_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C_max) scores; padded candidate slots hold 0 (see ``inputs.candidate_mask``).

        ``item_embeds``: the items' tokens gathered beforehand (:meth:`gather_item_tokens`), so a
        caller can read a cache that others write under its own lock and run the forward outside it.

        With fusion the scores are float32 ``score + fusion_gate * inputs.retriever_scores``.

        Raises:
            DataError: a fused ranker got no ``retriever_scores`` or ones of another shape, or a
                ranker without fusion got some (it would ignore them, so it refuses them).
        """
        self._check_retriever_scores(inputs)
        if item_embeds is None:
            item_embeds = self.gather_item_tokens(inputs)
        inputs_embeds = self.model.embed_inputs(
            inputs.input_ids, item_features=inputs.item_features, item_ids=inputs.item_ids, item_embeds=item_embeds,
            user_history=inputs.user_history, user_history_mask=inputs.user_history_mask,
        )  # (B, T, D)
        backbone = self.model.language_model.base_model  # the decoder stack, without the LM head
        hidden = backbone(
            inputs_embeds=inputs_embeds,
            attention_mask=inputs.attention_mask.to(inputs_embeds.dtype),  # (B, 1, T, T)
            position_ids=inputs.position_ids,  # (B, T)
            use_cache=False,
        ).last_hidden_state  # (B, T, D)
        index = inputs.score_index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])  # (B, C, D)
        last = hidden.gather(1, index)  # (B, C, D)
        if self.score_head is not None:
            scores = self.score_head(last).squeeze(-1)  # (B, C)
        else:
            lm_head = self.model.language_model.get_output_embeddings()
            scores = last @ lm_head.weight[self.answer_token_id]  # (B, C): one row of the LM head only
            if getattr(lm_head, "bias", None) is not None:
                scores = scores + lm_head.bias[self.answer_token_id]
        if self.fusion_gate is not None:
            retriever = inputs.retriever_scores.to(device=scores.device, dtype=torch.float32)  # (B, C)
            scores = scores + self.fusion_gate * retriever  # (B, C) float32
        return scores.masked_fill(~inputs.candidate_mask, 0.0)

    def unfused(self, fused: torch.Tensor, retriever_scores: torch.Tensor | Sequence[float]) -> torch.Tensor:
        """The ranker's own scores (fusion off) from its fused ``fused`` scores and the retriever scores
        they were fused with: ``fused - fusion_gate * retriever_scores``, without a second forward.
        A ranker without fusion returns ``fused`` as it is."""
        if self.fusion_gate is None:
            return fused
        retriever = torch.as_tensor(retriever_scores, dtype=torch.float32, device=fused.device)
        return fused - float(self.fusion_gate.detach()) * retriever

    def _check_retriever_scores(self, inputs: RankingInputs) -> None:
        given = inputs.retriever_scores
        if self.fusion_gate is None:
            if given is not None:
                raise DataError(
                    "retriever_scores: this ranker has no score fusion (built with fusion=False), so it would ignore "
                    "them; drop them or use a ranker built with fusion=True"
                )
            return
        if given is None:
            raise DataError(
                "retriever_scores: this ranker fuses the retriever's scores (fusion=True) but none were given; "
                "set RankingRequest.retriever_scores (one per candidate) or RankingInputs.retriever_scores (B, C)"
            )
        if tuple(given.shape) != tuple(inputs.candidate_mask.shape):
            raise DataError(
                f"retriever_scores: shape {tuple(given.shape)} but the batch has candidates of shape "
                f"{tuple(inputs.candidate_mask.shape)} (B, C_max)"
            )

    def score(self, requests: Sequence[RankingRequest]) -> list[torch.Tensor]:
        """One (C_i,) tensor of scores per request, in the request's candidate order."""
        inputs = self.prepare(requests).to(self._device)
        scores = self(inputs)
        return [row[mask] for row, mask in zip(scores, inputs.candidate_mask)]

    # --- checkpoints -----------------------------------------------------------------------------
    def ranker_config(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "scoring": self.scoring, "answer_token": self.answer_token,
            "template": asdict(self.prompts.template), "max_history": self.max_history,
            "fusion": self.fusion_gate is not None,
        }  # fmt: skip

    def save_pretrained(self, path: str | Path, provenance: dict[str, Any] | None = None) -> Path:
        """The model's checkpoint (``MixLLMForCausalLM.save_pretrained``) plus ``ranker_config.json``
        and ``ranker_head.safetensors`` (the score head's ``weight`` and, with fusion, the
        ``fusion_gate``); a student also stores its catalog's item features and user features
        (``catalog_features.safetensors``: ``features``, ``user_features`` when the catalog has its
        own), so it reloads without recomputing them."""
        path = self.model.save_pretrained(path, provenance=provenance)
        if self.mode == "student":
            tables = {name: getattr(self.catalog, name) for name in ("features", "user_features")}
            tables = {name: t.detach().float().contiguous().cpu() for name, t in tables.items() if t is not None}
            if tables:
                save_file(tables, str(path / CATALOG_FEATURES_NAME))
        (path / RANKER_CONFIG_NAME).write_text(json.dumps(self.ranker_config(), indent=2))
        head = {} if self.score_head is None else dict(self.score_head.state_dict())
        if self.fusion_gate is not None:
            head["fusion_gate"] = self.fusion_gate
        if head:
            save_file({k: v.detach().contiguous().cpu() for k, v in head.items()}, str(path / RANKER_HEAD_NAME))
        return path

    def load_score_head(self, path: str | Path) -> None:
        """Load ``ranker_head.safetensors`` from a checkpoint directory into this ranker's head and
        fusion gate.

        Checkpoints written before the head lost its bias store a ``bias`` too; it is dropped
        (:data:`SCORE_HEAD_RULE`): it added the same constant to every candidate, so every ranking
        and every listwise probability is unchanged, only raw scores shift by that constant."""
        if self.score_head is None and self.fusion_gate is None:
            raise ValueError("this ranker scores with the answer token; it has no score head")
        state = load_file(str(Path(path) / RANKER_HEAD_NAME))
        gate = state.pop("fusion_gate", None)
        if (gate is None) != (self.fusion_gate is None):
            raise DataError(
                f"{path}: {RANKER_HEAD_NAME} {'holds no' if gate is None else 'holds a'} fusion_gate but the ranker was "
                f"built with fusion={self.fusion_gate is not None}"
            )
        if gate is not None:
            with torch.no_grad():
                self.fusion_gate.copy_(gate.reshape(()))
        if self.score_head is None:
            return
        bias = state.pop("bias", None)
        if bias is not None:
            logger.info("%s: dropping the stored score-head bias %.4g (%s)", path, float(bias.flatten()[0]), SCORE_HEAD_RULE)
        self.score_head.load_state_dict(state)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, catalog: ItemCatalog | None = None, dtype: torch.dtype = torch.float32
    ) -> MixLLMRanker:
        """Load what :meth:`save_pretrained` wrote (the base LLM is loaded from its reference).

        ``catalog`` may be left out for a student that stored its item features; a teacher needs
        ``ItemCatalog(texts=...)``. Stored features (and user features) fill in a catalog given
        without them."""
        from mixllm.loading import from_pretrained

        path = Path(path)
        config_file = path / RANKER_CONFIG_NAME
        if not config_file.is_file():
            raise DataError(f"{path} is not a ranker checkpoint: {RANKER_CONFIG_NAME} is missing")
        stored_file = path / CATALOG_FEATURES_NAME
        stored = load_file(str(stored_file)) if stored_file.is_file() else {}
        given = {} if catalog is None else {"features": catalog.features, "user_features": catalog.user_features}
        missing = [name for name in stored if given.get(name) is None]
        if missing:
            tables = {**stored, **{name: t for name, t in given.items() if t is not None}}
            catalog = ItemCatalog(texts=None if catalog is None else catalog.texts, **tables)
        if catalog is None:
            raise DataError(f"{path} stores no item features: give ItemCatalog(texts=...) (and features for a student)")
        meta = json.loads(config_file.read_text())
        max_history = meta.get("max_history")
        run_info = path / "training_run.json"
        if max_history is None and run_info.is_file():  # checkpoints written before max_history was stored
            max_history = json.loads(run_info.read_text()).get("recipe", {}).get("history_length")
        model, processor = from_pretrained(path, dtype=dtype)
        ranker = cls(
            model, processor, catalog, mode=meta["mode"], template=RankingTemplate(**meta["template"]),
            scoring=meta["scoring"], answer_token=meta["answer_token"], max_history=max_history,
            fusion=meta.get("fusion", False),
        )  # fmt: skip
        if ranker.score_head is not None or ranker.fusion_gate is not None:
            ranker.load_score_head(path)
        return ranker.eval()

