"""The real ``mixllm serve`` process: it answers /ready and /v1/rank, and every write it acknowledged
survives SIGKILL at a random moment (several rounds). Loads the packaged MiniLM (a few seconds)."""

from __future__ import annotations

import random
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from serving.process import free_port, running_server, wait_ready
from serving_world import session_world

START_TIMEOUT_S = 180.0
ROUNDS = 3


@contextmanager
def serve(world, store: Path, log: Path):
    """A ready ``mixllm serve`` on a free loopback port (serving.process, as the demo and the benchmark
    start theirs); stopped on the way out if the test has not killed it."""
    port = free_port()
    with running_server([*world.serve_args(store, port), "--warmup", "false"], log) as process:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            wait_ready(f"http://127.0.0.1:{port}", process, START_TIMEOUT_S, log)
            yield process, client


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return session_world(tmp_path_factory)


def _check_serves_rank(world, client) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    candidates = world.item_ids[:5]
    response = client.post("/v1/rank", json={"user": {"id": world.user_ids[0]}, "candidates": candidates})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert sorted(r["item_id"] for r in results) == sorted(candidates)
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    bad = client.post("/v1/rank", json={"user": {"id": "nobody"}, "candidates": candidates})
    assert bad.status_code == 404 and bad.json()["error"]["field"] == "user.id"


def test_mixllm_serve_answers_and_acknowledged_writes_survive_sigkill(world, tmp_path):
    """``mixllm serve`` gets ready and answers /v1/rank; then, ROUNDS times: stream item upserts and
    events, SIGKILL the server at a random moment, restart it on the same store, and check that every
    write it acknowledged (2xx) is served. (One test, so the ~10 s process start is paid 4 times, not 5.)"""
    rng = random.Random(0)
    store, log = tmp_path / "store.sqlite", tmp_path / "serve.log"
    items: dict[str, str] = {}  # acknowledged item id -> text
    events: dict[str, list[str]] = {}  # acknowledged user id -> item ids, in order
    for round_ in range(ROUNDS + 1):
        with serve(world, store, log) as (process, client):
            if round_ == 0:
                _check_serves_rank(world, client)
            _check_acknowledged(client, items, events)
            if round_ == ROUNDS:
                break
            kill_after = rng.uniform(0.3, 1.5)
            threading.Timer(kill_after, lambda p=process: p.send_signal(signal.SIGKILL)).start()
            written = _stream_writes(client, round_, items, events, rng)
            process.wait(30)
            assert process.returncode == -signal.SIGKILL
            assert written > 0, "the kill came before any write was acknowledged; the round tested nothing"


def _stream_writes(client, round_: int, items: dict, events: dict, rng: random.Random) -> int:
    """Write until the server dies; record exactly the writes it acknowledged."""
    seed_items = list(items)
    written = 0
    for i in range(100_000):
        try:
            if i % 2 == 0:
                item_id, text = f"r{round_}-item{i}", f"Item written in round {round_}, number {i}"
                response = client.put(f"/v1/items/{item_id}", json={"text": text})
                if response.is_success:
                    items[item_id] = text
                    seed_items.append(item_id)
            else:
                user_id = f"r{round_}-user{i % 6}"
                item_id = rng.choice(seed_items[-5:]) if seed_items and rng.random() < 0.5 else str(100 + rng.randrange(40))
                response = client.post("/v1/events", json={"user_id": user_id, "item_id": item_id})
                if response.is_success:
                    events.setdefault(user_id, []).append(item_id)
            assert response.is_success, response.text
            written += 1
        except httpx.TransportError:
            return written
    raise AssertionError("the server was never killed")


def _check_acknowledged(client, items: dict, events: dict) -> None:
    for item_id, text in items.items():
        response = client.get(f"/v1/items/{item_id}")
        assert response.status_code == 200 and response.json()["text"] == text, (item_id, response.text)
    for user_id, seen in events.items():
        response = client.post("/v1/rank", json={"user": {"id": user_id}, "candidates": [seen[-1]]})
        assert response.status_code == 200, response.text
        # >=: a write may commit and the process die before the answer is sent (then it was not acknowledged)
        assert response.json()["history"]["given"] >= len(seen), (user_id, response.json(), seen)
        recommended = client.post("/v1/recommend", json={"user": {"id": user_id}, "k": 10}).json()["results"]
        assert not set(seen) & {r["item_id"] for r in recommended}, (user_id, seen)
