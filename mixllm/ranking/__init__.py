"""Ranking core: score every candidate of a request in one forward of the language model.

A request is one user's history and C candidate items. The sequence is laid out as

    prefix (instruction + history) | cand_1 | cand_2 | ... | cand_C | padding

and a 4D additive block mask lets each candidate segment attend to the prefix and to itself only
(causally inside the prefix and inside each segment). Every segment's position ids continue from
the prefix length P, so each candidate is read exactly as if it were the only one after the prefix:
a request costs ``P + sum(segment lengths)`` tokens instead of ``C * (P + segment length)``, and
the scores do not depend on the candidates' order.

Two ways to read the items, one template:

* **teacher** (``mode="teacher"``): every history item and candidate is its text
  (:attr:`RankingTemplate.text_item`, about 16 SmolLM2 tokens per MovieLens item);
* **student** (``mode="student"``): every item is the ``<item>`` placeholder, which the processor
  expands to ``tokens_per_item`` copies and the model fills with the item encoder + projector's
  output (one token per item by default). A placeholder is its own delimiter, so the student
  writes no separator around it.

Typical use::

    ranker = MixLLMRanker(model, processor, ItemCatalog(features=item_vectors), mode="student")
    scores = ranker.score([RankingRequest(history=[3, 17, 5], candidates=[8, 2, 40])])  # [(3,)]

    inputs = ranker.prepare(requests)      # batch of requests -> RankingInputs
    scores = ranker(inputs)                # (B, C_max); inputs.candidate_mask marks real ones

Requests in a batch may have different histories and candidate counts: rows are right-padded to
the longest request, padded positions are masked out (they attend only to themselves), padded
candidate slots score 0 and are False in ``candidate_mask``.

User tokens (User-LLM): when the student's model has the user modality (``MixLLMConfig.user``),
the prefix also carries the user's ``<user>`` placeholder (:attr:`RankingTemplate.user`, before the
history items), which the processor expands to m tokens filled by the user encoder + projector.
The user encoder reads a longer window than the item tokens: of a request's history, the last
``max_history`` (H) items become item tokens and the last ``UserConfig.max_history`` items are
read, as rows of :attr:`ItemCatalog.user_item_features`, by the user encoder; a request may hold
up to :attr:`MixLLMRanker.max_request_history` items. Every candidate sees the user tokens: they
are in the prefix. The teacher has none.

Score fusion (``fusion=True``): the final score is ``score + fusion_gate * retriever_score``, with
the retriever's candidate scores (e.g. SASRec's) given per request
(:attr:`RankingRequest.retriever_scores`) and ``fusion_gate`` a learned scalar that starts at 0,
so a fused ranker starts exactly as the ranker alone.

Memory note: the mask is (B, 1, T, T) in the model's dtype, and eager attention materialises
(B, heads, T, T) weights per layer; a teacher request with H=10 and C=100 MovieLens items is
T ~ 1,900 tokens.
"""

from mixllm.ranking.batching import (
    RankingInputs,
    block_position_ids,
    build_block_mask,
    collate_prompts,
    pad_retriever_scores,
    segment_last_index,
)
from mixllm.ranking.prompts import RankingPrompt, RankingPromptBuilder, RankingTemplate
from mixllm.ranking.protocol import ProtocolRanker
from mixllm.ranking.ranker import (
    CATALOG_FEATURES_NAME,
    MODES,
    RANKER_CONFIG_NAME,
    RANKER_HEAD_NAME,
    SCORE_HEAD_RULE,
    SCORINGS,
    ItemCatalog,
    MixLLMRanker,
    RankingRequest,
)

__all__ = [
    "CATALOG_FEATURES_NAME",
    "MODES",
    "RANKER_CONFIG_NAME",
    "RANKER_HEAD_NAME",
    "SCORE_HEAD_RULE",
    "SCORINGS",
    "ItemCatalog",
    "MixLLMRanker",
    "ProtocolRanker",
    "RankingInputs",
    "RankingPrompt",
    "RankingPromptBuilder",
    "RankingRequest",
    "RankingTemplate",
    "block_position_ids",
    "build_block_mask",
    "collate_prompts",
    "pad_retriever_scores",
    "segment_last_index",
]
