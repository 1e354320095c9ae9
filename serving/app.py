"""The FastAPI app: ``create_app(settings)``. Routes only translate HTTP to service calls.

Start-up runs in the background (:func:`serving.runtime.load_runtime` in a thread): ``/health``
answers at once, ``/ready`` says 503 until the models, the caches and the warm-up are done, and
every other route answers 503 ``not_ready`` with ``Retry-After`` until then.

Errors: a client mistake answers 4xx with ``{"error": {"type", "message", "field", "value",
"limit"}}`` (:mod:`serving.errors`, and :class:`mixllm.errors.InputError` from the library: a bad
image or chat message); a full queue 503 with ``Retry-After``; a body over ``max_body_bytes`` 413
(the chat route allows its images on top: ``Settings.max_chat_body_bytes``); a missing or wrong API
key 401; the chat route without an image QA model 503 ``model_unavailable``. Nothing answers with a
stack trace.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mixllm.errors import DataError, InputError
from serving import schemas
from serving.batching import MicroBatcher, Overloaded
from serving.chat_schemas import ChatCompletion, ChatCompletionRequest
from serving.errors import ClientError, NotReady, Unavailable, error_body
from serving.metrics import Metrics
from serving.services import softmax
from serving.settings import Settings

log = logging.getLogger(__name__)
OPEN_PATHS = ("/health", "/ready")
CHAT_PATH = "/v1/chat/completions"


def _runtime(request: Request):
    runtime = request.app.state.runtime
    if runtime is None:
        raise NotReady("the service is still loading its models; retry shortly (GET /ready)")
    return runtime


def _error(status: int, body: dict, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


# --- routes --------------------------------------------------------------------------------------
router = APIRouter()


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    state = request.app.state
    if state.runtime is not None:
        return JSONResponse({"status": "ready", "models": state.runtime.model_names})
    if state.load_error is not None:
        return _error(503, {"error": {"type": "load_failed", "message": state.load_error}})
    return _error(503, {"error": {"type": "not_ready", "message": "loading models and caches"}}, {"Retry-After": "2"})


@router.get("/metrics")
async def metrics(request: Request) -> PlainTextResponse:
    body, content_type = request.app.state.metrics.render()
    return PlainTextResponse(body, media_type=content_type)


@router.get("/v1/models")
async def models(request: Request) -> dict:
    runtime = _runtime(request)
    cards = [schemas.ModelCard(id=m.name, kind=m.kind, max_history=m.max_history, default=m.name == runtime.ranking.default_model)
             for m in runtime.models.values()]
    if runtime.chat is not None:
        cards.append(schemas.ModelCard(id=runtime.chat.name, kind="image-qa", default=False,
                                       max_images=runtime.chat.qa.max_images))
    return {"object": "list", "data": [c.model_dump(exclude_none=True) for c in cards]}


@router.post(CHAT_PATH, response_model=ChatCompletion)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    """OpenAI's chat completions with the image QA model; ``"stream": true`` answers server-sent events."""
    runtime = _runtime(request)
    if runtime.chat is None:
        raise Unavailable(f"{CHAT_PATH}: {runtime.chat_unavailable}", field="model", value=body.model)
    job = await runtime.chat.create(body)
    if body.stream:
        return StreamingResponse(runtime.chat.stream(job), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await runtime.chat.complete(job)


def _ranked(ranked) -> schemas.RankResponse:
    return schemas.RankResponse(model=ranked.model, results=ranked.results, usage={"prompt_tokens": ranked.prompt_tokens},
                                history=ranked.history)


@router.post("/v1/rank", response_model=schemas.RankResponse, response_model_exclude_none=True)
async def rank(body: schemas.RankRequest, request: Request) -> Any:
    ranked = await _runtime(request).ranking.rank(body.user.id, body.user.history, body.candidates, body.top_n, body.model)
    return _ranked(ranked)


@router.post("/v1/recommend", response_model=schemas.RankResponse, response_model_exclude_none=True)
async def recommend(body: schemas.RecommendRequest, request: Request) -> Any:
    runtime = _runtime(request)
    limit = runtime.settings.max_recommend
    if body.k > limit:
        raise ClientError(f"k: {body.k} is more than the limit of {limit} (max_recommend)", "k", body.k, limit)
    ranked = await runtime.ranking.recommend(body.user.id, body.user.history, body.k, body.exclude_seen, body.model)
    return _ranked(ranked)


@router.post("/v1/rerank", response_model=schemas.RerankResponse, response_model_exclude_none=True)
async def rerank(body: schemas.RerankRequest, request: Request) -> Any:
    texts = body.texts()
    model, scores, tokens = await _runtime(request).ranking.rerank(body.query, texts, body.model)
    relevance = softmax(scores)
    order = sorted(range(len(texts)), key=lambda i: -relevance[i])[: body.top_n or len(texts)]
    results = [schemas.RerankResult(index=i, relevance_score=relevance[i],
                                    document={"text": texts[i]} if body.return_documents else None) for i in order]
    return schemas.RerankResponse(id=str(uuid.uuid4()), model=model, results=results, usage={"prompt_tokens": tokens})


def _item_out(item, created: bool | None = None) -> schemas.ItemOut:
    return schemas.ItemOut(item_id=item.item_id, text=item.text, row=item.row, version=item.version,
                           has_features=item.features is not None, created=created)


@router.put("/v1/items/{item_id}", response_model=schemas.ItemOut, response_model_exclude_none=True)
async def put_item(item_id: str, body: schemas.ItemIn, request: Request) -> Any:
    catalog = _runtime(request).catalog
    item, created = await run_in_threadpool(catalog.upsert, item_id.strip(), body.text, body.features)
    request.app.state.metrics.cache_rows(catalog)
    return JSONResponse(_item_out(item, created).model_dump(), status_code=201 if created else 200)


@router.get("/v1/items/{item_id}", response_model=schemas.ItemOut, response_model_exclude_none=True)
async def get_item(item_id: str, request: Request) -> Any:
    return _item_out(await run_in_threadpool(_runtime(request).catalog.item, item_id))


@router.delete("/v1/items/{item_id}", response_model=schemas.ItemOut, response_model_exclude_none=True)
async def delete_item(item_id: str, request: Request) -> Any:
    return _item_out(await run_in_threadpool(_runtime(request).catalog.delete, item_id))


@router.post("/v1/events", response_model=schemas.EventsOut)
async def events(body: schemas.EventsIn, request: Request) -> Any:
    items = body if isinstance(body, list) else [body]
    stored = await run_in_threadpool(_runtime(request).events.append, [(e.user_id, e.item_id, e.timestamp) for e in items])
    return schemas.EventsOut(stored=len(stored), users=sorted({e.user_id for e in stored}))


# --- the app -------------------------------------------------------------------------------------
def create_app(settings: Settings, load=None) -> FastAPI:
    """The service for ``settings``; ``load(settings) -> Runtime`` defaults to
    :func:`serving.runtime.load_runtime` (tests pass a faster one)."""
    if load is None:
        from serving.runtime import load_runtime as load

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.runtime, app.state.load_error = None, None
        app.state.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        task = asyncio.create_task(_start(app, settings, load))
        try:
            yield
        finally:
            task.cancel()
            runtime = app.state.runtime
            if runtime is not None:
                for model in runtime.models.values():
                    await model.batcher.stop()
                if runtime.chat is not None:
                    runtime.chat.close()
                runtime.store.close()
            app.state.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="mixllm", version="0.1.0", lifespan=lifespan,
                  description="Embedding-token ranking and recommendation: rank, recommend, rerank, items, events; "
                              "image question answering: chat completions.")
    app.state.metrics = Metrics()
    app.state.runtime, app.state.load_error, app.state.settings = None, None, settings
    app.include_router(router)
    _install_error_handlers(app)
    app.add_middleware(GuardMiddleware, settings=settings, metrics=app.state.metrics)
    return app


