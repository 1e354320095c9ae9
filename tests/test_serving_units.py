"""The service's plain classes without HTTP: MicroBatcher, Settings, the catalog's new-item imputation."""

from __future__ import annotations

import asyncio
import math
import threading
import time

import pytest
import torch

from serving.batching import MicroBatcher, Overloaded
from mixllm.features import NEIGHBOURS, neighbour_weights
from serving.services import softmax
from serving.settings import Settings, SettingsError
from serving_world import SASREC_DIM, fake_encode, session_world


# --- MicroBatcher --------------------------------------------------------------------------------
def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_batcher_gathers_concurrent_submits_up_to_max_batch_size():
    calls = []

    def fn(items):
        calls.append(list(items))
        return [x * 10 for x in items]

    async def main():
        batcher = MicroBatcher(fn, "m", max_batch_size=4, max_wait_ms=200, max_queue=64)
        batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(i) for i in range(10)))
        finally:
            await batcher.stop()

    assert _run(main()) == [i * 10 for i in range(10)]  # each caller gets its own result back
    assert [len(c) for c in calls] == [4, 4, 2] and sorted(x for c in calls for x in c) == list(range(10))


def test_batcher_waits_for_company_only_under_concurrent_load():
    """One request at a time: no wait. After a batch of several: it waits wait_fraction of the last
    call's duration (capped by max_wait_ms) for company. Lower bounds are exact (a timer never fires
    early); upper bounds are generous, so a slow machine cannot fail the test."""
    sizes = []

    def fn(items):
        time.sleep(0.2)  # the "forward"
        sizes.append(len(items))
        return items

    async def lone_after(batcher, first_batch: int) -> float:
        await asyncio.gather(*(batcher.submit(i) for i in range(first_batch)))
        start = time.perf_counter()
        await batcher.submit(99)
        return time.perf_counter() - start - 0.2  # minus the call itself: the wait for company

    async def main(first_batch: int, max_wait_ms: float) -> tuple[float, float]:
        batcher = MicroBatcher(fn, "m", max_batch_size=8, max_wait_ms=max_wait_ms, wait_fraction=0.5)
        batcher.start()
        try:
            waited = await lone_after(batcher, first_batch)
            return waited, batcher.wait_s
        finally:
            await batcher.stop()

    waited, next_wait = _run(main(first_batch=1, max_wait_ms=1000))
    assert next_wait == 0.0 and waited < 0.1 and sizes == [1, 1]  # requests one at a time: no waiting
    sizes.clear()
    waited, _ = _run(main(first_batch=3, max_wait_ms=1000))
    assert sizes == [3, 1] and 0.1 <= waited < 5  # after a batch of 3: waits 0.5 x 0.2 s for company

    async def wait_after_a_batch(max_wait_ms: float) -> float:
        batcher = MicroBatcher(fn, "m", max_batch_size=8, max_wait_ms=max_wait_ms, wait_fraction=0.5)
        batcher.start()
        try:
            await asyncio.gather(*(batcher.submit(i) for i in range(3)))
            return batcher.wait_s
        finally:
            await batcher.stop()

    assert _run(wait_after_a_batch(20)) == 0.02  # the cap: 0.5 x 0.2 s would be 0.1 s
    assert _run(wait_after_a_batch(1000)) >= 0.1  # the fraction: 0.5 x (>= 0.2 s)


def test_batcher_runs_once_the_expected_company_has_arrived():
    """After a batch of 3, three new requests run together at once: the batch does not sit out its
    wait for company (0.5 s here). A batch that waited would take >= 0.5 s wait + 0.5 s call, so
    finishing in < 0.95 s leaves 0.45 s of slack for scheduling and proves it did not wait."""
    sizes = []

    def fn(items):
        time.sleep(0.5)
        sizes.append(len(items))
        return items

    async def main() -> float:
        batcher = MicroBatcher(fn, "m", max_batch_size=8, max_wait_ms=5000, wait_fraction=1.0)
        batcher.start()
        try:
            await asyncio.gather(*(batcher.submit(i) for i in range(3)))
            assert batcher.expected == 3 and batcher.wait_s >= 0.5
            start = time.perf_counter()
            await asyncio.gather(*(batcher.submit(i) for i in range(3)))
            return time.perf_counter() - start
        finally:
            await batcher.stop()

    elapsed = _run(main())
    assert sizes == [3, 3] and elapsed < 0.95, (sizes, elapsed)


