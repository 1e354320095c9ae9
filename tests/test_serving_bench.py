"""serving.bench's pure parts: percentiles, level figures, targets, the plan, the markdown. No server."""

from __future__ import annotations

import numpy as np
import pytest

from serving.bench import (
    CHAT, MARK_BEGIN, MARK_END, RANK, RECOMMEND, bare_figures, bare_workload, check_targets, halves, batch_mean,
    percentile, plan_levels, render_markdown, summarize, update_section,
)  # fmt: skip
from serving.metrics import Metrics


def test_percentile_hand_computed_and_matches_numpy():
    assert percentile([4, 1, 3, 2], 50) == 2.5  # rank 1.5 of 1,2,3,4
    assert percentile([4, 1, 3, 2], 0) == 1 and percentile([4, 1, 3, 2], 100) == 4
    assert percentile(list(range(1, 102)), 99) == 100  # rank 99 of 1..101
    assert percentile([7.0], 99) == 7.0
    values = np.random.default_rng(0).exponential(size=37).tolist()
    for q in (1, 50, 90, 99):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q), rel=1e-12)
    with pytest.raises(ValueError):
        percentile([], 50)


def test_summarize_units_and_rate():
    row = summarize([0.1, 0.3, 0.2], wall_s=0.5, errors={"503": 1})
    assert row["n"] == 3 and row["errors"] == {"503": 1}
    assert row["p50_ms"] == pytest.approx(200) and row["mean_ms"] == pytest.approx(200)
    assert row["requests_per_s"] == pytest.approx(6.0)  # successes only, over the wall time
    empty = summarize([], wall_s=1.0, errors={"ConnectError": 4})
    assert empty["p50_ms"] is None and empty["requests_per_s"] is None


def _row(model, endpoint, concurrency, p50, rps):
    return {"model": model, "endpoint": endpoint, "concurrency": concurrency, "n": 10, "p50_ms": p50, "p99_ms": p50 * 2,
            "requests_per_s": rps, "errors": {}, "mean_batch_size": 1.0}


def _report(device="cpu", teacher_levels=(1, 8)):
    service = [_row("s", RANK, 1, 120.0, 8.0), _row("s", RANK, 8, 300.0, 20.0), _row("s", RECOMMEND, 1, 400.0, 2.5)]
    service += [_row("t", RANK, c, 2000.0, 2.0 if c == 8 else 0.5) for c in teacher_levels]
    bare = {"s": bare_figures({"single_s": [0.1] * 4, "batch_s": [0.4, 0.4], "batch_sizes": [8, 8]}),
            "t": bare_figures({"single_s": [2.0] * 2, "batch_s": [16.0], "batch_sizes": [8]})}
    return {
        "command": "python -m serving.bench", "date": "2025-01-01", "git_revision": "abc1234",
        "machine": {"cpu": "Test CPU", "cpu_count": 2, "gpu": None, "device": device, "python": "3.11", "torch": "2.x",
                    "load_average_before": 1.5},
        "models": {"student": "s", "teacher": "t"}, "models_served": {"s": "student", "t": "teacher"},
        "setup": {"requests": "some users", "client": "httpx", "threads": 1, "dtype": "fp32", "max_batch_size": 8,
                  "max_wait_ms": 2.0, "bare_item_path": "token cache"},
        "service": service, "bare": bare, "notes": ["A note."],
    }  # fmt: skip


def test_bare_figures_rate_is_requests_over_summed_batch_time():
    figures = bare_figures({"single_s": [0.1, 0.3], "batch_s": [0.4, 0.6], "batch_sizes": [8, 8]})
    assert figures["batched"]["requests_per_s"] == pytest.approx(16.0)  # 16 requests in 1.0 s
    assert figures["batched"]["median_batch_ms"] == pytest.approx(500)
    assert figures["single"]["p50_ms"] == pytest.approx(200)


def test_targets_compare_the_right_figures():
    targets = check_targets(_report())
    latency = targets["student_latency_c1"]
    assert latency["value"] == pytest.approx(1.2) and latency["met"] is True  # 120 ms vs the bare 100 ms
    throughput = targets["student_throughput_c8"]
    assert throughput["value"] == pytest.approx(1.0) and throughput["met"] is True  # 20/s vs the bare 8 / 0.4 s
    versus = targets["student_vs_teacher"]
    assert versus["concurrency"] == 8 and versus["value"] == pytest.approx(10.0) and versus["met"] is True
    assert "gpu_p50_c1_ms" not in targets


def test_targets_not_met_or_not_measured():
    report = _report(teacher_levels=(1,))
    report["service"][0]["p50_ms"] = 140.0  # 1.4x the bare p50
    targets = check_targets(report)
    assert targets["student_latency_c1"]["met"] is False
    assert targets["student_vs_teacher"]["concurrency"] == 1  # the only level both ran
    assert targets["student_vs_teacher"]["value"] == pytest.approx(8.0 / 0.5)
    gpu = check_targets(_report(device="cuda"))
    assert gpu["gpu_p50_c1_ms"]["value"] == 120.0 and gpu["gpu_p50_c1_ms"]["met"] is False
    assert gpu["gpu_rps_c64"]["met"] is None  # no concurrency-64 level was run


