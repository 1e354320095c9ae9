"""Serving a fused ranker (score + gate * SASRec score): rank and recommend add the retriever's scores,
rerank of outside documents scores them with the ranker alone (they have no SASRec vector), and a fused checkpoint without --sasrec is a
clear start-up error."""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient

from mixllm.baselines.sasrec import SASRec
from mixllm.errors import DataError
from mixllm.ranking import MixLLMRanker
from mixllm.retrieval import FaissRetriever
from serving.app import create_app
from serving.runtime import load_runtime
from serving_world import SASREC_DIM, assert_client_error, fake_encode, session_world, wait_ready

GATE = 0.75


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return session_world(tmp_path_factory)


@pytest.fixture(scope="module")
def fused_path(world, tmp_path_factory):
    """The world's student with score fusion, gate 0.75 (its base LLM stays the world's, referenced)."""
    ranker = MixLLMRanker.from_pretrained(world.student)
    ranker.fusion_gate = torch.nn.Parameter(torch.tensor(GATE))
    path = tmp_path_factory.mktemp("fused") / "ranker"
    provenance = json.loads((world.student / "training_run.json").read_text())  # the student's own record
    ranker.save_pretrained(path, provenance=provenance)
    (path / "training_run.json").write_text(json.dumps(provenance))  # as training and training.fit_fusion write it
    return path


@pytest.fixture(scope="module")
def client(world, fused_path, tmp_path_factory):
    settings = world.settings(tmp_path_factory.mktemp("fused_app") / "store.sqlite",
                              checkpoint=[f"student={world.student}", f"fused={fused_path}"], retrieve=10)  # fmt: skip
    with TestClient(create_app(settings, load=lambda s: load_runtime(s, encode_texts=fake_encode))) as client:
        wait_ready(client)
        yield client


def _scores(client, model, user, candidates):
    response = client.post("/v1/rank", json={"user": user, "candidates": candidates, "model": model})
    assert response.status_code == 200, response.text
    return {r["item_id"]: r["score"] for r in response.json()["results"]}


def test_fused_rank_is_the_student_plus_the_gated_sasrec_score(client, world):
    user, candidates = world.user_ids[0], world.item_ids[:8]
    alone, fused = _scores(client, "student", {"id": user}, candidates), _scores(client, "fused", {"id": user}, candidates)
    runtime = client.app.state.runtime
    retriever: FaissRetriever = runtime.catalog.retriever
    context = runtime.ranking.user_context(user, None, runtime.models["fused"].max_history)
    rows = runtime.catalog.rows(candidates, "candidates")
    sasrec = retriever.candidate_scores(context.retrieval_history(), torch.as_tensor([rows]))[0]
    expected = {item: alone[item] + GATE * float(s) for item, s in zip(candidates, sasrec)}
    assert max(abs(fused[k] - expected[k]) for k in candidates) < 1e-4
    assert max(abs(fused[k] - alone[k]) for k in candidates) > 1e-3  # the SASRec term is really there
    # the retriever read SASRec's own history length, not the ranker's H
    assert len(context.retrieval_rows) > len(context.rows) or len(context.retrieval_rows) == context.given
    assert isinstance(retriever.sasrec, SASRec)


def test_fused_recommend_works_and_rerank_of_outside_documents_uses_the_ranker_alone(client, world):
    response = client.post("/v1/recommend", json={"user": {"id": world.user_ids[1]}, "k": 5, "model": "fused"})
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == 5
    body = {"query": "a film about the sea", "documents": ["one", "two", "Finding Nemo (2003)"]}
    fused = client.post("/v1/rerank", json={**body, "model": "fused"})
    alone = client.post("/v1/rerank", json={**body, "model": "student"})
    assert fused.status_code == 200 and alone.status_code == 200, (fused.text, alone.text)
    # no SASRec vector outside the catalog: score + gate * 0, the same relevance as the unfused student
    by_index = [{r["index"]: r["relevance_score"] for r in b.json()["results"]} for b in (fused, alone)]
    assert max(abs(by_index[0][i] - by_index[1][i]) for i in range(3)) < 1e-5


def test_a_request_with_a_cold_candidate_is_scored_by_the_ranker_alone(client, world):
    """A new item without a collaborative vector turns fusion off for its request (SASRec's score of a
    stand-in vector would bury it); one whose client gave its vector is warm and fused as usual."""
    assert client.put("/v1/items/cold-1", json={"text": world.item_texts[3] + " (remastered)"}).status_code == 201
    vector = [0.1 * (i % 5) for i in range(SASREC_DIM)]
    assert client.put("/v1/items/given-1", json={"text": "a film with a known vector", "features": vector}).status_code == 201
    user = {"id": world.user_ids[2]}
    for new_item, fused_as_usual in (("cold-1", False), ("given-1", True)):
        candidates = [new_item, *world.item_ids[:5]]
        alone, fused = _scores(client, "student", user, candidates), _scores(client, "fused", user, candidates)
        gap = max(abs(fused[k] - alone[k]) for k in candidates)
        assert (gap > 1e-3) if fused_as_usual else (gap < 1e-5), (new_item, gap)
    warm = world.item_ids[:6]  # without the new item, the same user's request is fused again
    alone, fused = _scores(client, "student", user, warm), _scores(client, "fused", user, warm)
    assert max(abs(fused[k] - alone[k]) for k in warm) > 1e-3


def test_a_fused_checkpoint_without_sasrec_does_not_start(world, fused_path, tmp_path):
    settings = world.settings(tmp_path / "store.sqlite", checkpoint=[f"fused={fused_path}"], sasrec="")
    with pytest.raises(DataError, match="fused=.* --sasrec|--checkpoint fused: .*--sasrec"):
        load_runtime(settings, encode_texts=fake_encode)


def test_the_benchmarks_bare_scorer_of_a_fused_model_matches_the_service(client, world, fused_path):
    """serving.bench.FusedBare adds SASRec's candidate scores as the service does: same scores as /v1/rank."""
    from mixllm.ranking import ItemCatalog, RankingRequest
    from serving.bench import FusedBare, load_bare

    runtime = client.app.state.runtime
    history, candidates = world.item_ids[10:14], world.item_ids[:6]
    response = client.post("/v1/rank", json={"user": {"history": history}, "candidates": candidates, "model": "fused"})
    assert response.status_code == 200, response.text
    served = {r["item_id"]: r["score"] for r in response.json()["results"]}
    ranker = MixLLMRanker.from_pretrained(fused_path, ItemCatalog(features=runtime.catalog.students["fused"].features))
    bare = FusedBare(ranker.eval(), runtime.catalog.retriever)
    rows = RankingRequest(runtime.catalog.rows(history, "history"), runtime.catalog.rows(candidates, "candidates"))
    with torch.inference_mode():
        scores = bare.score([rows])[0]
    assert max(abs(float(scores[i]) - served[c]) for i, c in enumerate(candidates)) < 1e-3
    assert rows.retriever_scores is None  # the shared request is left as it was (unfused models score it too)
    with pytest.raises(Exception, match="--sasrec"):
        load_bare("fused", fused_path, torch.device("cpu"), list(world.item_texts), sasrec="")
