"""``/v1/chat/completions`` end to end (TestClient, lifespan included) with a tiny image QA model beside the
tiny serving world: the official ``openai`` client works against it unchanged (plain and streamed), the
answers are mixllm.qa's in-process greedy answers with consistent usage, every client mistake is a 4xx
naming field, value and limit, and the route answers 503 cleanly without an image QA model."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from mixllm.errors import DataError
from mixllm.generation import GenerationSettings
from mixllm.image_input import ImageTooLarge, InvalidImageURL, decode_image
from mixllm.qa import QAModel, user_message
from serving.app import create_app
from serving.chat import ChatService
from serving.runtime import load_runtime, qa_checkpoint
from serving_world import assert_client_error, fake_encode, session_world, wait_ready

QUESTION = "What color is the cube?"
MAX_TOKENS_LIMIT, MAX_IMAGE_BYTES, MAX_BODY, MAX_QUEUE = 24, 200_000, 20_000, 1


def _load(settings):
    return load_runtime(settings, encode_texts=fake_encode)


def png_bytes(seed: int = 0, size=(64, 48)) -> bytes:
    image = Image.effect_noise(size, 60 + seed).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def chat_body(url: str | None = None, question: str = QUESTION, **extra) -> dict:
    parts = [{"type": "text", "text": question}]
    if url is not None:
        parts.append({"type": "image_url", "image_url": {"url": url}})
    return {"model": "tiny-qa", "messages": [{"role": "user", "content": parts}], "max_tokens": 8, **extra}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return session_world(tmp_path_factory)


@pytest.fixture(scope="module")
def client(world, qa_dir, tmp_path_factory):
    settings = world.settings(tmp_path_factory.mktemp("chat") / "store.sqlite", qa_model=f"tiny-qa={qa_dir}",
                              max_tokens_limit=MAX_TOKENS_LIMIT, max_image_bytes=MAX_IMAGE_BYTES,
                              max_body_bytes=MAX_BODY, max_queue=MAX_QUEUE, warmup=True)
    with TestClient(create_app(settings, load=_load)) as client:
        wait_ready(client)
        yield client


@pytest.fixture(scope="module")
def oai(client):
    """The official client, unchanged, over the app (TestClient is an httpx.Client)."""
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)


def in_process(qa: QAModel, png: bytes, max_tokens: int = 8, question: str = QUESTION):
    completion = qa.complete([user_message(question)], [decode_image(png)], GenerationSettings(max_new_tokens=max_tokens))
    list(completion)
    return completion


def test_ready_and_models_list_the_image_model(client):
    assert client.get("/ready").json()["models"] == ["student", "teacher", "tiny-qa"]
    cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
    assert cards["tiny-qa"] == {"id": "tiny-qa", "object": "model", "kind": "image-qa", "max_images": 1, "default": False}


def test_openai_client_answers_as_mixllm_qa_does_in_process(oai, qa):
    png = png_bytes(1)
    response = oai.chat.completions.create(
        model="tiny-qa", max_tokens=8, temperature=0,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png)}},
                                               {"type": "text", "text": QUESTION}]}],
    )  # fmt: skip
    expected = in_process(qa, png)
    choice = response.choices[0]
    assert response.object == "chat.completion" and response.model == "tiny-qa" and response.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content == expected.text and expected.text
    assert choice.finish_reason == expected.finish_reason
    usage = response.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (expected.prompt_tokens, len(expected.token_ids))
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens > 49 and usage.completion_tokens == 8  # the image's 49 tokens are in the prompt


def test_openai_client_streams_the_same_answer_with_usage(oai, qa):
    png = png_bytes(2)
    stream = oai.chat.completions.create(
        model="tiny-qa", max_tokens=8, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                               {"type": "image_url", "image_url": {"url": data_url(png)}}]}],
    )  # fmt: skip
    chunks = list(stream)
    expected = in_process(qa, png)
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text and sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) > 1
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [expected.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.token_ids)
    assert chunks[-1].usage.prompt_tokens == expected.prompt_tokens


def test_the_raw_stream_is_server_sent_events_ending_with_done(client):
    response = client.post("/v1/chat/completions", json=chat_body(data_url(png_bytes()), stream=True))
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = [line for line in response.text.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length") and "usage" not in chunks[-1]


def test_a_text_only_question_and_a_seeded_sample(client, oai):
    plain = client.post("/v1/chat/completions", json=chat_body(None))
    assert plain.status_code == 200 and plain.json()["usage"]["prompt_tokens"] < 49  # no image tokens
    sampled = [oai.chat.completions.create(model="tiny-qa", messages=[{"role": "user", "content": QUESTION}],
                                           max_tokens=6, temperature=1.0, seed=7).choices[0].message.content
               for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_client_mistakes_are_4xx_naming_field_value_and_limit(client):
    def post(body):
        return client.post("/v1/chat/completions", json=body)

    url_field = "messages[0].content[1].image_url.url"
    png = png_bytes()
    assert_client_error(post(chat_body("data:image/png;base64,@@@not-base64@@@")), 400, url_field)
    error = assert_client_error(post(chat_body("https://example.com/cat.png")), 400, url_field,
                                "https://example.com/cat.png")
    assert "allow_remote_images" in error["message"]
    two = chat_body(data_url(png))
    two["messages"][0]["content"].append({"type": "image_url", "image_url": {"url": data_url(png)}})
    assert_client_error(post(two), 422, "messages", 2, 1)
    assert_client_error(post(chat_body(data_url(png), n=2)), 422, "n", 2, 1)
    assert_client_error(post(chat_body(data_url(png), max_tokens=MAX_TOKENS_LIMIT + 1)), 422, "max_tokens",
                        MAX_TOKENS_LIMIT + 1, MAX_TOKENS_LIMIT)
    assert_client_error(post(chat_body(data_url(png), max_completion_tokens=MAX_TOKENS_LIMIT + 5)), 422,
                        "max_completion_tokens", MAX_TOKENS_LIMIT + 5, MAX_TOKENS_LIMIT)
    assert_client_error(post({"model": "tiny-qa", "messages": []}), 422, "messages")
    assert_client_error(post({"messages": [{"role": "robot", "content": "hi"}]}), 422, "messages[0].role", "robot")
    assert_client_error(post({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}), 422,
                        "messages[0].content[0].type", "audio")
    assert_client_error(post({"messages": [{"role": "user", "content": [{"type": "text"}]}]}), 422,
                        "messages[0].content[0]")
    assert_client_error(post({"messages": [{"role": "system", "content": "be brief"}]}), 422, "messages")
    assistant = {"messages": [{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": data_url(png)}}]},
                              {"role": "user", "content": "and?"}]}
    assert_client_error(post(assistant), 422, "messages[0].content", "assistant")
    assert_client_error(post(chat_body(data_url(png), stop=["\n"])), 422, "stop")
    assert_client_error(post(chat_body(data_url(png), temperature=3)), 422, "temperature", 3)
    assert_client_error(post(chat_body(data_url(png), model="gpt-4o")), 404, "model", "gpt-4o")
    # The images themselves.
    big = Image.effect_noise((400, 400), 90).convert("RGB")
    buffer = io.BytesIO()
    big.save(buffer, "PNG", compress_level=0)  # ~480 kB: over max_image_bytes, under the chat body limit
    assert_client_error(post(chat_body(data_url(buffer.getvalue()[:MAX_IMAGE_BYTES + 1]))), 413, url_field,
                        MAX_IMAGE_BYTES + 1, MAX_IMAGE_BYTES)
    bomb = bytearray(png)
    bomb[16:24] = (100_000).to_bytes(4, "big") * 2  # IHDR claims 100000 x 100000 (CRC now wrong: never read)
    assert_client_error(post(chat_body(data_url(bytes(bomb)))), 413, url_field, 10**10, 40_000_000)
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, "GIF")
    assert_client_error(post(chat_body(data_url(gif.getvalue(), "image/gif"))), 422, url_field, "image/gif")
    assert_client_error(post(chat_body(data_url(gif.getvalue()))), 422, url_field, "GIF")
    assert_client_error(post(chat_body(data_url(png[: len(png) // 2]))), 422, url_field)
    assert_client_error(post(chat_body(data_url(b"\x89PNG\r\n\x1a\n" + b"\0" * 40))), 422, url_field)


def test_a_body_over_the_chat_limit_is_413(client):
    limit = client.app.state.settings.max_chat_body_bytes
    assert limit == MAX_BODY + 4 * (MAX_IMAGE_BYTES // 3 + 1)  # room for one base64 image of max_image_bytes
    body = chat_body("data:image/png;base64," + "A" * limit)
    error = assert_client_error(client.post("/v1/chat/completions", json=body), 413)
    assert error["limit"] == limit and "max_image_bytes" in error["message"]
    assert_client_error(client.post("/v1/rank", json={"candidates": ["x" * MAX_BODY]}), 413)  # other routes keep theirs


def test_the_openai_client_sees_the_error_body(oai):
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model="tiny-qa", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}])
    assert err.value.status_code == 400 and err.value.body["field"] == "messages[0].content[0].image_url.url"


def test_a_full_queue_is_503_with_retry_after_and_recovers(client):
    chat = client.app.state.runtime.chat
    chat.pending += MAX_QUEUE + 1  # as if one generation ran and max_queue waited
    try:
        response = client.post("/v1/chat/completions", json=chat_body(data_url(png_bytes())))
        assert_client_error(response, 503)
        assert response.json()["error"]["type"] == "overloaded" and int(response.headers["Retry-After"]) >= 1
    finally:
        chat.pending -= MAX_QUEUE + 1
    assert client.post("/v1/chat/completions", json=chat_body(data_url(png_bytes()))).status_code == 200
    deadline = time.monotonic() + 10  # the slot is given back once the model thread has finished
    while chat.pending and time.monotonic() < deadline:
        time.sleep(0.01)
    assert chat.pending == 0


def test_metrics_count_time_to_first_token_and_tokens(client):
    client.post("/v1/chat/completions", json=chat_body(data_url(png_bytes()), max_tokens=5))
    text = client.get("/metrics").text
    assert 'mixllm_chat_time_to_first_token_seconds_count{model="tiny-qa"}' in text
    assert 'mixllm_chat_tokens_total{kind="completion",model="tiny-qa"}' in text


def test_without_an_image_model_the_route_is_503_and_the_rest_serves(world, tmp_path, monkeypatch):
    monkeypatch.setattr("mixllm.qa.DEFAULT_QA_CHECKPOINT", tmp_path / "scenes_qa")  # the default is not trained yet
    settings = world.settings(tmp_path / "store.sqlite", qa_model=None, checkpoint=[f"student={world.student}"])
    with TestClient(create_app(settings, load=_load)) as client:
        wait_ready(client)
        response = client.post("/v1/chat/completions", json=chat_body(data_url(png_bytes())))
        error = assert_client_error(response, 503)
        assert error["type"] == "model_unavailable" and "make caption" in error["message"]
        assert "Retry-After" not in response.headers
        assert [c["id"] for c in client.get("/v1/models").json()["data"]] == ["student"]


def test_which_qa_model_is_served(world, tmp_path, qa_dir, monkeypatch):
    def settings(value):
        return world.settings(tmp_path / "store.sqlite", qa_model=value)

    monkeypatch.setattr("mixllm.qa.DEFAULT_QA_CHECKPOINT", tmp_path / "scenes_qa")
    assert qa_checkpoint(settings(None)) is None and qa_checkpoint(settings("")) is None
    (tmp_path / "scenes_qa").mkdir()
    assert qa_checkpoint(settings(None)) == ("scenes-qa", tmp_path / "scenes_qa")
    assert qa_checkpoint(settings(f"mine={qa_dir}")) == ("mine", qa_dir)
    assert qa_checkpoint(settings(str(qa_dir))) == (qa_dir.name, qa_dir)
    with pytest.raises(DataError, match="--qa-model /no/such: no such checkpoint directory"):
        qa_checkpoint(settings("/no/such"))  # asked for explicitly: start-up fails
    with pytest.raises(DataError, match="a name of its own"):
        qa_checkpoint(settings(f"student={qa_dir}"))


def test_remote_images_when_allowed_keep_the_limits(world, tmp_path):
    png = png_bytes()

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/cat.png":
            return httpx.Response(200, content=png)
        if request.url.path == "/huge.png":
            return httpx.Response(200, content=png + b"\0" * 200)
        return httpx.Response(404)

    settings = world.settings(tmp_path / "store.sqlite", allow_remote_images=True, max_image_bytes=len(png) + 100)
    service = ChatService(settings, qa=None, name="x", transport=httpx.MockTransport(handler))
    image = asyncio.run(service.load_image("url", "https://images.example/cat.png"))
    assert image.size == (64, 48) and image.tobytes() == decode_image(png).tobytes()
    with pytest.raises(ImageTooLarge, match=f"more than the limit of {len(png) + 100:,} bytes"):
        asyncio.run(service.load_image("url", "https://images.example/huge.png"))
    with pytest.raises(InvalidImageURL, match="HTTP 404"):
        asyncio.run(service.load_image("url", "https://images.example/missing.png"))
    service.close()