def test_batcher_raises_overloaded_when_the_queue_is_full_and_recovers():
    release = threading.Event()

    def fn(items):
        release.wait(10)
        return items

    async def main():
        batcher = MicroBatcher(fn, "m", max_batch_size=1, max_wait_ms=0, max_queue=2)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit("running"))
        await asyncio.sleep(0.05)  # the worker took it and blocks in fn
        waiting = [asyncio.ensure_future(batcher.submit(f"w{i}")) for i in range(2)]
        await asyncio.sleep(0.01)
        assert batcher.depth == 2
        with pytest.raises(Overloaded) as refused:
            await batcher.submit("one too many")
        assert refused.value.retry_after_s >= 1 and "max_queue" in str(refused.value)
        release.set()
        done = await asyncio.gather(first, *waiting)
        after = await batcher.submit("later")  # the load stopped: accepted again
        await batcher.stop()
        return done, after, batcher.depth

    done, after, depth = _run(main())
    assert done == ["running", "w0", "w1"] and after == "later" and depth == 0


def test_a_failing_batch_fails_its_requests_only():
    def fn(items):
        if "boom" in items:
            raise RuntimeError("the model failed")
        return [ValueError(f"bad {x}") if x.startswith("bad") else x.upper() for x in items]

    async def main():
        batcher = MicroBatcher(fn, "m", max_batch_size=2, max_wait_ms=50)
        batcher.start()
        outcomes = await asyncio.gather(batcher.submit("boom"), batcher.submit("x"),  # one batch: both fail
                                        batcher.submit("bad1"), batcher.submit("y"),  # one slot fails alone
                                        return_exceptions=True)
        later = await batcher.submit("z")  # the worker survived
        await batcher.stop()
        return outcomes, later

    outcomes, later = _run(main())
    assert [type(o).__name__ for o in outcomes] == ["RuntimeError", "RuntimeError", "ValueError", "str"]
    assert outcomes[3] == "Y" and later == "Z"


def test_batcher_must_be_started():
    with pytest.raises(RuntimeError, match="not started"):
        _run(MicroBatcher(lambda items: items, "m").submit(1))


def test_softmax_sums_to_one_and_keeps_order():
    probs = softmax([1000.0, 999.0, -5.0])  # large scores: no overflow
    assert abs(sum(probs) - 1) < 1e-12 and probs[0] > probs[1] > probs[2]
    assert abs(probs[0] / probs[1] - math.e) < 1e-9


# --- Settings ------------------------------------------------------------------------------------
def test_settings_from_env_parses_every_kind_and_overrides_win():
    env = {"MIXLLM_MAX_BATCH_SIZE": "16", "MIXLLM_MAX_WAIT_MS": "0.5", "MIXLLM_WARMUP": "false", "MIXLLM_PORT": "9000",
           "MIXLLM_CHECKPOINT": "a=/x,b=/y", "MIXLLM_API_KEY": "k", "UNRELATED": "1"}
    settings = Settings.from_env(env, port=9100, threads=None)
    assert (settings.max_batch_size, settings.max_wait_ms, settings.warmup, settings.api_key) == (16, 0.5, False, "k")
    assert settings.port == 9100  # an override beats the variable; a None override does not count
    assert {k: str(v) for k, v in settings.models.items()} == {"a": "/x", "b": "/y"}
    assert Settings.from_env({}).max_batch_size == Settings().max_batch_size