async def _start(app: FastAPI, settings: Settings, load) -> None:
    start = time.perf_counter()
    try:
        runtime = await asyncio.to_thread(load, settings)
    except asyncio.CancelledError:
        raise
    except Exception as error:  # noqa: BLE001 - reported by /ready and the log; the process stays up for it
        log.error("start-up failed: %s", error, exc_info=not isinstance(error, DataError))
        app.state.load_error = f"start-up failed: {error}"
        return
    metrics: Metrics = app.state.metrics
    for model in runtime.models.values():
        model.batcher = MicroBatcher(
            lambda batch, model=model: runtime.ranking.run_batch(model, batch), model.name, settings.max_batch_size,
            settings.max_wait_ms, settings.max_queue, executor=app.state.executor,
            on_batch=lambda size, depth, seconds, name=model.name: metrics.batch(name, size, depth, seconds),
            wait_fraction=settings.batch_wait_fraction,
        )
        model.batcher.start()
        metrics.model_loaded(model.name, model.load_seconds)
    if runtime.chat is not None:
        runtime.chat.metrics = metrics
        metrics.model_loaded(runtime.chat.name, runtime.chat.load_seconds)
    metrics.cache_rows(runtime.catalog)
    app.state.runtime = runtime
    log.info("ready in %.1f s: models %s", time.perf_counter() - start, ", ".join(runtime.model_names))


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ClientError)
    async def client_error(request: Request, error: ClientError) -> JSONResponse:
        headers = {"Retry-After": "2"} if isinstance(error, NotReady) else None
        return _error(error.status, error.body(), headers)

    @app.exception_handler(InputError)
    async def input_error(request: Request, error: InputError) -> JSONResponse:
        return _error(error.status, error_body(error))

    @app.exception_handler(DataError)
    async def data_error(request: Request, error: DataError) -> JSONResponse:
        return _error(422, {"error": {"type": "invalid_value", "message": str(error)}})

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, error: Overloaded) -> JSONResponse:
        return _error(503, {"error": {"type": "overloaded", "message": str(error)}}, {"Retry-After": str(error.retry_after_s)})

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        errors = error.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":  # loc holds the character position, not a field
            at = first.get("loc", (None, None))[-1]
            reason = (first.get("ctx") or {}).get("error", "invalid JSON")
            return _error(422, {"error": {"type": "invalid_json", "field": "body", "value": f"character {at}",
                                         "message": f"body: not valid JSON at character {at}: {reason}"}})
        field = _field_name(first.get("loc", ()))
        body: dict[str, Any] = {"type": "validation_error", "message": f"{field}: {first.get('msg', 'invalid')}", "field": field}
        if "input" in first and first.get("type") != "json_invalid" and _small(first["input"]):
            body["value"] = first["input"]
        ctx = {k: v for k, v in (first.get("ctx") or {}).items() if isinstance(v, (int, float, str))}
        if ctx:
            body["limit"] = ctx
        details = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in errors[:20]]
        return _error(422, {"error": body, "detail": details})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        body = {"type": "body_too_large" if error.status_code == 413 else "http_error", "message": str(error.detail)}
        if isinstance(error, BodyTooLarge):
            body["limit"] = error.limit
        return _error(error.status_code, {"error": body}, getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error(500, {"error": {"type": "internal", "message": "internal error; the server log has the details"}})


def _field_name(loc) -> str:
    """``("body", "candidates", 3)`` -> ``"candidates[3]"``: the names the services use too."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out or "body"


def _small(value: Any) -> bool:
    return isinstance(value, (int, float, bool, type(None))) or (isinstance(value, str) and len(value) <= 200)


class BodyTooLarge(StarletteHTTPException):
    """Raised while a body streams in past the limit; an HTTPException, so FastAPI's body parsing
    re-raises it instead of turning it into a 400."""

    def __init__(self, limit: int, setting: str = "max_body_bytes") -> None:
        super().__init__(413, f"the request body is larger than the limit of {limit} bytes ({setting})")
        self.limit = limit


class GuardMiddleware:
    """Pure ASGI: the API key, the body size limit and the request metrics, around every request."""

    def __init__(self, app, settings: Settings, metrics: Metrics) -> None:
        self.app, self.settings, self.metrics = app, settings, metrics
        self.key = None if not settings.api_key else settings.api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, send_status)
        finally:  # the router put the matched route in the scope: label by its template, not the raw path
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.request(route, scope["method"], status[0], time.perf_counter() - start)

    async def _guarded(self, scope, receive, send):
        headers = {k.decode("latin-1").lower(): v for k, v in scope["headers"]}
        if self.key is not None and scope["path"] not in OPEN_PATHS:
            given = headers.get("authorization", b"")
            expected = b"Bearer " + self.key
            if not hmac.compare_digest(given, expected):
                response = _error(401, {"error": {"type": "unauthorized", "message": "missing or wrong API key: send "
                                                  "'Authorization: Bearer <MIXLLM_API_KEY>'", "field": "Authorization"}},
                                  {"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        chat = scope["path"] == CHAT_PATH
        limit = self.settings.max_chat_body_bytes if chat else self.settings.max_body_bytes
        setting = "max_body_bytes + max_images x max_image_bytes, base64" if chat else "max_body_bytes"
        too_large = _error(413, {"error": {"type": "body_too_large", "message": f"the request body is larger than the "
                                           f"limit of {limit} bytes ({setting})", "limit": limit}})
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await too_large(scope, receive, send)
        received, started = [0], [False]

        async def limited_receive():
            message = await receive()
            if message["type"] == "http.request":
                received[0] += len(message.get("body", b""))
                if received[0] > limit:
                    raise BodyTooLarge(limit, setting)
            return message

        async def tracking_send(message):
            if message["type"] == "http.response.start":
                started[0] = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started[0]:
                await too_large(scope, receive, send)