def test_plan_gives_teachers_fewer_levels_and_every_client_two_requests():
    plan = plan_levels({"s": "student", "t": "teacher"}, [1, 8, 32], [1, 8], recommend=True, requests=20,
                       teacher_requests=4, recommend_requests=6)
    got = [(lv.model, lv.endpoint, lv.concurrency, lv.n) for lv in plan]
    assert got == [("s", RANK, 1, 20), ("s", RANK, 8, 20), ("s", RANK, 32, 64), ("t", RANK, 1, 4), ("t", RANK, 8, 16),
                   ("s", RECOMMEND, 1, 6), ("s", RECOMMEND, 8, 16), ("s", RECOMMEND, 32, 64)]
    assert all(lv.endpoint == RANK for lv in plan_levels({"s": "student"}, [1], [1], False, 2, 2, 2))


def test_bare_workload_matches_the_levels_and_halves_cover_it():
    plan = plan_levels({"s": "student"}, [1, 8], [], recommend=False, requests=12, teacher_requests=1,
                       recommend_requests=1)
    singles, batches = bare_workload("s", plan, list(range(5)))
    assert len(singles) == 12 and singles[:6] == [0, 1, 2, 3, 4, 0]  # the same requests, cycled
    assert [len(b) for b in batches] == [8, 8]  # 16 (= 2 x 8 clients) in batches of 8
    first, second = halves(batches)
    assert first + second == batches and len(first) == 1


def test_batch_means_between_scrapes():
    metrics = Metrics()
    metrics.batch("s", 3, 0, 0.5)
    before = metrics.render()[0].decode()
    for size, seconds in ((8, 1.0), (8, 1.0), (2, 0.25)):
        metrics.batch("s", size, 0, seconds)
    metrics.batch("t", 1, 0, 9.0)
    after = metrics.render()[0].decode()
    assert batch_mean(before, after, "s") == pytest.approx(6.0)  # (8 + 8 + 2) / 3; the earlier batch and "t" excluded
    assert batch_mean(before, after, "s", "mixllm_batch_seconds") == pytest.approx(0.75)
    assert batch_mean(after, after, "s") is None


def test_markdown_table_and_section_update():
    report = _report()
    report["targets"] = check_targets(report)
    section = render_markdown(report)
    assert section.startswith(MARK_BEGIN) and section.rstrip().endswith(MARK_END)
    table = [line for line in section.splitlines() if line.startswith("| s |") or line.startswith("| t |")]
    assert len(table) == len(report["service"]) + len(report["bare"])
    assert "| s | `/v1/rank` | 8 | 10 | 300.0 | 600.0 | 20.00 |" in section
    assert "shared" in section  # load average 1.5 on 2 cores before the run
    assert "— met" in section and "not met" not in section

    created = update_section(None, section)
    assert created.startswith("# Benchmarks") and section in created
    other = "# Benchmarks\n\nIntro.\n\n" + section + "\n## Training\n\nKept.\n"
    report["service"][0]["p50_ms"] = 999.0
    updated = update_section(other, render_markdown(report))
    assert "Intro." in updated and "## Training\n\nKept." in updated
    assert updated.count(MARK_BEGIN) == 1 and "999.0" in updated and "| 120.0 |" not in updated
    assert update_section("# Notes\n", section) == "# Notes\n\n" + section  # no markers yet: appended


def test_markdown_has_the_chat_row_when_an_image_model_was_measured():
    report = _report()
    report["targets"] = check_targets(report)
    assert CHAT not in render_markdown(report)  # no image QA model: no row (the run's note says why)
    report["chat"] = {"model": "scenes-qa", "endpoint": CHAT, "n": 8, "errors": {}, "max_tokens": 32,
                      "image": "224x224 PNG", "prompt_tokens": 70, "ttft_p50_ms": 85.25, "decode_tokens_per_s_p50": 41.5,
                      "completion_tokens_mean": 6.5}
    section = render_markdown(report)
    assert "| scenes-qa | 8 | 85.2 | 41.5 | 6.5 | 0 |" in section and "70 prompt tokens" in section


def test_chat_timing_reads_a_one_word_answer_up_to_its_finish_chunk():
    """A one-word answer streams as one text chunk; the end-of-turn token has no text. The decoding rate is
    (completion tokens - 1) over first text -> finish chunk, so it exists for such an answer; a request the
    service refuses counts as an error, not a timing."""
    import json

    import httpx

    from serving.bench import WARMUP_REQUESTS, time_chat

    calls = []

    def stream(request: httpx.Request) -> httpx.Response:
        calls.append(json.loads(request.content))
        if len(calls) == WARMUP_REQUESTS + 2:  # one timed request is refused
            return httpx.Response(429, json={"error": {"message": "busy"}})
        chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": "red"}, "finish_reason": None}]},
                  {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
                  {"choices": [], "usage": {"prompt_tokens": 79, "completion_tokens": 2, "total_tokens": 81}}]
        body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    result = time_chat("http://bench", "scenes-qa", requests=3, max_tokens=8, transport=httpx.MockTransport(stream))
    assert len(calls) == WARMUP_REQUESTS + 3 and all(c["stream"] and c["max_tokens"] == 8 for c in calls)
    assert result["n"] == 2 and result["errors"] == {"429": 1}
    assert result["prompt_tokens"] == 79 and result["completion_tokens_mean"] == 2
    assert result["ttft_p50_ms"] > 0 and result["decode_tokens_per_s_p50"] > 0