@pytest.mark.parametrize("name, raw, message", [
    ("MIXLLM_MAX_BATCH_SIZE", "lots", "MIXLLM_MAX_BATCH_SIZE: cannot read 'lots'"),
    ("MIXLLM_MAX_BATCH_SIZE", "0", "--max-batch-size / MIXLLM_MAX_BATCH_SIZE: must be an integer >= 1, got 0"),
    ("MIXLLM_MAX_WAIT_MS", "fast", "MIXLLM_MAX_WAIT_MS: cannot read 'fast'"),
    ("MIXLLM_MAX_WAIT_MS", "5000", "--max-wait-ms / MIXLLM_MAX_WAIT_MS: must be between 0 and 1000"),
    ("MIXLLM_WARMUP", "maybe", "MIXLLM_WARMUP: cannot read 'maybe'"),
    ("MIXLLM_DEVICE", "tpu", "--device: must be auto, cpu or cuda, got 'tpu'"),
    ("MIXLLM_MAX_BODY_BYTES", "-1", "MIXLLM_MAX_BODY_BYTES"),
])  # fmt: skip
def test_settings_errors_name_the_variable(name, raw, message):
    with pytest.raises(SettingsError) as error:
        Settings.from_env({name: raw})
    assert message in str(error.value)


def test_settings_model_names():
    assert list(Settings(checkpoint=["/ckpt/student", "t=/ckpt/teacher"]).models) == ["student", "t"]
    with pytest.raises(SettingsError, match="--checkpoint: model names must be unique"):
        Settings(checkpoint=["a=/x", "a=/y"]).models
    with pytest.raises(SettingsError, match="--checkpoint"):
        Settings(checkpoint=[])


# --- the catalog: items the collaborative model never saw ----------------------------------------
def test_neighbour_weights_by_hand():
    keys = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]), dim=-1)
    query = torch.nn.functional.normalize(torch.tensor([[3.0, 1.0]]), dim=-1)
    rows, weights = neighbour_weights(query, keys, k=2)
    cos = torch.tensor([3.0, 1.0]) / math.sqrt(10)  # cos with keys 0 and 1
    assert rows.tolist() == [[0, 1]] and torch.allclose(weights[0], cos / cos.sum(), atol=1e-6)
    _, uniform = neighbour_weights(torch.tensor([[0.0, -1.0]]), keys[[1]], k=1)  # no positive neighbour
    assert uniform.tolist() == [[1.0]]


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    from serving.runtime import load_runtime

    world = session_world(tmp_path_factory)
    settings = world.settings(tmp_path_factory.mktemp("units") / "store.sqlite", checkpoint=[f"student={world.student}"])
    runtime = load_runtime(settings, encode_texts=fake_encode)
    yield runtime
    runtime.store.close()


def test_a_new_item_reads_zeros_in_the_student_and_the_neighbour_mean_in_the_retriever(runtime):
    catalog = runtime.catalog
    student = catalog.students["student"]
    collab = student.part("sasrec")
    text = "Item 3; genres: Action (remastered)"
    item, created = catalog.upsert("fresh", text)
    assert created and item.row == catalog.num_seed
    # expected, computed independently: the NEIGHBOURS seed items whose texts are most cosine-similar
    vector = fake_encode([text])[0]
    seed_vectors = fake_encode(catalog.seed_texts)
    sims = seed_vectors @ vector
    top = sims.topk(NEIGHBOURS)
    weights = top.values.clamp(min=0)
    weights = weights / weights.sum() if weights.sum() > 0 else torch.full_like(weights, 1 / NEIGHBOURS)
    expected = (weights[:, None] * student.seed_features[top.indices][:, collab]).sum(0)
    # the student reads its text vector and a zero collaborative part (serving.catalog.COLD_RULE)
    assert torch.equal(student.features[item.row, collab], torch.zeros(SASREC_DIM))
    torch.testing.assert_close(student.features[item.row, : collab.start], vector, atol=1e-6, rtol=0)
    # the retriever's vector is the neighbours' mix of the seed items' retriever vectors (= the
    # student's columns in this world), so users of similar items retrieve it
    torch.testing.assert_close(catalog.retriever.item_vectors[item.row], expected, atol=1e-5, rtol=0)
    # and its tokens are in the cache the student ranks with: a finite score among seed items
    from mixllm.ranking import RankingRequest

    model = runtime.models["student"]
    (scores, _), = runtime.ranking.run_batch(model, [RankingRequest([0, 1], [item.row, 2, 3])])
    assert torch.isfinite(scores).all() and scores.shape == (3,)


