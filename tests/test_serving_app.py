"""The FastAPI service end to end (TestClient, lifespan included) over the tiny serving world:
every route, every client mistake (4xx naming field, value and limit; never a 500 or a stack trace),
overload (503 + Retry-After, then recovery), the API key, and /metrics."""

from __future__ import annotations

import math
import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from serving.app import create_app
from serving.runtime import load_runtime
from serving_world import HISTORY, SASREC_DIM, assert_client_error, fake_encode, session_world, wait_ready

SCORE_ATOL = 1e-4
"""Two forwards of the same request in float32 on CPU agree far closer than this (batch composition
changes only the rounding); a changed input (another history, other item tokens) moves a score of
these random tiny models by ~1e-2 or more."""
MAX_CANDIDATES, MAX_EVENTS, MAX_BODY, MAX_QUEUE = 20, 50, 20_000, 2


def _load(settings):
    return load_runtime(settings, encode_texts=fake_encode)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return session_world(tmp_path_factory)


@pytest.fixture(scope="module")
def client(world, tmp_path_factory):
    settings = world.settings(tmp_path_factory.mktemp("app") / "store.sqlite", max_candidates=MAX_CANDIDATES,
                              max_events=MAX_EVENTS, max_body_bytes=MAX_BODY, max_queue=MAX_QUEUE, max_batch_size=4,
                              max_recommend=100, retrieve=100)
    with TestClient(create_app(settings, load=_load)) as client:
        wait_ready(client)
        yield client


def _runtime(client):
    return client.app.state.runtime


