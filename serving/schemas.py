"""Request and response bodies (pydantic), with bounds. Ids are strings; JSON numbers are accepted
and read as their decimal text (MovieLens ids are numbers: ``1`` and ``"1"`` name the same item)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Discriminator, Field, StringConstraints, Tag, model_validator

HARD_LIST_LIMIT = 100_000  # a schema bound far above every setting; the settings' limits apply in the services
Id = Annotated[str, StringConstraints(min_length=1, max_length=256, strip_whitespace=True)]


class _Model(BaseModel):
    model_config = ConfigDict(coerce_numbers_to_str=True, extra="forbid")


class UserRef(_Model):
    """A known user (``id``: the service reads their events) or an anonymous one (``history``)."""

    id: Id | None = None
    history: list[Id] | None = Field(None, max_length=HARD_LIST_LIMIT, description="item ids, oldest first")

    @model_validator(mode="after")
    def _one_of(self) -> UserRef:
        if (self.id is None) == (self.history is None):
            raise ValueError("give exactly one of user.id and user.history")
        return self


class RankRequest(_Model):
    user: UserRef
    candidates: list[Id] = Field(..., max_length=HARD_LIST_LIMIT, description="distinct item ids to score")
    top_n: int | None = Field(None, ge=1, le=HARD_LIST_LIMIT, description="return only the best top_n")
    model: str | None = Field(None, max_length=256, description="a served model (GET /v1/models); default: the first")


class RecommendRequest(_Model):
    user: UserRef
    k: int = Field(10, ge=1, le=1000, description="items to return (at most the max_recommend setting)")
    exclude_seen: bool = True
    model: str | None = Field(None, max_length=256)


class RankResult(BaseModel):
    item_id: str
    index: int = Field(description="position in the request's candidates (recommend: in the retrieved list)")
    score: float = Field(description="the ranker's raw score; compare within one response only")
    text: str | None = None


class HistoryInfo(BaseModel):
    given: int = Field(description="history items available")
    used: int = Field(description="items the ranker read: the most recent, up to its max_history")
    truncated: bool


class Usage(BaseModel):
    prompt_tokens: int


class RankResponse(BaseModel):
    model: str
    results: list[RankResult]
    usage: Usage
    history: HistoryInfo | None = None


class Document(_Model):
    text: Annotated[str, StringConstraints(min_length=1, max_length=20_000)]


def _document_kind(value) -> str | None:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return "text"
    return "document" if isinstance(value, (dict, Document)) else None


DocumentIn = Annotated[
    Annotated[Annotated[str, StringConstraints(min_length=1, max_length=20_000)], Tag("text")]
    | Annotated[Document, Tag("document")],
    Discriminator(_document_kind, custom_error_type="document_type",
                  custom_error_message='a document is a string or {"text": string}'),
]
"""A rerank document: validated as the shape sent, so an error names ``documents[i]`` (not a union branch)."""


class RerankRequest(_Model):
    """The Cohere / vLLM rerank shape."""

    query: Annotated[str, StringConstraints(min_length=1, max_length=20_000)]
    documents: list[DocumentIn] = Field(..., min_length=1, max_length=HARD_LIST_LIMIT)
    top_n: int | None = Field(None, ge=1, le=HARD_LIST_LIMIT)
    return_documents: bool = False
    model: str | None = Field(None, max_length=256)

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


class RerankResult(BaseModel):
    index: int
    relevance_score: float = Field(description="softmax of the ranker's scores over this request's documents")
    document: Document | None = None


class RerankResponse(BaseModel):
    id: str
    model: str
    results: list[RerankResult]
    usage: Usage


class ItemIn(_Model):
    text: Annotated[str, StringConstraints(min_length=1, max_length=20_000)]
    features: list[float] | None = Field(None, max_length=4096,
                                         description="the item's collaborative (SASRec) vector, if known")


class ItemOut(BaseModel):
    item_id: str
    text: str
    row: int
    version: int
    has_features: bool
    created: bool | None = None


class EventIn(_Model):
    user_id: Id
    item_id: Id
    timestamp: float | None = Field(None, ge=0, le=1e11, description="seconds since the epoch; default: now")


EventsIn = Annotated[
    Annotated[list[EventIn], Tag("events")] | Annotated[EventIn, Tag("event")],
    Discriminator(lambda value: "events" if isinstance(value, list) else "event"),
]
"""One event or a list; validated as the shape the client sent, so an error names ``events[i].field``
(or ``event.field``) instead of reporting a mismatch against the other shape."""


class EventsOut(BaseModel):
    stored: int
    users: list[str]


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    kind: str = Field(description='"student" or "teacher" (rankers), "image-qa" (/v1/chat/completions)')
    max_history: int | None = Field(None, description="rankers: the history items read")
    max_images: int | None = Field(None, description="image-qa: images per request")
    default: bool = Field(description="the rankers' default model")