def test_client_features_replace_the_imputation_in_both_spaces(runtime):
    catalog = runtime.catalog
    student = catalog.students["student"]
    assert catalog.same_space(student)  # the world's student reads SASRec's own item vectors
    given = torch.linspace(-1, 1, SASREC_DIM)
    item, _ = catalog.upsert("given", "Item 5; genres: Drama", given.tolist())
    torch.testing.assert_close(student.features[item.row, student.part("sasrec")], given, atol=1e-6, rtol=0)
    torch.testing.assert_close(catalog.retriever.item_vectors[item.row], given, atol=1e-6, rtol=0)


def test_changing_a_seed_items_text_rederives_it_and_deleting_hides_it(runtime):
    catalog = runtime.catalog
    student = catalog.students["student"]
    row = catalog.row_of[catalog.item_ids[4]]
    stored = student.seed_features[row].clone()
    assert torch.equal(student.features[row], stored)  # an untouched seed item keeps its exact stored row
    catalog.upsert(catalog.item_ids[4], "a completely different text")
    assert not torch.allclose(student.features[row], stored, atol=1e-3)
    catalog.delete(catalog.item_ids[4])
    assert not catalog.live[row]
    from serving.errors import NotFound

    with pytest.raises(NotFound) as error:
        catalog.rows([catalog.item_ids[0], catalog.item_ids[4]], "candidates")
    assert error.value.field == "candidates[1]"


def test_a_replica_on_the_same_store_sees_another_replicas_item_writes(tmp_path_factory):
    """Scale-out: two runtimes (replicas) over one SQLite file; a write through one is served by the
    other after its per-request refresh (by catalog version), caches included."""
    from serving.runtime import load_runtime

    world = session_world(tmp_path_factory)
    settings = world.settings(tmp_path_factory.mktemp("replicas") / "store.sqlite", checkpoint=[f"student={world.student}"])
    first, second = load_runtime(settings, encode_texts=fake_encode), load_runtime(settings, encode_texts=fake_encode)
    try:
        item, _ = first.catalog.upsert("from-replica-1", "Item 7; genres: Comedy (extended)")
        first.catalog.delete(world.item_ids[2])
        assert "from-replica-1" not in second.catalog.row_of  # not yet: the second replica has not looked
        second.catalog.refresh()
        assert second.catalog.row_of["from-replica-1"] == item.row
        assert not second.catalog.live[second.catalog.row_of[world.item_ids[2]]]
        a, b = first.catalog.students["student"], second.catalog.students["student"]
        # the same derivation from the same store rows: equal up to float32 rounding of one einsum
        torch.testing.assert_close(b.features[item.row], a.features[item.row], atol=1e-6, rtol=0)
        torch.testing.assert_close(b.ranker.token_cache.gather(torch.tensor([item.row])),
                                   a.ranker.token_cache.gather(torch.tensor([item.row])), atol=1e-5, rtol=0)
        torch.testing.assert_close(second.catalog.retriever.item_vectors[item.row],
                                   first.catalog.retriever.item_vectors[item.row], atol=1e-6, rtol=0)
        version = second.catalog.version
        second.catalog.refresh()  # nothing new: no change
        assert second.catalog.version == version
    finally:
        first.store.close()
        second.store.close()