def _rank(client, user, candidates, **extra):
    response = client.post("/v1/rank", json={"user": user, "candidates": candidates, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def _scores(body) -> dict[str, float]:
    return {r["item_id"]: r["score"] for r in body["results"]}


def _assert_close(a: dict[str, float], b: dict[str, float]) -> None:
    assert a.keys() == b.keys()
    assert all(abs(a[k] - b[k]) <= SCORE_ATOL for k in a), (a, b)


def _max_diff(a: dict[str, float], b: dict[str, float]) -> float:
    return max(abs(a[k] - b[k]) for k in a)


def _recommended(client, user, k=100, exclude_seen=True, model=None) -> list[str]:
    body = {"user": user, "k": k, "exclude_seen": exclude_seen, **({"model": model} if model else {})}
    response = client.post("/v1/recommend", json=body)
    assert response.status_code == 200, response.text
    return [r["item_id"] for r in response.json()["results"]]


# --- health, readiness, models -------------------------------------------------------------------
def test_health_ready_and_models(client, world):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"status": "ready", "models": ["student", "teacher"]}
    cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
    assert cards["student"] == {"id": "student", "object": "model", "kind": "student", "max_history": HISTORY, "default": True}
    assert cards["teacher"]["kind"] == "teacher" and cards["teacher"]["default"] is False


def test_ready_is_503_until_loaded_and_reports_a_failed_start(world, tmp_path):
    """While the models load, /health answers, /ready and the model routes say 503 with Retry-After;
    a start-up that fails is reported by /ready (the process stays up)."""
    gate = threading.Event()

    def slow_failing_load(settings):
        gate.wait(30)
        from mixllm.errors import DataError

        raise DataError("--checkpoint student=/nowhere: no such checkpoint directory")

    with TestClient(create_app(world.settings(tmp_path / "store.sqlite"), load=slow_failing_load)) as client:
        assert client.get("/health").status_code == 200
        loading = client.get("/ready")
        assert loading.status_code == 503 and loading.json()["error"]["type"] == "not_ready"
        assert int(loading.headers["Retry-After"]) >= 1
        for response in (client.post("/v1/rank", json={"user": {"id": "u0"}, "candidates": ["100"]}), client.get("/v1/models")):
            assert_client_error(response, 503)
            assert response.json()["error"]["type"] == "not_ready" and "Retry-After" in response.headers
        gate.set()
        deadline = time.monotonic() + 10
        while client.get("/ready").json()["error"]["type"] != "load_failed" and time.monotonic() < deadline:
            time.sleep(0.02)
        failed = client.get("/ready")
        assert failed.status_code == 503 and "/nowhere" in failed.json()["error"]["message"]


# --- /v1/rank ------------------------------------------------------------------------------------
def test_rank_known_user_sorted_with_indices_and_truncated_history(client, world):
    user = world.user_ids[0]
    candidates = world.item_ids[5:15]
    body = _rank(client, {"id": user}, candidates)
    results = body["results"]
    assert body["model"] == "student" and body["usage"]["prompt_tokens"] > len(candidates)
    assert sorted(r["item_id"] for r in results) == sorted(candidates)  # every candidate, once
    assert all(candidates[r["index"]] == r["item_id"] for r in results)
    scores = [r["score"] for r in results]
    assert all(math.isfinite(s) for s in scores) and scores == sorted(scores, reverse=True)
    given = len(_runtime(client).store.history(user))
    assert given > HISTORY  # seed users have 5..12 events: the model reads only the most recent
    assert body["history"] == {"given": given, "used": HISTORY, "truncated": True}
    # the user's id means their history: the same as sending the most recent HISTORY items explicitly
    recent = _runtime(client).store.history(user)[-HISTORY:]
    _assert_close(_scores(_rank(client, {"history": recent}, candidates)), _scores(body))


def test_rank_long_history_is_truncated_to_the_most_recent(client, world):
    history = world.item_ids[20:30]
    candidates = world.item_ids[:6]
    long = _rank(client, {"history": history}, candidates)
    assert long["history"] == {"given": 10, "used": HISTORY, "truncated": True}
    _assert_close(_scores(long), _scores(_rank(client, {"history": history[-HISTORY:]}, candidates)))
    oldest = _rank(client, {"history": history[:HISTORY]}, candidates)  # not what was kept
    assert _max_diff(_scores(oldest), _scores(long)) > SCORE_ATOL
    short = _rank(client, {"history": history[:2]}, candidates)
    assert short["history"] == {"given": 2, "used": 2, "truncated": False}


def test_rank_top_n_is_a_prefix_and_numbers_are_ids(client, world):
    candidates = world.item_ids[10:22]
    full = _rank(client, {"id": world.user_ids[1]}, candidates)
    top = _rank(client, {"id": world.user_ids[1]}, candidates, top_n=3)
    assert [r["item_id"] for r in top["results"]] == [r["item_id"] for r in full["results"]][:3]
    as_numbers = _rank(client, {"id": world.user_ids[1]}, [int(c) for c in candidates], top_n=3)  # MovieLens-style ids
    _assert_close(_scores(as_numbers), _scores(top))


def test_rank_with_the_teacher(client, world):
    candidates = world.item_ids[:8]
    body = _rank(client, {"id": world.user_ids[2]}, candidates, model="teacher")
    assert body["model"] == "teacher"
    scores = [r["score"] for r in body["results"]]
    assert all(math.isfinite(s) for s in scores) and scores == sorted(scores, reverse=True)
    assert len(set(scores)) > 1  # it reads the item texts: different items, different scores


def test_rank_client_errors_name_field_value_and_limit(client, world):
    ids = world.item_ids
    post = lambda **body: client.post("/v1/rank", json={"user": {"id": world.user_ids[0]}, "candidates": ids[:3], **body})
    assert_client_error(post(candidates=[ids[0], "nope", ids[1]]), 404, "candidates[1]", "nope")
    assert_client_error(post(user={"id": "nobody"}), 404, "user.id", "nobody")
    assert_client_error(post(user={"history": [ids[0], "gone"]}), 404, "user.history[1]", "gone")
    assert_client_error(post(candidates=[]), 422, "candidates", 0, 1)
    assert_client_error(post(candidates=[f"x{i}" for i in range(MAX_CANDIDATES + 1)]), 422, "candidates",
                        MAX_CANDIDATES + 1, MAX_CANDIDATES)
    assert_client_error(post(candidates=[ids[0], ids[1], ids[0]]), 422, "candidates[2]", ids[0])
    assert_client_error(post(model="gpt-9"), 404, "model", "gpt-9")
    # wrong types and out-of-range numbers (pydantic), named the same way
    assert_client_error(post(candidates="100"), 422, "candidates")
    assert_client_error(post(candidates=[ids[0], {"id": 1}]), 422, "candidates[1]")
    assert_client_error(post(top_n="x"), 422, "top_n", "x")
    assert_client_error(post(top_n=0), 422, "top_n", 0, {"ge": 1})
    assert_client_error(post(user={"id": "u0", "history": [ids[0]]}), 422, "user")
    assert_client_error(post(user={}), 422, "user")
    assert_client_error(post(colour="blue"), 422, "colour", "blue")  # unknown fields are refused, not ignored
    assert_client_error(client.post("/v1/rank", json={"candidates": ids[:2]}), 422, "user")


def test_malformed_json_and_wrong_body_shapes(client):
    bad = client.post("/v1/rank", content=b'{"user": {"id": "u0"}, "candidates": [', headers={"content-type": "application/json"})
    error = assert_client_error(bad, 422, "body")
    assert error["type"] == "invalid_json" and "character" in error["message"]
    assert_client_error(client.post("/v1/rank", content=b"[1, 2]", headers={"content-type": "application/json"}), 422, "body")
    assert_client_error(client.post("/v1/rank", content=b"", headers={"content-type": "application/json"}), 422)


def test_oversized_bodies_are_413_with_the_limit(client):
    big = {"user": {"history": ["100"]}, "candidates": ["x" * 200] * (MAX_BODY // 200 + 5)}
    assert_client_error(client.post("/v1/rank", json=big), 413, limit=MAX_BODY)

    def chunks():  # no Content-Length: the limit is enforced while the body streams in
        for _ in range(MAX_BODY // 1000 + 5):
            yield b" " * 1000

    assert_client_error(client.post("/v1/rank", content=chunks(), headers={"content-type": "application/json"}), 413,
                        limit=MAX_BODY)
    assert client.get("/health").status_code == 200


# --- /v1/recommend -------------------------------------------------------------------------------
def test_recommend_retrieves_reranks_and_excludes_seen(client, world):
    user = world.user_ids[3]
    seen = _runtime(client).store.seen(user)
    response = client.post("/v1/recommend", json={"user": {"id": user}, "k": 5})
    body = response.json()
    assert response.status_code == 200 and len(body["results"]) == 5
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True) and all(math.isfinite(s) for s in scores)
    texts = dict(zip(world.item_ids, world.item_texts))
    assert all(r["text"] == texts[r["item_id"]] for r in body["results"])
    everything = _recommended(client, {"id": user}, exclude_seen=False)
    assert seen <= set(everything) and len(everything) == len(set(everything))  # k > catalog: every live item
    unseen = _recommended(client, {"id": user})
    assert not seen & set(unseen) and set(unseen) == set(everything) - seen
    history = world.item_ids[:3]
    anonymous = _recommended(client, {"history": history}, k=10)
    assert len(anonymous) == 10 and not set(history) & set(anonymous)
    assert len(_recommended(client, {"history": history}, k=3, model="teacher")) == 3


def test_recommend_client_errors(client, world):
    post = lambda **body: client.post("/v1/recommend", json={"user": {"id": world.user_ids[0]}, **body})
    assert_client_error(post(k=0), 422, "k", 0, {"ge": 1})
    assert_client_error(post(k=101), 400, "k", 101, 100)
    assert_client_error(post(exclude_seen="perhaps"), 422, "exclude_seen", "perhaps")
    assert_client_error(post(user={"id": "nobody"}), 404, "user.id", "nobody")
    assert_client_error(post(model="nope"), 404, "model", "nope")


# --- /v1/rerank ----------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["student", "teacher"])
def test_rerank_is_a_softmax_over_the_documents(client, model):
    documents = ["a quiet drama about a family", {"text": "an action film with car chases"}, "a comedy of errors", "a documentary"]
    response = client.post("/v1/rerank", json={"query": "likes comedies", "documents": documents, "model": model,
                                               "return_documents": True})
    body = response.json()
    assert response.status_code == 200 and body["model"] == model and body["id"]
    results = body["results"]
    assert sorted(r["index"] for r in results) == [0, 1, 2, 3]
    relevance = [r["relevance_score"] for r in results]
    assert abs(sum(relevance) - 1) < 1e-6 and all(0 < r < 1 for r in relevance)
    assert relevance == sorted(relevance, reverse=True)
    texts = [d if isinstance(d, str) else d["text"] for d in documents]
    assert all(r["document"]["text"] == texts[r["index"]] for r in results)
    top = client.post("/v1/rerank", json={"query": "likes comedies", "documents": documents, "model": model, "top_n": 2}).json()
    assert [r["index"] for r in top["results"]] == [r["index"] for r in results[:2]]
    assert all("document" not in r for r in top["results"])


def test_rerank_client_errors(client):
    post = lambda **body: client.post("/v1/rerank", json={"query": "q", "documents": ["a", "b"], **body})
    assert_client_error(post(documents=[]), 422, "documents")
    assert_client_error(post(documents=[f"d{i}" for i in range(MAX_CANDIDATES + 1)]), 422, "documents",
                        MAX_CANDIDATES + 1, MAX_CANDIDATES)
    assert_client_error(post(query=""), 422, "query")
    assert_client_error(post(documents=["a", None]), 422, "documents[1]")
    assert_client_error(post(documents=["a", {"text": ""}]), 422, "documents[1].document.text", "")
    assert_client_error(post(documents=["a", {"body": "b"}]), 422, "documents[1].document.text")
    assert_client_error(post(top_n=-1), 422, "top_n", -1)


# --- /v1/items -----------------------------------------------------------------------------------
def test_a_new_item_is_persisted_and_ranks_with_a_finite_score(client, world):
    runtime = _runtime(client)
    put = client.put("/v1/items/new-1", json={"text": world.item_texts[7] + " (director's cut)"})
    assert put.status_code == 201 and put.json()["created"] is True and put.json()["has_features"] is False
    row = put.json()["row"]
    assert row >= len(world.item_ids)
    assert runtime.store.get_item("new-1").text.endswith("(director's cut)")  # durable, not only cached
    got = client.get("/v1/items/new-1").json()
    assert got["text"] == put.json()["text"] and got["row"] == row
    # no SASRec vector: the student reads zeros there (COLD_RULE); the retriever a convex mix of
    # seed items' vectors (non-zero, inside the seed vectors' bounding box)
    student = runtime.catalog.students["student"]
    assert torch.equal(student.features[row, student.part("sasrec")], torch.zeros(SASREC_DIM))
    retrieved = runtime.catalog.retriever.item_vectors
    seed = retrieved[: len(world.item_ids)]
    assert retrieved[row].abs().sum() > 0 and (retrieved[row].abs() <= seed.abs().max(0).values + 1e-5).all()
    body = _rank(client, {"id": world.user_ids[0]}, ["new-1", *world.item_ids[:5]])
    assert all(math.isfinite(s) for s in _scores(body).values()) and "new-1" in _scores(body)
    assert "new-1" in _recommended(client, {"history": world.item_ids[:2]})


def test_item_changes_take_effect_on_the_next_request(client, world):
    candidates = ["edit-1", *world.item_ids[:4]]
    assert client.put("/v1/items/edit-1", json={"text": "a gentle comedy"}).status_code == 201
    before = {m: _scores(_rank(client, {"id": world.user_ids[0]}, candidates, model=m)) for m in ("student", "teacher")}
    again = client.put("/v1/items/edit-1", json={"text": "a brutal war epic with many explosions"})
    assert again.status_code == 200 and again.json().get("created") in (None, False)
    assert again.json()["version"] > 0
    for model in ("student", "teacher"):  # both the cached tokens (student) and the texts (teacher) changed
        after = _scores(_rank(client, {"id": world.user_ids[0]}, candidates, model=model))
        assert abs(after["edit-1"] - before[model]["edit-1"]) > SCORE_ATOL, model
        assert all(abs(after[i] - before[model][i]) <= SCORE_ATOL for i in world.item_ids[:4])  # others untouched


def test_item_features_from_the_client_are_used(client):
    vector = [0.1 * (i % 5) - 0.2 for i in range(SASREC_DIM)]
    put = client.put("/v1/items/feat-1", json={"text": "an item with a known vector", "features": vector})
    assert put.status_code == 201 and put.json()["has_features"] is True
    student = _runtime(client).catalog.students["student"]
    got = student.features[put.json()["row"], student.part("sasrec")]
    assert (got - torch.tensor(vector)).abs().max() < 1e-6
    assert_client_error(client.put("/v1/items/feat-2", json={"text": "x", "features": [1.0, 2.0]}), 422, "features", 2, SASREC_DIM)
    assert_client_error(client.put("/v1/items/feat-2", json={"text": "x", "features": ["a"] * SASREC_DIM}), 422, "features[0]", "a")
    assert_client_error(client.put("/v1/items/feat-2", json={"text": ""}), 422, "text", "")
    assert_client_error(client.put("/v1/items/feat-2", json={"words": "x"}), 422, "text")
    assert client.get("/v1/items/feat-2").status_code == 404  # nothing was stored by the failed writes


def test_delete_item(client, world):
    assert client.put("/v1/items/doomed", json={"text": world.item_texts[3]}).status_code == 201
    assert "doomed" in _recommended(client, {"history": world.item_ids[:2]})
    deleted = client.delete("/v1/items/doomed")
    assert deleted.status_code == 200 and deleted.json()["item_id"] == "doomed"
    assert_client_error(client.get("/v1/items/doomed"), 404, "item_id", "doomed")
    assert_client_error(client.delete("/v1/items/doomed"), 404, "item_id", "doomed")
    post = client.post("/v1/rank", json={"user": {"id": world.user_ids[0]}, "candidates": [world.item_ids[0], "doomed"]})
    assert_client_error(post, 404, "candidates[1]", "doomed")
    assert "doomed" not in _recommended(client, {"history": world.item_ids[:2]}, exclude_seen=False)
    assert_client_error(client.post("/v1/events", json={"user_id": "d-user", "item_id": "doomed"}), 404,
                        "events[0].item_id", "doomed")
    revived = client.put("/v1/items/doomed", json={"text": "back again"})
    assert revived.status_code == 201 and revived.json()["row"] == deleted.json()["row"]
    assert "doomed" in _scores(_rank(client, {"id": world.user_ids[0]}, ["doomed", world.item_ids[0]]))
    assert_client_error(client.get("/v1/items/never-was"), 404, "item_id", "never-was")


# --- /v1/events ----------------------------------------------------------------------------------
def test_events_create_users_and_change_the_next_response(client, world):
    ids = world.item_ids
    assert_client_error(client.post("/v1/rank", json={"user": {"id": "fresh"}, "candidates": ids[:3]}), 404, "user.id", "fresh")
    one = client.post("/v1/events", json={"user_id": "fresh", "item_id": ids[30], "timestamp": 10})
    assert one.status_code == 200 and one.json() == {"stored": 1, "users": ["fresh"]}
    candidates = ids[:6]
    first = _rank(client, {"id": "fresh"}, candidates)
    assert first["history"] == {"given": 1, "used": 1, "truncated": False}
    many = client.post("/v1/events", json=[{"user_id": "fresh", "item_id": ids[31], "timestamp": 11},
                                           {"user_id": "other", "item_id": ids[32]}])
    assert many.json() == {"stored": 2, "users": ["fresh", "other"]}
    second = _rank(client, {"id": "fresh"}, candidates)
    assert second["history"]["given"] == 2
    assert _max_diff(_scores(first), _scores(second)) > SCORE_ATOL  # the new event was read
    _assert_close(_scores(second), _scores(_rank(client, {"history": [ids[30], ids[31]]}, candidates)))
    assert ids[31] in _recommended(client, {"id": "fresh"}, exclude_seen=False)
    assert not {ids[30], ids[31]} & set(_recommended(client, {"id": "fresh"}))


def test_events_client_errors(client, world):
    post = lambda body: client.post("/v1/events", json=body)
    event = {"user_id": "e-user", "item_id": world.item_ids[0]}
    assert_client_error(post([]), 422, "events", 0, 1)
    assert_client_error(post([event] * (MAX_EVENTS + 1)), 422, "events", MAX_EVENTS + 1, MAX_EVENTS)
    assert_client_error(post([event, {**event, "item_id": "nope"}]), 404, "events[1].item_id", "nope")
    assert_client_error(post([event, {**event, "timestamp": -5}]), 422, "events[1].timestamp", -5, {"ge": 0.0})
    assert_client_error(post({**event, "timestamp": "yesterday"}), 422, "event.timestamp", "yesterday")
    assert_client_error(post({**event, "user_id": ""}), 422, "event.user_id", "")
    assert_client_error(post("click"), 422, "event")
    assert not _runtime(client).store.has_user("e-user")  # all or nothing: no partial batch was stored


# --- the service never runs the item encoder for known items -------------------------------------
def test_ranking_known_items_never_runs_the_item_encoder_or_projector(client, world, monkeypatch):
    model = _runtime(client).models["student"].ranker.model

    def fail(*args, **kwargs):
        raise AssertionError("the item encoder/projector ran for a cached item")

    monkeypatch.setattr(model.encoders["item"], "forward", fail)
    monkeypatch.setattr(model.projectors["item"], "forward", fail)
    with pytest.raises(AssertionError):  # the patch is in force
        model.encoders["item"](torch.zeros(1, 400))
    body = _rank(client, {"id": world.user_ids[4]}, world.item_ids[:10])
    assert len(body["results"]) == 10
    assert len(_recommended(client, {"id": world.user_ids[4]}, k=5)) == 5


# --- overload, the API key, metrics --------------------------------------------------------------
def test_overload_answers_503_with_retry_after_and_recovers(client, world, monkeypatch):
    ranking = _runtime(client).ranking
    original = ranking.run_batch
    gate = threading.Event()

    def slow_batch(model, batch):
        gate.wait(10)
        return original(model, batch)

    monkeypatch.setattr(ranking, "run_batch", slow_batch)
    body = {"user": {"id": world.user_ids[0]}, "candidates": world.item_ids[:4]}
    responses = []

    def call():
        responses.append(client.post("/v1/rank", json=body))

    threads = [threading.Thread(target=call) for _ in range(12)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    in_model = 4  # max_batch_size: the batch the worker took before it blocked
    while sum(r.status_code == 503 for r in responses) < 12 - in_model - MAX_QUEUE and time.monotonic() < deadline:
        time.sleep(0.01)  # one batch in the model, MAX_QUEUE waiting, every other request refused at once
    assert _runtime(client).models["student"].batcher.depth <= MAX_QUEUE
    gate.set()
    for t in threads:
        t.join(20)
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 503} and statuses.count(200) <= in_model + MAX_QUEUE, statuses
    for r in responses:
        if r.status_code == 503:
            assert r.json()["error"]["type"] == "overloaded" and int(r.headers["Retry-After"]) >= 1
    monkeypatch.setattr(ranking, "run_batch", original)
    assert client.post("/v1/rank", json=body).status_code == 200  # recovered once the load stopped
    assert _runtime(client).models["student"].batcher.depth == 0


def test_rerank_waits_in_the_same_bounded_queue(client, world, monkeypatch):
    """/v1/rerank goes through the model's batcher: with the model held, reranks beyond one batch plus
    MAX_QUEUE are refused at once with 503 + Retry-After (no unbounded backlog), the rest are served."""
    ranking = _runtime(client).ranking
    original = ranking.run_batch
    gate = threading.Event()

    def held_batch(model, batch):
        assert gate.wait(10)
        return original(model, batch)

    monkeypatch.setattr(ranking, "run_batch", held_batch)
    body = {"query": "a film", "documents": ["one", "two"]}
    responses = []
    threads = [threading.Thread(target=lambda: responses.append(client.post("/v1/rerank", json=body))) for _ in range(12)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while not any(r.status_code == 503 for r in responses) and time.monotonic() < deadline:
        time.sleep(0.01)
    gate.set()
    for t in threads:
        t.join(20)
    statuses = [r.status_code for r in responses]
    assert len(statuses) == 12 and set(statuses) == {200, 503}, statuses
    assert statuses.count(200) <= 4 + MAX_QUEUE  # one batch (max_batch_size 4) in the model + the queue
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.json()["error"]["type"] == "overloaded" and int(refused.headers["Retry-After"]) >= 1


def test_health_answers_while_the_model_is_busy(client, world, monkeypatch):
    """Model work runs off the event loop: while a forward is in progress (held open here until
    /health has answered), /health, /ready and a catalog read still answer. If any of them waited
    for the model, the gate would never open and the test would fail on the 10 s waits, not hang."""
    ranking = _runtime(client).ranking
    original = ranking.run_batch
    inside, gate = threading.Event(), threading.Event()

    def held_batch(model, batch):
        inside.set()
        assert gate.wait(10), "the gate never opened: /health waited for the model"
        return original(model, batch)

    monkeypatch.setattr(ranking, "run_batch", held_batch)
    result = {}
    worker = threading.Thread(target=lambda: result.update(response=client.post(
        "/v1/rank", json={"user": {"id": world.user_ids[0]}, "candidates": world.item_ids[:4]})))
    worker.start()
    assert inside.wait(10)  # the batch has started and holds the model thread
    try:
        assert client.get("/health").status_code == 200
        assert client.get("/ready").status_code == 200
        assert client.get(f"/v1/items/{world.item_ids[0]}").status_code == 200
    finally:
        gate.set()
        worker.join(20)
    assert result["response"].status_code == 200


def test_api_key_guards_every_route_but_health_and_ready(world, tmp_path):
    gate = threading.Event()  # the runtime never loads: the key is checked before anything else
    settings = world.settings(tmp_path / "store.sqlite", api_key="s3cret")
    with TestClient(create_app(settings, load=lambda s: gate.wait(30))) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/ready").status_code == 503  # open, and not ready
        routes = [("get", "/v1/models"), ("get", "/metrics"), ("post", "/v1/rank"), ("post", "/v1/recommend"),
                  ("post", "/v1/rerank"), ("put", "/v1/items/1"), ("get", "/v1/items/1"), ("delete", "/v1/items/1"),
                  ("post", "/v1/events"), ("get", "/docs"), ("get", "/nowhere")]
        for method, path in routes:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                response = client.request(method, path, headers=headers)
                assert_client_error(response, 401, "Authorization")
                assert response.headers["WWW-Authenticate"] == "Bearer"
        authorised = client.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert authorised.status_code == 503 and authorised.json()["error"]["type"] == "not_ready"
        assert client.get("/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        gate.set()


def test_metrics_count_requests_and_report_batches_queues_caches_and_load(client, world):
    before = _metric_samples(client)
    _rank(client, {"id": world.user_ids[0]}, world.item_ids[:3])
    client.post("/v1/rank", json={"user": {"id": "nobody"}, "candidates": world.item_ids[:3]})
    after = _metric_samples(client)
    ok = ("mixllm_requests_total", (("method", "POST"), ("route", "/v1/rank"), ("status", "200")))
    missing = ("mixllm_requests_total", (("method", "POST"), ("route", "/v1/rank"), ("status", "404")))
    assert after[ok] - before.get(ok, 0) == 1 and after[missing] - before.get(missing, 0) == 1
    latency = ("mixllm_request_duration_seconds_count", ok[1])
    assert after[latency] - before.get(latency, 0) == 1
    assert any(name == "mixllm_request_duration_seconds_bucket" and dict(labels).get("le") == "+Inf"
               and dict(labels)["route"] == "/v1/rank" for name, labels in after)
    assert after[("mixllm_batch_size_count", (("model", "student"),))] >= 1
    assert ("mixllm_queue_depth", (("model", "student"),)) in after
    assert after[("mixllm_item_cache_rows", (("model", "student"),))] >= len(world.item_ids)
    assert after[("mixllm_model_load_seconds", (("model", "teacher"),))] > 0
    client.get("/v1/items/definitely-unknown")
    templated = _metric_samples(client)  # labelled by the route template, not the raw path
    assert ("mixllm_requests_total", (("method", "GET"), ("route", "/v1/items/{item_id}"), ("status", "404"))) in templated


def _metric_samples(client) -> dict:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}
