"""``/v1/chat/completions`` bodies: the OpenAI chat completions shape, with bounds.

A message's ``content`` is a string or a list of parts ``{"type": "text", "text": ...}`` and
``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``; a string is read as one text
part, so an error in a part is named ``messages[i].content[j]...``. Fields OpenAI has and this service does
not implement (``stop``, ``tools``, ``logprobs``, penalties, ...) are refused by name (422), not ignored.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

MAX_TEXT = 100_000
"""Longest text part (characters); the model's context bounds a prompt far below this."""
MAX_LIST = 1000
"""Most messages, and most parts in a message."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageURL(_Model):
    url: str = Field(..., min_length=1, description="data:image/png|jpeg|webp;base64,... (http(s) only when the "
                                                    "service allows remote images)")
    detail: Literal["auto", "low", "high"] | None = Field(None, description="accepted for compatibility; every image "
                                                                            "becomes the model's fixed image tokens")


class ContentPart(_Model):
    type: Literal["text", "image_url"]
    text: str | None = Field(None, max_length=MAX_TEXT)
    image_url: ImageURL | None = None

    @model_validator(mode="after")
    def _fields_match_type(self) -> ContentPart:
        if self.type == "text" and (self.text is None or self.image_url is not None):
            raise ValueError('a "text" part is {"type": "text", "text": string}')
        if self.type == "image_url" and (self.image_url is None or self.text is not None):
            raise ValueError('an "image_url" part is {"type": "image_url", "image_url": {"url": string}}')
        return self


def _parts(value):
    return [{"type": "text", "text": value}] if isinstance(value, str) else value


class ChatMessage(_Model):
    role: Literal["system", "user", "assistant"]
    content: Annotated[list[ContentPart], BeforeValidator(_parts)] = Field(
        ..., max_length=MAX_LIST, description="a string, or a list of text and image_url parts")
    name: str | None = Field(None, max_length=256, description="accepted, unused")


class StreamOptions(_Model):
    include_usage: bool = False


class ChatCompletionRequest(_Model):
    model: str | None = Field(None, max_length=256, description="the image QA model's id (GET /v1/models); "
                                                                "default: the one served")
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=MAX_LIST)
    max_tokens: int | None = Field(None, ge=1, description="most tokens in the answer (at most max_tokens_limit)")
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name of max_tokens; wins "
                                                                      "when both are given")
    temperature: float | None = Field(None, ge=0, le=2, description="0 (the default here) is greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**63, description="makes sampling repeatable")
    n: int | None = Field(None, ge=1, description="only 1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256, description="accepted, unused")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str = Field(description='"stop": the model ended its answer; "length": max_tokens was reached')
    logprobs: None = None


class ChatUsage(BaseModel):
    prompt_tokens: int = Field(description="prompt tokens, each image's tokens included")
    completion_tokens: int = Field(description="generated tokens, the end-of-turn token included")
    total_tokens: int


class ChatCompletion(BaseModel):
    """The non-streaming answer; a streamed one is ``chat.completion.chunk`` events (see serving.chat)."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: ChatUsage
