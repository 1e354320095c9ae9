"""``/v1/chat/completions`` as plain Python (no FastAPI): image question answering with the served
image QA model (:class:`mixllm.qa.QAModel`), in OpenAI's chat completions shape.

A request goes through two steps, so that every client mistake is answered with its 4xx before a
streamed response has started:

1. :meth:`ChatService.create` checks the request (model, ``n``, ``max_tokens``, the messages), decodes
   its images (data URLs; http(s) URLs only with ``allow_remote_images``) with the byte and pixel
   limits, and builds the prompt, in a worker thread. It then starts the generation: one at a time
   on the model's own thread (a generation holds its thread for the whole answer, so it does not
   share the rankers' thread), at most ``max_queue`` waiting behind it (:class:`Overloaded`: 503 with
   ``Retry-After`` beyond).
2. :meth:`ChatService.complete` collects the answer into a ``chat.completion``, or
   :meth:`ChatService.stream` yields it as server-sent events: ``data: {chunk}`` lines of
   ``chat.completion.chunk`` objects (the first delta carries the role, the last the
   ``finish_reason``; with ``stream_options.include_usage`` one more chunk with no choices and the
   usage), then ``data: [DONE]``. A client that goes away stops its generation at the next token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from mixllm.generation import GenerationSettings
from mixllm.image_input import ImageTooLarge, InvalidImageURL, decode_image, image_from_data_url
from mixllm.qa import Completion, QAModel
from serving.batching import Overloaded
from serving.chat_schemas import ChatCompletionRequest
from serving.errors import Invalid, NotFound
from serving.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256
"""max_tokens of a request that gives none (or max_tokens_limit if lower)."""
REMOTE = ("http://", "https://")


@dataclass
class ChatJob:
    """A request whose generation has started: the deltas arrive in ``queue`` (None at the end, or an
    exception)."""

    id: str
    model: str
    completion: Completion
    include_usage: bool
    started: float
    created: int = field(default_factory=lambda: int(time.time()))
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


class ChatService:
    """Chat completions with one image QA model (see the module doc)."""

    def __init__(self, settings: Settings, qa: QAModel, name: str, metrics=None, transport=None) -> None:
        self.settings, self.qa, self.name, self.metrics = settings, qa, name, metrics
        self.transport = transport  # httpx transport of remote image fetches (tests)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"qa-{name}")
        self.pending = 0  # generations running or waiting (touched on the event loop only)
        self.load_seconds = 0.0
        self._running: ChatJob | None = None

    def close(self) -> None:
        """Stop the running generation and drop the waiting ones (shutdown)."""
        if self._running is not None:
            self._running.completion.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)

    # --- 1. check, decode, start -------------------------------------------------------------------
    def _check_capacity(self) -> None:
        if self.pending > self.settings.max_queue:  # one running, max_queue waiting
            raise Overloaded(f"model {self.name!r}", self.settings.max_queue)

    def _generation_settings(self, request: ChatCompletionRequest) -> GenerationSettings:
        if request.n not in (None, 1):
            raise Invalid(f"n: {request.n} choices asked; only n=1 is supported", field="n", value=request.n, limit=1)
        name = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        limit = self.settings.max_tokens_limit
        max_tokens = request.max_completion_tokens or request.max_tokens or min(DEFAULT_MAX_TOKENS, limit)
        if max_tokens > limit:
            raise Invalid(f"{name}: {max_tokens} is more than the limit of {limit} (max_tokens_limit)", field=name,
                          value=max_tokens, limit=limit)
        temperature = 0.0 if request.temperature is None else request.temperature
        top_p = 1.0 if request.top_p is None else request.top_p
        return GenerationSettings(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=request.seed)

    async def create(self, request: ChatCompletionRequest) -> ChatJob:
        """Check ``request``, decode its images and start its generation (module doc, step 1)."""
        started = time.perf_counter()
        if request.model not in (None, self.name):
            raise NotFound(f"model: {request.model!r} is not the image QA model (served: {self.name})", field="model",
                           value=request.model)
        settings = self._generation_settings(request)
        self._check_capacity()
        messages, urls = [], []
        for i, message in enumerate(request.messages):
            content = []
            for j, part in enumerate(message.content):
                if part.type == "text":
                    content.append({"type": "text", "text": part.text})
                else:
                    content.append({"type": "image"})
                    urls.append((f"messages[{i}].content[{j}].image_url.url", part.image_url.url))
            messages.append({"role": message.role, "content": content})
        self.qa.render(messages)  # roles, placeholders, the image count: checked before any image is decoded
        images = [await self.load_image(where, url) for where, url in urls]
        completion = await asyncio.to_thread(self.qa.complete, messages, images, settings)
        self._check_capacity()  # again: others may have started while this one was decoded
        job = ChatJob(f"chatcmpl-{uuid.uuid4().hex}", self.name, completion,
                      bool(request.stream_options and request.stream_options.include_usage), started)
        loop = asyncio.get_running_loop()
        self.pending += 1
        loop.run_in_executor(self.executor, self._generate, job, loop).add_done_callback(lambda _: self._finished())
        return job

    def _finished(self) -> None:
        self.pending -= 1

    async def load_image(self, where: str, url: str):
        """The image at ``url`` (a data URL, or http(s) with allow_remote_images), decoded with the limits."""
        limits = dict(max_bytes=self.settings.max_image_bytes, max_pixels=self.settings.max_image_pixels, field=where)
        if not url.startswith(REMOTE):
            return await asyncio.to_thread(image_from_data_url, url, **limits)
        if not self.settings.allow_remote_images:
            raise InvalidImageURL(f"{where}: remote image URLs are not fetched by this service (allow_remote_images is "
                                  "off); send the image as a data URL (data:image/png;base64,...)", where, url[:200])
        data = await self._fetch(url, where)
        return await asyncio.to_thread(decode_image, data, **limits)

    async def _fetch(self, url: str, where: str) -> bytes:
        """The bytes at ``url`` (allow_remote_images), refused past max_image_bytes while they arrive."""
        import httpx

        limit = self.settings.max_image_bytes
        data = bytearray()
        try:
            async with httpx.AsyncClient(timeout=self.settings.remote_image_timeout_s, follow_redirects=True,
                                         max_redirects=3, transport=self.transport, trust_env=False) as client:
                async with client.stream("GET", url) as response:
                    if response.status_code != 200:
                        raise InvalidImageURL(f"{where}: fetching the image answered HTTP {response.status_code}", where,
                                              url[:200])
                    async for chunk in response.aiter_bytes():
                        data += chunk
                        if len(data) > limit:
                            raise ImageTooLarge(f"{where}: the image at the URL is more than the limit of {limit:,} "
                                                "bytes", where, len(data), limit)
        except httpx.HTTPError as error:
            raise InvalidImageURL(f"{where}: could not fetch the image ({type(error).__name__}: {error})", where,
                                  url[:200]) from None
        return bytes(data)

    def _generate(self, job: ChatJob, loop: asyncio.AbstractEventLoop) -> None:
        """(model thread) Run the generation, handing each delta to the request's queue."""
        def hand_over(item) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the service is shutting down
                loop.call_soon_threadsafe(job.queue.put_nowait, item)

        self._running, start, completion = job, time.perf_counter(), job.completion
        try:
            for delta in completion:
                hand_over(delta)
        except Exception as error:  # noqa: BLE001 - handed to the request, which reports it
            log.exception("generation failed")
            hand_over(error)
        else:
            hand_over(None)
        finally:
            self._running = None
            log.info("%s %s: prompt %d tokens, answer %d tokens in %.2f s (%s)", self.name, job.id,
                     completion.prompt_tokens, completion.completion_tokens, time.perf_counter() - start,
                     completion.finish_reason or "failed")
            if self.metrics is not None:  # generated tokens count, read or not
                self.metrics.chat_tokens(self.name, completion.prompt_tokens, completion.completion_tokens)

    # --- 2. answer -----------------------------------------------------------------------------------
    async def deltas(self, job: ChatJob) -> AsyncIterator[str]:
        """The answer's text deltas as they are generated; closing this stops the generation."""
        first = True
        try:
            while (item := await job.queue.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                if first and self.metrics is not None:
                    self.metrics.chat_first_token(self.name, time.perf_counter() - job.started)
                first = False
                yield item
        finally:
            job.completion.cancel()  # a no-op once it is done; else the client went away

    @staticmethod
    def usage(job: ChatJob) -> dict[str, int]:
        prompt, completion = job.completion.prompt_tokens, job.completion.completion_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def complete(self, job: ChatJob) -> dict[str, Any]:
        """The whole answer as a ``chat.completion`` body."""
        text = "".join([delta async for delta in self.deltas(job)])
        return {"id": job.id, "object": "chat.completion", "created": job.created, "model": job.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": job.completion.finish_reason, "logprobs": None}],
                "usage": self.usage(job)}  # fmt: skip

    async def stream(self, job: ChatJob) -> AsyncIterator[str]:
        """The answer as server-sent events (module doc)."""
        def event(delta: dict, finish_reason: str | None = None) -> str:
            chunk = {"id": job.id, "object": "chat.completion.chunk", "created": job.created, "model": job.model,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
            return f"data: {json.dumps(chunk)}\n\n"

        yield event({"role": "assistant", "content": ""})
        try:
            async for delta in self.deltas(job):
                yield event({"content": delta})
        except Exception as error:  # noqa: BLE001 - the status line is sent: the error goes in the stream
            yield f"data: {json.dumps({'error': {'type': 'internal', 'message': f'generation failed: {error}'}})}\n\n"
            return
        yield event({}, job.completion.finish_reason)
        if job.include_usage:
            chunk = {"id": job.id, "object": "chat.completion.chunk", "created": job.created, "model": job.model,
                     "choices": [], "usage": self.usage(job)}
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"
